"""Importance-scoring overhead: time of compute_importance (width + Block Influence hooks, one calibration pass)
divided by the time of a plain forward-only pass (validation_loss) over the same data and model, both measured
as process CPU time (1 thread per process) so that a busy shared machine does not distort the ratio.

Usage: python -m benchmarks.bench_importance [--tp 2]   (TP=2 runs on 2 gloo processes)
Records importance_overhead_ratio (TP=1) or importance_overhead_ratio_tp2 (goal <= 1.05).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

from nemo_minitron.models.arch import ModelArch  # noqa: E402

ARCH = ModelArch(num_layers=4, hidden_size=256, ffn_hidden_size=1024, num_attention_heads=8, num_query_groups=4,
                 vocab_size=4096, kv_channels=32, max_position_embeddings=512)
SEQUENCES, SEQ_LENGTH, MICRO_BATCH_SIZE, REPEATS = 8, 256, 4, 25


def measure(rank: int, world_size: int, results) -> None:
    """One gloo rank: time both passes; rank 0 puts the medians on ``results``."""
    import torch.distributed as dist

    from nemo_minitron.evaluation.loss import validation_loss
    from nemo_minitron.importance.compute import compute_importance
    from nemo_minitron.models.build import build_gpt_model
    from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed

    torch.set_num_threads(1)  # one thread per process: steadier timings on a shared machine
    init_distributed(ParallelConfig(tensor_model_parallel_size=world_size))
    model = build_gpt_model(ARCH).eval()
    data = torch.randint(0, ARCH.vocab_size, (SEQUENCES, SEQ_LENGTH + 1), generator=torch.Generator().manual_seed(0))

    def timed(fn) -> float:
        """CPU seconds of this process (time spent descheduled on a busy machine does not count)."""
        dist.barrier()
        start = time.process_time()
        fn()
        return time.process_time() - start

    plain = lambda: validation_loss(model, data, MICRO_BATCH_SIZE)  # noqa: E731
    scoring = lambda: compute_importance(model, ARCH, data, seq_length=SEQ_LENGTH,
                                          micro_batch_size=MICRO_BATCH_SIZE)  # noqa: E731
    plain(), scoring()  # warm-up
    ratios, plain_s, scoring_s = [], [], []
    for _ in range(REPEATS):  # interleaved pairs; the median ratio resists the noise of a shared machine
        plain_s.append(timed(plain))
        scoring_s.append(timed(scoring))
        ratios.append(scoring_s[-1] / plain_s[-1])
    if rank == 0:
        results.put({"ratio": statistics.median(ratios), "plain": statistics.median(plain_s),
                     "scoring": statistics.median(scoring_s)})


def main() -> None:
    import torch.multiprocessing as mp

    from benchmarks.results import record
    from tests.distributed import run_distributed

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tp", type=int, default=1, choices=(1, 2))
    tp = parser.parse_args().tp
    queue = mp.get_context("spawn").SimpleQueue()
    run_distributed(measure, tp, queue, timeout=1800)
    best = queue.get()  # rank 0's medians
    key = "importance_overhead_ratio" + ("" if tp == 1 else f"_tp{tp}")
    record(key, best["ratio"], goal="<= 1.05", plain_forward_cpu_s=round(best["plain"], 4),
           importance_cpu_s=round(best["scoring"], 4), tensor_model_parallel_size=tp, arch=ARCH.to_dict(),
           sequences=SEQUENCES, seq_length=SEQ_LENGTH, micro_batch_size=MICRO_BATCH_SIZE,
           depth_metrics=["block_influence"],
           timing=f"median over {REPEATS} interleaved pairs of process CPU time, 1 thread per process")


if __name__ == "__main__":
    main()
