"""benchmarks/gpu_check.sh / gpu_check.py, the one-command GPU check, on this machine: the shell script says there is
no GPU, and the check's own code (Bridge distillation with bf16, the distributed optimizer and overlapped
communication, the fused loss; the float32 CPU reference in a subprocess) runs at test size on the CPU."""

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.test_pipeline import REPO

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the script runs the full check")


def test_gpu_check_script_says_there_is_no_gpu():
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh")], cwd=REPO, capture_output=True,
                          text=True, env=dict(os.environ, PYTHON=sys.executable), timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("gpu_check: no CUDA GPU here"), proc.stdout


def test_gpu_check_code_at_test_size_matches_the_float32_reference(tmp_path):
    """The Bridge run's first-step KD and LM losses (bf16 mixed precision) equal the float32 CPU reference within
    the check's tolerance; throughput is recorded."""
    results = tmp_path / "results_gpu.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--tiny", "--results",
                           str(results)], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(REPO)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recorded = json.loads(results.read_text())
    step = recorded["bridge_distill_step"]
    assert step["within_tolerance"] and step["value"] < 2e-3 and step["lm_loss_relative_difference"] < 2e-3, step
    assert len(step["losses"]) == 4 and all(loss == loss for loss in step["losses"])
    assert recorded["kd_tokens_per_second"]["value"] > 0
