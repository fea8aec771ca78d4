"""One results file for every benchmark: benchmarks/results.json, a key per measured figure."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).with_name("results.json")


def record(key: str, value: float, path: Path = RESULTS, **details) -> None:
    """Set ``key`` to ``value`` (with its details and the machine) in ``path`` (benchmarks/results.json)."""
    results = json.loads(path.read_text()) if path.exists() else {}
    results[key] = {"value": value, **details, "machine": platform.processor() or platform.machine(),
                    "measured": time.strftime("%Y-%m-%d %H:%M")}
    path.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(f"{key} = {value:.4g}  {details}")
