"""Overhead of the distillation step: time of one KD training step (trainer.train: teacher forward, student
forward, vocab-parallel forward KL, backward, DDP grad finalisation, clipped Adam step, scheduler) divided by the
time of its unavoidable parts measured alone in the same run (teacher forward + student forward/backward with a
plain cross-entropy). The two are measured alternately (the machine may be shared); the recorded ratio is the median
of the ratios of adjacent pairs, after warm-up.

Two shapes, because the ratio depends on how heavy the per-token vocabulary work (the loss, ~V elementwise
operations per token) and the per-step work (the optimizer, ~parameters) are next to the model's matmuls:
- ``proportioned`` (the recorded kd_step_overhead_ratio): 8 layers of hidden 512, ~3,000 transformer-layer
  parameters per vocabulary entry and 512 tokens per step. Llama-3.1-8B has ~54,000 per entry and ~1M tokens per
  step, so the loss and optimizer weigh even less there.
- ``vocab_heavy``: 4 layers of hidden 256 with the same vocabulary (~380 per entry): the worst case, kept to show
  the loss's own cost.

Run: .venv/bin/python benchmarks/bench_kd_step.py  (records kd_step_overhead_ratio in benchmarks/results.json)
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.results import record  # noqa: E402
from nemo_minitron.distillation.forward_step import ForwardStep  # noqa: E402
from nemo_minitron.distillation.teacher import Teacher  # noqa: E402
from nemo_minitron.distillation.trainer import TrainConfig, train  # noqa: E402
from nemo_minitron.models.arch import ModelArch  # noqa: E402
from nemo_minitron.models.build import build_gpt_model, forward_logits  # noqa: E402
from nemo_minitron.runtime.distributed import ParallelConfig, destroy_distributed, device, init_distributed  # noqa

SHAPES = {
    "proportioned": ModelArch(num_layers=8, hidden_size=512, ffn_hidden_size=1536, num_attention_heads=8,
                              num_query_groups=4, vocab_size=8192, kv_channels=64, max_position_embeddings=256),
    "vocab_heavy": ModelArch(num_layers=4, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8,
                             num_query_groups=4, vocab_size=8192, kv_channels=32, max_position_embeddings=256),
}
BATCH, SEQ, WARMUP, REPEATS = 4, 128, 1, 15


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(arch: ModelArch) -> dict:
    """The median over REPEATS adjacent pairs of (KD step) / (teacher forward + student forward/backward): the
    load of the shared machine drifts, and a pair measured back to back sees nearly the same load."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    teacher = Teacher(build_gpt_model(arch))
    baseline_student = build_gpt_model(arch)
    sequences = torch.randint(0, arch.vocab_size, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    tokens, labels = sequences[:, :-1].to(device()), sequences[:, 1:].to(device())

    def student_forward_backward():
        baseline_student.zero_grad(set_to_none=True)
        vocab_parallel_cross_entropy(forward_logits(baseline_student, tokens).float(), labels).mean().backward()

    # Every repetition trains a fresh student for WARMUP + 1 steps and times the last one.
    cfg = TrainConfig(steps=WARMUP + 1, micro_batch_size=BATCH, global_batch_size=BATCH, lr=1e-4, min_lr=1e-5)
    baselines, kd_steps = [], []
    for _ in range(REPEATS + 1):
        teacher_forward = _seconds(lambda: teacher.logits(tokens))
        baselines.append(teacher_forward + _seconds(student_forward_backward))
        history = train(build_gpt_model(arch), sequences, cfg, ForwardStep(teacher), progress=False)
        kd_steps.append(history[-1]["seconds"])
    baselines, kd_steps = baselines[1:], kd_steps[1:]  # the first repetition warms up
    kd_step, parts = statistics.median(kd_steps), statistics.median(baselines)
    layer_params = arch.num_parameters() - arch.vocab_size * arch.hidden_size * (1 if arch.tie_word_embeddings else 2)
    pair_ratios = [k / b for k, b in zip(kd_steps, baselines)]
    return dict(ratio=statistics.median(pair_ratios), kd_step_s=round(kd_step, 4),
                teacher_forward_plus_student_fwd_bwd_s=round(parts, 4), ratio_of_medians=round(kd_step / parts, 4),
                pair_ratio_quartiles=[round(q, 4) for q in statistics.quantiles(pair_ratios, n=4)],
                ratio_of_minimums=round(min(kd_steps) / min(baselines), 4),
                layer_params_per_vocab_entry=round(layer_params / arch.vocab_size), arch=arch.to_dict())


def main() -> None:
    init_distributed(ParallelConfig(), seed=0)
    results = {name: measure(arch) for name, arch in SHAPES.items()}
    primary = results.pop("proportioned")
    record("kd_step_overhead_ratio", primary.pop("ratio"), **primary,
           vocab_heavy_ratio=round(results["vocab_heavy"]["ratio"], 4), vocab_heavy=results["vocab_heavy"],
           repeats=REPEATS, batch=f"{BATCH}x{SEQ}", device=str(device()), threads=torch.get_num_threads())
    destroy_distributed()


if __name__ == "__main__":
    main()
