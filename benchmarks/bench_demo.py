"""demo_seconds: `make demo` on a fresh clone of this repository, set-up included (a new virtual environment, the
SmolLM2 GGUF conversion and the tokenisation into an empty MINITRON_CACHE_DIR). Goal: <= 600 s on 2 CPU cores.

Usage: python -m benchmarks.bench_demo   (commit first: the clone holds what is committed; pip reads its own cache)
Records demo_seconds with setup_seconds (clone + install) and each stage's seconds from runs/demo/timings.json.
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    from benchmarks.results import record

    with tempfile.TemporaryDirectory(prefix="bench_demo_") as tmp:
        clone, env = Path(tmp) / "repo", {**os.environ, "MINITRON_CACHE_DIR": str(Path(tmp) / "cache")}
        start = time.perf_counter()
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
        subprocess.run(["make", "install"], cwd=clone, env=env, check=True)
        setup = time.perf_counter() - start
        subprocess.run(["make", "demo"], cwd=clone, env=env, check=True)
        total = time.perf_counter() - start
        stages = json.loads((clone / "runs" / "demo" / "timings.json").read_text())
    record("demo_seconds", round(total), goal="<= 600 including set-up", setup_seconds=round(setup),
           stages_seconds=stages, load_average=round(os.getloadavg()[0], 1), cpus=os.cpu_count(),
           method="make install + make demo in a fresh clone with an empty MINITRON_CACHE_DIR")


if __name__ == "__main__":
    main()
