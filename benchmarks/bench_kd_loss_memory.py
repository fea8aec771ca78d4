"""Peak memory of forward + backward of the chunked forward-KL loss vs a naive full-vocabulary float32 KL, and of
the loss fused with the output layer vs the output layer followed by the naive KL.

Each variant runs in a fresh subprocess on the same inputs (default 4 x 512 tokens, vocabulary 128256): bf16 logits
for ``naive`` and ``chunked``; float32 final hidden states (hidden 256) and output weights of a student and a
teacher for ``projection_naive`` (logits = h W^T, then the naive KL) and ``fused`` (FusedOutputKDLoss); float32
because CPU bf16 matmuls are ~50x slower.
Peak bytes = the process's peak resident set (getrusage ru_maxrss) minus its resident set once the inputs are
allocated, so it counts everything the loss allocates: float32 probabilities, saved tensors, gradients. The
subprocesses set MALLOC_MMAP_THRESHOLD_ so that glibc maps every large tensor and unmaps it when freed: the
resident set then tracks live tensor bytes instead of heap memory kept after free. Both
variants of a pair must give the same loss and student gradients. Records ``kd_loss_memory_ratio`` (chunked /
naive, goal <= 0.25) and ``kd_fused_memory_ratio`` (fused / projection_naive).

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
from nemo_minitron.distillation.fused_output import FinalHiddenStates, FusedOutputKDLoss
from nemo_minitron.distillation.losses import VocabParallelKDLoss, masked_mean

HIDDEN = 256
PAIRS = {"kd_loss_memory_ratio": ("naive", "chunked"), "kd_fused_memory_ratio": ("projection_naive", "fused")}


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _naive_forward_kl(student: torch.Tensor, teacher: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    log_ps = F.log_softmax(student.float(), dim=-1)
    log_pt = F.log_softmax(teacher.float(), dim=-1)
    per_token = F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)
    return (per_token * loss_mask).sum() / loss_mask.sum()


def _loss(variant: str, inputs: dict, loss_mask: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Mean forward KL over the valid tokens; inputs hold logits [b, s, V] or hidden states [s, b, h] + weights."""
    if variant == "fused":
        fused = FusedOutputKDLoss(VocabParallelKDLoss("forward_kl"), chunk_size=chunk_size)
        out = fused(FinalHiddenStates(inputs["student"], inputs["student_weight"]),
                    FinalHiddenStates(inputs["teacher"], inputs["teacher_weight"]), loss_mask)
        return out.loss / out.count
    if variant == "projection_naive":
        logits = {side: (inputs[side] @ inputs[f"{side}_weight"].t()).transpose(0, 1)
                  for side in ("student", "teacher")}
        return _naive_forward_kl(logits["student"], logits["teacher"], loss_mask)
    if variant == "naive":
        return _naive_forward_kl(inputs["student"], inputs["teacher"], loss_mask)
    return masked_mean(VocabParallelKDLoss("forward_kl", chunk_size=chunk_size)(inputs["student"], inputs["teacher"],
                                                                                 loss_mask), loss_mask)


def _inputs(variant: str, batch: int, seq: int, vocab: int, hidden: int = HIDDEN, dtype=torch.float32,
            device="cpu") -> dict:
    """Seeded inputs; the student's logits, or its hidden states and output weight (``hidden`` channels, ``dtype``),
    require grad."""
    torch.manual_seed(0)
    if variant in ("naive", "chunked"):
        return {side: torch.empty(batch, seq, vocab, dtype=torch.bfloat16, device=device).normal_(
            std=2.0).requires_grad_(side == "student") for side in ("student", "teacher")}
    inputs = {}
    for side in ("student", "teacher"):
        inputs[side] = torch.empty(seq, batch, hidden, dtype=dtype, device=device).normal_().requires_grad_(
            side == "student")
        inputs[f"{side}_weight"] = torch.empty(vocab, hidden, dtype=dtype, device=device).normal_(
            std=2.0 / hidden**0.5).requires_grad_(side == "student")
    return inputs


def run_variant(variant: str, batch: int, seq: int, vocab: int, chunk_size: int, out: Path) -> dict:
    """Forward + backward of one variant in this (fresh) process; returns its peak extra bytes and loss."""
    _loss(variant, _inputs(variant, 1, 4, 8), torch.ones(1, 4), 2).backward()  # lazy imports, one-time setup
    inputs = _inputs(variant, batch, seq, vocab)
    loss_mask = torch.ones(batch, seq)
    loss_mask[:, -seq // 8:] = 0  # padding at the end of every sequence
    baseline = _resident_bytes()
    start = time.perf_counter()
    loss = _loss(variant, inputs, loss_mask, chunk_size)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    grad = inputs["student"].grad.reshape(-1, inputs["student"].shape[-1])[::64]  # every 64th token's gradient
    torch.save(grad.clone(), out)
    return {"peak_bytes": peak - baseline, "loss": loss.item(), "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--chunk-size", type=int, default=128)
    parser.add_argument("--variant", choices=[v for pair in PAIRS.values() for v in pair], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch, args.seq, args.vocab, args.chunk_size, args.out)))
        return

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for variant in (v for pair in PAIRS.values() for v in pair):
            out = Path(tmp) / f"{variant}.pt"
            cmd = [sys.executable, "-m", "benchmarks.bench_kd_loss_memory", "--variant", variant, "--out", str(out),
                   "--batch", str(args.batch), "--seq", str(args.seq), "--vocab", str(args.vocab),
                   "--chunk-size", str(args.chunk_size)]
            stdout = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                    cwd=Path(__file__).resolve().parents[1],
                                    env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}).stdout
            results[variant] = json.loads(stdout.strip().splitlines()[-1])
            results[variant]["grad"] = torch.load(out)
    mib = 2**20
    for key, (reference, variant) in PAIRS.items():
        ref, new = results[reference], results[variant]
        assert abs(new["loss"] - ref["loss"]) <= 1e-3 * abs(ref["loss"]), (key, new["loss"], ref["loss"])
        torch.testing.assert_close(new["grad"], ref["grad"], rtol=2e-2, atol=2e-3 * float(ref["grad"].abs().max()))
        record(key, new["peak_bytes"] / ref["peak_bytes"], **{
            f"{variant}_peak_mib": round(new["peak_bytes"] / mib),
            f"{reference}_peak_mib": round(ref["peak_bytes"] / mib),
            f"{variant}_seconds": round(new["seconds"], 1), f"{reference}_seconds": round(ref["seconds"], 1)},
            **({"hidden_size": HIDDEN, "dtype": "float32"} if variant == "fused" else {"dtype": "bfloat16"}),
            tokens=args.batch * args.seq, vocab=args.vocab, chunk_size=args.chunk_size, loss=new["loss"],
            method="fresh subprocess per variant, MALLOC_MMAP_THRESHOLD_=65536; ru_maxrss minus resident set "
                   "after allocating the inputs; forward + backward")


if __name__ == "__main__":
    main()
