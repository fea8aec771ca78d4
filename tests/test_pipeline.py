"""The whole recipe end to end through the `minitron` CLI, on a tiny random Llama (fast) and SmolLM2 (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


def minitron(*args, timeout=900, nproc=1):
    """Run the CLI in a fresh process (under torch.distributed.run with ``nproc`` gloo ranks when > 1)."""
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    proc = subprocess.run([sys.executable, *launcher, "-m", "nemo_minitron.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)
    ranks = "\n".join(line for line in proc.stderr.splitlines() if line.startswith("[rank1]"))[-4000:]
    assert proc.returncode == 0, (f"minitron {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
                                  f"\nrank 1:\n{ranks}")
    return proc.stdout


def tiny_overrides(inputs: Path, run_dir: Path) -> list[str]:
    return [
        f"run_dir={run_dir}", f"model.source={inputs / 'model'}", f"data.source={inputs / 'corpus.txt'}",
        "data.seq_length=32", "data.num_calibration=8", "data.num_validation=8", "data.num_selection=4",
        "score.block_sizes=[2]", "prune.width.hidden_size=48", "prune.width.ffn_hidden_size=64",
        "prune.width.num_attention_heads=2", "prune.depth.num_layers=2", "distill.steps=8",
        "distill.global_batch_size=8", "distill.lr=3e-3", "distill.min_lr=3e-4", "distill.warmup_steps=1",
        "distill.eval_interval=4", "correct.enabled=true", "correct.steps=2", "correct.global_batch_size=8",
        "correct.lr=1e-3", "correct.min_lr=1e-4", "correct.warmup_steps=0",
    ]


@pytest.fixture(scope="module")
def tiny_run(tiny_hf_run_inputs, tmp_path_factory):
    """Every stage of the demo recipe, shrunk to the tiny model, at TP=1: (run folder, CLI output)."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    out = minitron("run", "--recipe", str(REPO / "recipes" / "demo.yaml"), *tiny_overrides(tiny_hf_run_inputs, run_dir))
    return run_dir, out


def test_tiny_recipe_end_to_end(tiny_run):
    run_dir, out = tiny_run
    assert "| distilled/width |" in out
    results = json.loads((run_dir / "eval.json").read_text())
    assert set(results) == {"teacher", "teacher (corrected)", "pruned/width", "pruned/depth", "distilled/width"}
    # Teacher correction fine-tunes on the train split: the validation loss moves, and it is what gets pruned.
    assert results["teacher (corrected)"]["val_loss"] != results["teacher"]["val_loss"]
    assert json.loads((run_dir / "teacher_corrected" / "history.json").read_text())[-1]["step"] == 2
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

    # The pruned + distilled student's Hugging Face export scores the validation split like the Megatron model.
    from transformers import AutoModelForCausalLM

    from nemo_minitron.pipeline import RunDir

    hf = AutoModelForCausalLM.from_pretrained(run_dir / "distilled" / "width" / "hf").float().eval()
    assert hf.config.hidden_size == 48 and hf.config.num_attention_heads == 2 and hf.config.hidden_act == "silu"
    validation = RunDir(run_dir).split("validation")[:]
    with torch.no_grad():
        logits = hf(validation[:, :-1]).logits
    hf_loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 128), validation[:, 1:].reshape(-1)).item()
    assert hf_loss == pytest.approx(results["distilled/width"]["val_loss"], abs=1e-4)

    # A stage re-runs alone on the run folder and reproduces its numbers.
    (run_dir / "eval.json").rename(run_dir / "eval_first.json")
    minitron("eval", "--run", str(run_dir))
    again = json.loads((run_dir / "eval.json").read_text())
    for label, r in results.items():
        assert again[label]["val_loss"] == pytest.approx(r["val_loss"], abs=1e-6)


def test_tiny_recipe_at_tp2_matches_tp1(tiny_run, tiny_hf_run_inputs, tmp_path):
    """The same recipe on 2 gloo ranks (TP=2 with sequence parallelism): identical scores, teacher and depth-pruned
    losses; KD (fused with the output layer) runs."""
    from safetensors.torch import load_file

    tp1_dir, _ = tiny_run
    run_dir = tmp_path / "tp2"
    minitron("run", "--recipe", str(REPO / "recipes" / "demo.yaml"), *tiny_overrides(tiny_hf_run_inputs, run_dir),
             "parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true",
             "distill.fuse_output_layer=true", "distill.chunk_size=48", nproc=2)
    tp1, tp2 = (json.loads((d / "eval.json").read_text()) for d in (tp1_dir, run_dir))
    for label in ("teacher", "teacher (corrected)", "pruned/depth"):
        assert tp2[label]["val_loss"] == pytest.approx(tp1[label]["val_loss"], abs=1e-4), label
    s1, s2 = (load_file(str(d / "scores" / "scores.safetensors")) for d in (tp1_dir, run_dir))
    for key in s1:
        assert torch.allclose(s1[key], s2[key], rtol=1e-3, atol=1e-5), key
    history = json.loads((run_dir / "distilled" / "width" / "history.json").read_text())
    assert history[-1]["loss"] < history[0]["loss"]


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
    """The real demo recipe on SmolLM2-135M, shortened, with teacher correction on: every stage runs, and
    distillation from the corrected teacher improves the width student."""
    run_dir = tmp_path / "demo"
    out = minitron("demo", f"run_dir={run_dir}", "data.num_calibration=8", "data.num_validation=8",
                   "data.num_selection=4", "distill.steps=3", "distill.warmup_steps=1", "distill.global_batch_size=4",
                   "distill.eval_interval=0", "correct.enabled=true", "correct.steps=2", "correct.warmup_steps=0",
                   "correct.global_batch_size=4", timeout=1500)
    results = json.loads((run_dir / "eval.json").read_text())
    assert abs(results["teacher (corrected)"]["val_loss"] - results["teacher"]["val_loss"]) < 0.5
    assert results["teacher"]["arch"]["num_layers"] == 30
    assert results["teacher"]["val_loss"] < 5.0  # SmolLM2 knows English: far below log(49152) = 10.8
    assert results["pruned/depth"]["arch"]["num_layers"] == 15
    assert results["distilled/width"]["val_loss"] < results["pruned/width"]["val_loss"]
    assert "| teacher |" in out


def test_api_example_runs_and_distillation_lowers_kd_loss():
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "minitron_api.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, last = (float(x) for x in proc.stdout.split("KD loss ")[1].split(";")[0].split(" -> "))
    assert last < first
