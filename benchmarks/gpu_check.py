"""The Bridge path on one NVIDIA GPU, in one command (benchmarks/gpu_check.sh installs the carried wheels first):

  (a) bridge_distill_step: a Llama-shaped ~1.1B student distilled from a ~2.0B teacher (random weights, vocabulary
      128256, untied output layers) through Megatron-Bridge's pretrain(): bf16 mixed precision, the distributed
      optimizer with overlapped grad-reduce and param-gather, the fused output-layer KD loss (+ 0.5 x LM loss).
      The first step's losses (computed before any update) are checked against a float32 CPU run of the same
      weights and tokens (a subprocess that sees no GPU): value = relative difference of the KD loss
      (within_tolerance: KD <= 2%, LM <= 1%).
  (b) fused_kd_loss_memory: forward + backward of the KD loss from final hidden states at vocabulary 128256
      (4 x 2048 tokens, hidden 4096, bf16): peak CUDA memory and time of the fused output-layer loss against
      logits = h W^T followed by a full-vocabulary float32 KL; value = fused / naive peak bytes.
  (c) kd_tokens_per_second: tokens/s of (a)'s steps after the first two, and MFU = (6 N_student + 2 N_teacher)
      x tokens/s / the GPU's dense bf16 peak.
  (d) fp8_bridge_step: one more (a) run with the recipe's FP8 (model.fp8=delayed: Bridge's
      bf16_with_fp8_delayed_scaling_mixed preset) through Transformer Engine's layer spec, if Transformer Engine
      is installed; otherwise the reason it was not run.

Results go to benchmarks/results_gpu.json. ``--tiny`` runs the same code at test size on whatever device there is
(the suite runs it on the CPU, where (b) and (d) are skipped); ``--cpu-reference DIR`` is the float32 run of (a).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from benchmarks.results import record  # noqa: E402
from nemo_minitron.config import TrainStageConfig  # noqa: E402
from nemo_minitron.models.arch import ModelArch  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results_gpu.json"
PEAK_BF16_FLOPS = {"H100": 989.4e12, "H200": 989.4e12}  # dense bf16 tensor-core FLOP/s (SXM)
LLAMA = dict(num_attention_heads=16, num_query_groups=8, kv_channels=128, vocab_size=128256,
             tie_word_embeddings=False, rope_scaling_factor=8.0, rotary_base=500000.0, max_position_embeddings=2048)


@dataclasses.dataclass(frozen=True)
class Size:
    teacher: ModelArch
    student: ModelArch
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    steps: int


SIZES = {
    "full": Size(ModelArch(num_layers=24, hidden_size=2048, ffn_hidden_size=8192, **LLAMA),
                 ModelArch(num_layers=24, hidden_size=1536, ffn_hidden_size=4608, **LLAMA),
                 seq_length=2048, micro_batch_size=1, global_batch_size=4, steps=8),
    "tiny": Size(ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                           num_query_groups=2, kv_channels=16, vocab_size=256, tie_word_embeddings=False,
                           max_position_embeddings=32),
                 ModelArch(num_layers=2, hidden_size=48, ffn_hidden_size=96, num_attention_heads=4,
                           num_query_groups=2, kv_channels=16, vocab_size=256, tie_word_embeddings=False,
                           max_position_embeddings=32),
                 seq_length=32, micro_batch_size=1, global_batch_size=2, steps=4),
}
LM_LOSS_WEIGHT = 0.5
KD_TOLERANCE, LM_TOLERANCE = 0.02, 0.01  # relative, bf16 against float32
SEED = 1234


def _stage(size: Size) -> TrainStageConfig:
    return TrainStageConfig(steps=size.steps, micro_batch_size=size.micro_batch_size,
                            global_batch_size=size.global_batch_size, lr=1e-4, min_lr=1e-5, warmup_steps=1)


def _forward_step(teacher):
    from nemo_minitron.distillation.forward_step import ForwardStep

    return ForwardStep(teacher, lm_loss_weight=LM_LOSS_WEIGHT, fuse_output_layer=True)


def save_inputs(size: Size, work: Path) -> None:
    """Teacher and student checkpoints (float32, random weights) and the training tokens."""
    from nemo_minitron.models.build import build_gpt_model
    from nemo_minitron.models.checkpoint import save_checkpoint
    from nemo_minitron.runtime.distributed import init_distributed

    init_distributed(seed=SEED)
    for name, arch, seed in (("teacher", size.teacher, 1), ("student", size.student, 2)):
        torch.manual_seed(seed)
        save_checkpoint(build_gpt_model(arch), arch, work / name)
    tokens = torch.randint(0, size.teacher.vocab_size, (size.global_batch_size * size.steps, size.seq_length + 1),
                           generator=torch.Generator().manual_seed(SEED))
    torch.save(tokens, work / "train.pt")


def bridge_distill(size: Size, work: Path, transformer_impl: str = "local", fp8: str | None = None) -> list[dict]:
    """(a): the Bridge run; returns its loss history (HistoryCallback entries)."""
    from nemo_minitron.bridge.callbacks import HistoryCallback
    from nemo_minitron.bridge.data import PackedSequences
    from nemo_minitron.bridge.model import LoadWeights, TeacherFromCheckpoint, gpt_provider
    from nemo_minitron.bridge.recipes import BridgeRun, container
    from nemo_minitron.bridge.stages import launch
    from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(use_distributed_optimizer=True), seed=SEED)
    precision = dict(transformer_impl=transformer_impl, fp8=fp8, params_dtype=torch.bfloat16)
    model = gpt_provider(size.student, seq_length=size.seq_length, **precision)
    teacher = TeacherFromCheckpoint(work / "teacher", **precision)
    for hook in (LoadWeights(work / "student"), teacher):
        model.register_pre_wrap_hook(hook)
    config = container(model, PackedSequences(train_path=str(work / "train.pt"), seed=SEED), _stage(size), seed=SEED,
                       use_distributed_optimizer=True)
    config.ddp.overlap_grad_reduce = config.ddp.overlap_param_gather = True  # what a GPU run gets (also --tiny)
    config.logger.log_interval = size.steps
    history = HistoryCallback()
    launch(BridgeRun(config, _forward_step(teacher), [history]))
    return history.history


def cpu_reference(size: Size, work: Path) -> dict:
    """The float32 losses of (a)'s first step, on the CPU: the same weights and the same first global batch."""
    from nemo_minitron.data.order import global_batch
    from nemo_minitron.distillation.teacher import Teacher
    from nemo_minitron.models.checkpoint import load_checkpoint
    from nemo_minitron.runtime.distributed import init_distributed

    init_distributed(seed=SEED)
    teacher, _ = load_checkpoint(work / "teacher")
    student, _ = load_checkpoint(work / "student")
    forward_step = _forward_step(Teacher(teacher))
    rows = global_batch(torch.load(work / "train.pt"), 0, size.global_batch_size, SEED)
    sums = {"kd loss": 0.0, "lm loss": 0.0}
    count = 0
    with torch.no_grad():
        for micro in rows.split(size.micro_batch_size):
            output, loss_func = forward_step(iter([{"tokens": micro[:, :-1], "labels": micro[:, 1:]}]), student)
            _, tokens, report = loss_func(output)
            count += int(tokens)
            for name in sums:
                sums[name] += float(report[name][0])
    return {"kd_loss": sums["kd loss"] / count, "lm_loss": sums["lm loss"] / count}


