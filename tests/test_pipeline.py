"""The whole recipe end to end through the `minitron` CLI, on a tiny random Llama (fast) and SmolLM2 (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def minitron(*args, timeout=900):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "nemo_minitron.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"minitron {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def tiny_overrides(inputs: Path, run_dir: Path) -> list[str]:
    return [
        f"run_dir={run_dir}", f"model.source={inputs / 'model'}", f"data.source={inputs / 'corpus.txt'}",
        "data.seq_length=32", "data.num_calibration=8", "data.num_validation=8", "score.num_validation=4",
        "score.block_sizes=[2]", "prune.width.hidden_size=48", "prune.width.ffn_hidden_size=64",
        "prune.width.num_attention_heads=2", "prune.depth.num_layers=2", "distill.steps=8",
        "distill.global_batch_size=8", "distill.lr=3e-3", "distill.min_lr=3e-4", "distill.warmup_steps=1",
        "distill.eval_interval=4",
    ]


def test_tiny_recipe_end_to_end(tiny_hf_run_inputs, tmp_path):
    run_dir = tmp_path / "run"
    out = minitron("run", "--recipe", str(REPO / "recipes" / "demo.yaml"), *tiny_overrides(tiny_hf_run_inputs, run_dir))
    assert "| distilled/width |" in out
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results) == {"teacher", "pruned/width", "pruned/depth", "distilled/width"}
    assert results["pruned/width"]["arch"]["hidden_size"] == 48
    assert results["pruned/depth"]["arch"]["num_layers"] == 2
    assert results["pruned/width"]["params"] < results["teacher"]["params"]
    # Distillation must move the student toward the teacher: its KD loss falls over training.
    history = json.loads((run_dir / "distilled" / "width" / "history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"]
    # The depth target dropped the contiguous block the search found cheapest.
    scores = json.loads((run_dir / "scores" / "scores.json").read_text())
    plan = json.loads((run_dir / "pruned" / "depth" / "plan.json").read_text())
    best = min(range(3), key=lambda s: scores["blocks"]["2"][s])
    assert plan["layers_keep"] == [i for i in range(4) if i not in (best, best + 1)]
    for name in ("report.md", "plots/loss_curve.png", "plots/size_vs_loss.png", "distilled/width/hf/config.json"):
        assert (run_dir / name).exists(), name
    assert list((run_dir / "scores").glob("*.png"))

    # A stage re-runs alone on the run folder and reproduces its numbers.
    (run_dir / "eval.json").unlink()
    minitron("eval", "--run", str(run_dir))
    again = json.loads((run_dir / "eval.json").read_text())
    for label, r in results.items():
        assert again[label]["val_loss"] == pytest.approx(r["val_loss"], abs=1e-6)


def test_bad_target_fails_before_compute(tiny_hf_run_inputs, tmp_path):
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(REPO))
    args = tiny_overrides(tiny_hf_run_inputs, tmp_path / "run")
    args = [a.replace("prune.width.hidden_size=48", "prune.width.hidden_size=80") for a in args]
    proc = subprocess.run([sys.executable, "-m", "nemo_minitron.cli", "run", "--recipe",
                           str(REPO / "recipes" / "demo.yaml"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "hidden_size" in proc.stderr and "80" in proc.stderr
    assert not (tmp_path / "run" / "scores").exists()


@pytest.mark.slow
def test_smollm2_demo_few_steps(tmp_path):
    """The real demo recipe on SmolLM2-135M, shortened: every stage runs and distillation lowers the KD loss."""
    run_dir = tmp_path / "demo"
    out = minitron("demo", f"run_dir={run_dir}", "data.num_calibration=8", "data.num_validation=8",
                   "score.num_validation=4", "distill.steps=3", "distill.global_batch_size=4", "distill.eval_interval=0",
                   timeout=1500)
    results = json.loads((run_dir / "eval.json").read_text())
    assert results["teacher"]["arch"]["num_layers"] == 30
    assert results["teacher"]["val_loss"] < 5.0  # SmolLM2 knows English: far below log(49152) = 10.8
    assert results["pruned/depth"]["arch"]["num_layers"] == 15
    assert results["distilled/width"]["val_loss"] < results["pruned/width"]["val_loss"]
    assert "| teacher |" in out
