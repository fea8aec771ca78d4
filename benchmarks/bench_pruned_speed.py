"""Inference speed of the demo's pruned SmolLM2-135M shapes relative to the teacher, at equal batch.

Times a no-grad forward (prefill, batch 4 x 256 tokens) of the teacher, the width-pruned (hidden 384, ffn 1024,
6 heads) and the depth-pruned (15 layers) shapes with random weights (speed depends on shapes, not values),
interleaving the models and taking the median of each. Records pruned_speedup_width / pruned_speedup_depth
(teacher time / pruned time) and their parameter ratios, which bound the speed-up of memory-bound decode.

Usage: python -m benchmarks.bench_pruned_speed
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

from benchmarks.results import record  # noqa: E402
from nemo_minitron.models.arch import ModelArch  # noqa: E402

TEACHER = ModelArch(num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_query_groups=3,
                    vocab_size=49152, kv_channels=64, max_position_embeddings=2048, rotary_base=100000.0)
STUDENTS = {"width": TEACHER.replace(hidden_size=384, ffn_hidden_size=1024, num_attention_heads=6),
            "depth": TEACHER.replace(num_layers=15)}
BATCH, SEQ_LENGTH, REPEATS = 4, 256, 7


def main() -> None:
    from nemo_minitron.models.build import build_gpt_model, forward_logits
    from nemo_minitron.runtime.distributed import destroy_distributed, init_distributed

    init_distributed()
    models = {"teacher": build_gpt_model(TEACHER).eval()}
    models.update({name: build_gpt_model(arch).eval() for name, arch in STUDENTS.items()})
    tokens = torch.randint(0, TEACHER.vocab_size, (BATCH, SEQ_LENGTH), generator=torch.Generator().manual_seed(0))
    times = {name: [] for name in models}
    with torch.no_grad():
        for repeat in range(REPEATS + 1):
            for name, model in models.items():
                start = time.perf_counter()
                forward_logits(model, tokens)
                if repeat:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    destroy_distributed()
    teacher = statistics.median(times["teacher"])
    for name, arch in STUDENTS.items():
        pruned = statistics.median(times[name])
        record(f"pruned_speedup_{name}", teacher / pruned, teacher_seconds=round(teacher, 3),
               pruned_seconds=round(pruned, 3), param_ratio=round(TEACHER.num_parameters() / arch.num_parameters(), 3),
               batch=BATCH, seq_length=SEQ_LENGTH, device="cpu", threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