def fused_loss_memory(tiny: bool) -> dict:
    """(b): peak CUDA bytes and seconds of the fused loss and of logits + naive KL, on the same inputs."""
    from benchmarks.bench_kd_loss_memory import _inputs, _loss

    batch, seq, vocab, hidden = (1, 16, 256, 32) if tiny else (4, 2048, 128256, 4096)
    out = {}
    for variant in ("projection_naive", "fused"):
        inputs = _inputs(variant, batch, seq, vocab, hidden=hidden, dtype=torch.bfloat16, device="cuda")
        loss_mask = torch.ones(batch, seq, device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        start = time.perf_counter()
        loss = _loss(variant, inputs, loss_mask, 4096)
        loss.backward()
        torch.cuda.synchronize()
        out[variant] = {"seconds": time.perf_counter() - start, "loss": loss.item(),
                        "peak_bytes": torch.cuda.max_memory_allocated() - baseline}
        del inputs, loss
        torch.cuda.empty_cache()
    out["shape"] = dict(tokens=batch * seq, vocab=vocab, hidden=hidden, dtype="bf16")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="test sizes, on whatever device there is")
    parser.add_argument("--cpu-reference", metavar="DIR", help="(internal) the float32 CPU run of (a) on DIR")
    parser.add_argument("--results", default=str(RESULTS), help="results file (default %(default)s)")
    args = parser.parse_args()
    size = SIZES["tiny" if args.tiny else "full"]
    if args.cpu_reference:
        print(json.dumps(cpu_reference(size, Path(args.cpu_reference))))
        return
    gpu = torch.cuda.is_available()
    if not gpu and not args.tiny:
        print("gpu_check: no CUDA GPU here (torch.cuda.is_available() is False): nothing measured; run it on a "
              "machine with an NVIDIA GPU (or --tiny to try the code on the CPU)")
        return
    results = Path(args.results)
    device = torch.cuda.get_device_name() if gpu else "cpu"
    common = dict(path=results, device=device, torch=torch.__version__, size="tiny" if args.tiny else "full")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_inputs(size, work)
        history = bridge_distill(size, work)
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)  # the carried wheels too
        env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=path)
        flags = ["--tiny"] if args.tiny else []
        proc = subprocess.run([sys.executable, __file__, *flags, "--cpu-reference", str(work)], env=env,
                              capture_output=True, text=True, check=True)
        reference = json.loads(proc.stdout.strip().splitlines()[-1])
        first = history[0]
        kd_error = abs(first["kd_loss"] - reference["kd_loss"]) / reference["kd_loss"]
        lm_error = abs(first["lm_loss"] - reference["lm_loss"]) / reference["lm_loss"]
        record("bridge_distill_step", kd_error, lm_loss_relative_difference=lm_error,
               within_tolerance=kd_error <= KD_TOLERANCE and lm_error <= LM_TOLERANCE, bridge_first_step=first,
               cpu_float32_first_step=reference, losses=[e["loss"] for e in history],
               teacher=size.teacher.to_dict(), student=size.student.to_dict(),
               settings="bf16, distributed optimizer, overlap_grad_reduce + overlap_param_gather, fused output-layer "
                        f"KD + {LM_LOSS_WEIGHT} LM", **common)
        timed = [e["seconds"] for e in history[2:]]
        tokens_per_step = size.global_batch_size * size.seq_length
        tokens_per_second = tokens_per_step / (sum(timed) / len(timed))
        flops_per_token = 6 * size.student.num_parameters() + 2 * size.teacher.num_parameters()
        peak = next((flops for name, flops in PEAK_BF16_FLOPS.items() if name in device), None)
        record("kd_tokens_per_second", tokens_per_second, step_seconds=timed, tokens_per_step=tokens_per_step,
               mfu=None if peak is None else tokens_per_second * flops_per_token / peak,
               flops_per_token=flops_per_token, peak_bf16_flops=peak, **common)
        if gpu:
            memory = fused_loss_memory(args.tiny)
            record("fused_kd_loss_memory", memory["fused"]["peak_bytes"] / memory["projection_naive"]["peak_bytes"],
                   **memory, **common)
            if importlib.util.find_spec("transformer_engine") is None:
                record("fp8_bridge_step", None, skipped="Transformer Engine is not installed for this torch (no "
                       "wheel on PyPI: transformer-engine-torch builds from source with nvcc)", **common)
            else:
                fp8 = bridge_distill(size, work, transformer_impl="transformer_engine", fp8="delayed")
                record("fp8_bridge_step", fp8[-1]["loss"], losses=[e["loss"] for e in fp8],
                       step_seconds=[e["seconds"] for e in fp8], **common)
    print(f"gpu_check: results in {results}")


if __name__ == "__main__":
    main()
