"""Peak memory of forward + backward of the chunked forward-KL loss vs a naive full-vocabulary float32 KL.

Each variant runs in a fresh subprocess on the same bf16 logits (default 4 x 512 tokens, vocabulary 128256).
Peak bytes = the process's peak resident set (getrusage ru_maxrss) minus its resident set once the inputs are
allocated, so it counts everything the loss allocates: float32 probabilities, saved tensors, gradients. The
subprocesses set MALLOC_MMAP_THRESHOLD_ so that glibc maps every large tensor and unmaps it when freed: the
resident set then tracks live tensor bytes instead of heap memory kept after free. Both
variants must give the same loss and student gradients. Records ``kd_loss_memory_ratio`` (chunked / naive,
goal <= 0.25).

    .venv/bin/python -m benchmarks.bench_kd_loss_memory
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.results import record
from nemo_minitron.distillation.losses import VocabParallelKDLoss, masked_mean


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _naive_forward_kl(student: torch.Tensor, teacher: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    log_ps = F.log_softmax(student.float(), dim=-1)
    log_pt = F.log_softmax(teacher.float(), dim=-1)
    per_token = F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)
    return (per_token * loss_mask).sum() / loss_mask.sum()


def _loss(variant: str, student: torch.Tensor, teacher: torch.Tensor, loss_mask: torch.Tensor,
          chunk_size: int) -> torch.Tensor:
    if variant == "naive":
        return _naive_forward_kl(student, teacher, loss_mask)
    return masked_mean(VocabParallelKDLoss("forward_kl", chunk_size=chunk_size)(student, teacher, loss_mask),
                       loss_mask)


def run_variant(variant: str, batch: int, seq: int, vocab: int, chunk_size: int, out: Path) -> dict:
    """Forward + backward of one variant in this (fresh) process; returns its peak extra bytes and loss."""
    tiny = torch.randn(1, 4, 8, requires_grad=True)
    _loss(variant, tiny, torch.randn(1, 4, 8), torch.ones(1, 4), 2).backward()  # lazy imports, one-time setup
    torch.manual_seed(0)
    student = torch.empty(batch, seq, vocab, dtype=torch.bfloat16).normal_(std=2.0).requires_grad_()
    teacher = torch.empty(batch, seq, vocab, dtype=torch.bfloat16).normal_(std=2.0)
    loss_mask = torch.ones(batch, seq)
    loss_mask[:, -seq // 8:] = 0  # padding at the end of every sequence
    baseline = _resident_bytes()
    start = time.perf_counter()
    loss = _loss(variant, student, teacher, loss_mask, chunk_size)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    torch.save(student.grad.view(-1, vocab)[::64].clone(), out)  # every 64th token's gradient, for the check
    return {"peak_bytes": peak - baseline, "loss": loss.item(), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--variant", choices=["naive", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch, args.seq, args.vocab, args.chunk_size, args.out)))
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in ("naive", "chunked"):
            out = Path(tmp) / f"{variant}.pt"
            cmd = [sys.executable, "-m", "benchmarks.bench_kd_loss_memory", "--variant", variant, "--out", str(out),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab),
                   "--chunk-size", str(args.chunk_size)]
            stdout = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parents[1],
                                    env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}).stdout
            results[variant] = json.loads(stdout.strip().splitlines()[-1])
            results[variant]["grad"] = torch.load(out)
    naive, chunked = results["naive"], results["chunked"]
    assert abs(chunked["loss"] - naive["loss"]) <= 1e-4 * abs(naive["loss"]), (chunked["loss"], naive["loss"])
    torch.testing.assert_close(chunked["grad"], naive["grad"], rtol=2e-2, atol=1e-9)  # bf16 gradients
    mib = 2**20
    record("kd_loss_memory_ratio", chunked["peak_bytes"] / naive["peak_bytes"],
           chunked_peak_mib=round(chunked["peak_bytes"] / mib), naive_peak_mib=round(naive["peak_bytes"] / mib),
           tokens=args.batch * args.seq, vocab=args.vocab, chunk_size=args.chunk_size, logits_dtype="bfloat16",
           loss=chunked["loss"], chunked_seconds=round(chunked["seconds"], 1), naive_seconds=round(naive["seconds"], 1),
           method="fresh subprocess per variant, MALLOC_MMAP_THRESHOLD_=65536; ru_maxrss minus resident set "
                  "after allocating the inputs; forward + backward")


if __name__ == "__main__":
    main()
