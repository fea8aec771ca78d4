"""Run every benchmark in turn; each writes its figures to benchmarks/results.json."""

import subprocess
import sys
from pathlib import Path

BENCHMARKS = [["bench_importance"], ["bench_importance", "--tp", "2"], ["bench_kd_step"], ["bench_kd_loss_memory"],
              ["bench_pruned_speed"], ["bench_inference_speed"], ["bench_bridge_kd_step"], ["bench_data_rss"],
              ["bench_depth_search"], ["bench_teacher_cache"], ["bench_reliability"], ["bench_demo"]]

if __name__ == "__main__":
    root = Path(__file__).resolve().parent.parent
    for name, *args in BENCHMARKS:
        print(f"== {name} {' '.join(args)}", flush=True)
        subprocess.run([sys.executable, "-m", f"benchmarks.{name}", *args], cwd=root, check=True)
