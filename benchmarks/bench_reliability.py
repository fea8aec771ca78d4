"""Reliability: the share of the bad inputs of tests/test_bad_inputs.py (recipes, model folders, data, run folders
and checkpoints, score files, prune targets and plans, parallel sizes, training state) that the CLI reports clearly:
exit code 1, one line naming the file or setting, no traceback.

Then the kill -9 / resume loop of tests/test_kill_resume.py: kills, resumes_exact (resumes whose run ended with the
uninterrupted run's weights and history, bitwise), half_written_loaded (resumes that loaded a half-written
checkpoint: 0, as every resume passed) and orphans (processes that outlived a killed run).

Usage: python -m benchmarks.bench_reliability
Records reliability = clear / tried (goal 1.0), with bad_inputs_tried, bad_inputs_clear and the kill loop's counts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent.parent / "tests"


class CountCases:
    """pytest plugin: the corpus cases that passed (test_bad_input and test_bad_input_on_ranks)."""

    def __init__(self):
        self.clear = 0

    def pytest_runtest_logreport(self, report):
        if report.when == "call" and report.passed and "::test_bad_input" in report.nodeid:
            self.clear += 1


def main() -> None:
    from benchmarks.results import record

    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    counter = CountCases()
    pytest.main(["-q", str(TESTS / "test_bad_inputs.py"), "-k", "test_bad_input"], plugins=[counter])
    from tests.test_bad_inputs import NUM_CASES

    pytest.main(["-q", "-m", "slow", str(TESTS / "test_kill_resume.py")])
    from tests.test_kill_resume import KILLS, SUMMARY

    kills = SUMMARY or {"kills": KILLS, "resumes_exact": 0, "half_written_loaded": None, "orphans": None}  # failed
    record("reliability", counter.clear / NUM_CASES, bad_inputs_tried=NUM_CASES, bad_inputs_clear=counter.clear,
           **kills)


if __name__ == "__main__":
    main()
