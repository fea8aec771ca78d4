"""The whole recipe end to end through the `minitron` CLI, on a tiny random Llama (fast) and SmolLM2 (slow)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nemo_minitron.importance.depth import block_losses
from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.models.checkpoint import load_checkpoint
from nemo_minitron.pipeline import RunDir

REPO = Path(__file__).resolve().parent.parent


def run_minitron(*args, timeout=900, nproc=1) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh process (under torch.distributed.run with ``nproc`` gloo ranks when > 1)."""
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    return subprocess.run([sys.executable, *launcher, "-m", "nemo_minitron.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def minitron(*args, timeout=900, nproc=1):
    """run_minitron, which must succeed; its stdout."""
    proc = run_minitron(*args, timeout=timeout, nproc=nproc)
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


def test_cached_teacher_distils_like_the_live_teacher_and_is_reused(tiny_run, tmp_path, monkeypatch, single_process):
    """distill.cached_teacher_top_k=128 (the whole vocabulary: the top-K forward KL is then the full one) trains the
    same student as the live teacher; the cache is written once, named by its content, and reused by a second run;
    another K writes another cache."""
    import shutil

    tp1_dir, _ = tiny_run
    cache = tmp_path / "cache"
    monkeypatch.setenv("MINITRON_CACHE_DIR", str(cache))
    runs = []
    for name, k in (("a", 128), ("b", 128), ("c", 16)):
        run_dir = tmp_path / name
        shutil.copytree(tp1_dir, run_dir, ignore=lambda d, names: ["distilled"] if d == str(tp1_dir) else [])
        minitron("distill", "--run-dir", str(run_dir), f"distill.cached_teacher_top_k={k}")
        runs.append(run_dir)
        files = sorted((cache / "teacher_cache").iterdir())
        if name == "a":
            first = (files[0], files[0].stat().st_mtime_ns)
    assert len(files) == 2 and first[0] in files and first[0].stat().st_mtime_ns == first[1]
    live = json.loads((tp1_dir / "distilled" / "width" / "history.json").read_text())
    for run_dir in runs[:2]:
        cached = json.loads((run_dir / "distilled" / "width" / "history.json").read_text())
        assert [e["loss"] for e in cached] == pytest.approx([e["loss"] for e in live], abs=1e-4)
    live_model, _ = load_checkpoint(tp1_dir / "distilled" / "width", transformer_impl="local")
    cached_model, _ = load_checkpoint(runs[0] / "distilled" / "width", transformer_impl="local")
    for (name, a), b in zip(live_model.state_dict().items(), cached_model.state_dict().values()):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
    top16 = json.loads((runs[2] / "distilled" / "width" / "history.json").read_text())
    assert top16[-1]["loss"] != pytest.approx(live[-1]["loss"], abs=1e-6)  # K=16 < vocabulary: another objective


def test_two_rounds_prune_and_distil_from_the_previous_round(tiny_run, tmp_path, single_process):
    """rounds: round 2 scores round 1's distilled student, prunes its target from it, and distils from it: its
    first KD loss is the forward KL of the pruned round-2 student to the distilled round-1 student."""
    import shutil

    from nemo_minitron.data.order import global_batch
    from nemo_minitron.distillation.losses import VocabParallelKDLoss
    from nemo_minitron.models.build import forward_logits

    tp1_dir, _ = tiny_run
    run_dir = tmp_path / "rounds"
    shutil.copytree(tp1_dir, run_dir, ignore=lambda d, names: ["distilled", "pruned"] if d == str(tp1_dir) else [])
    minitron("rounds", "--run-dir", str(run_dir), "prune.w70.hidden_size=56", "prune.w70.ffn_hidden_size=80",
             "prune.w50.hidden_size=48", "prune.w50.ffn_hidden_size=64", "prune.w50.num_attention_heads=2",
             "rounds=[{target: w70, steps: 3}, {target: w50, steps: 3}]", "distill.warmup_steps=1")
    run = RunDir(run_dir)
    round2_scores = ImportanceScores.load(run_dir / "rounds" / "w70" / "scores")
    assert round2_scores.hidden.shape == (56,) and round2_scores.ffn.shape == (4, 80)
    for name, hidden in (("w70", 56), ("w50", 48)):
        history = json.loads((run.distilled(name) / "history.json").read_text())
        assert [e["step"] for e in history] == [1, 2, 3]
        assert json.loads((run.distilled(name) / "arch.json").read_text())["hidden_size"] == hidden
    student, _ = load_checkpoint(run.pruned("w50"), transformer_impl="local")
    teacher, _ = load_checkpoint(run.distilled("w70"), transformer_impl="local")
    batch = global_batch(run.split("train"), 0, 8, seed=1234)
    with torch.no_grad():
        tokens = batch[:, :-1]
        expected = VocabParallelKDLoss("forward_kl")(forward_logits(student, tokens), forward_logits(teacher, tokens))
    first = json.loads((run.distilled("w50") / "history.json").read_text())[0]
    assert first["kd_loss"] == pytest.approx(expected.mean().item(), abs=1e-4)


def test_search_ranks_candidates_within_the_budget_then_after_distillation(tiny_run, tmp_path, single_process):
    """minitron search: each candidate's pruned loss is that of pruning it alone and evaluating the selection
    split; the top 3 are distilled and the choice is the lowest selection loss after distillation."""
    import shutil

    from nemo_minitron.config import load_recipe
    from nemo_minitron.evaluation.loss import validation_loss
    from nemo_minitron.pipeline import prune_model
    from nemo_minitron.pruning.plan import PruneTarget

    tp1_dir, _ = tiny_run
    run_dir = tmp_path / "search"
    shutil.copytree(tp1_dir, run_dir, ignore=lambda d, names: ["distilled", "pruned"] if d == str(tp1_dir) else [])
    settings = ["search.params=60000", "search.steps=3", "search.multiple_of=8"]
    minitron("search", "--run-dir", str(run_dir), *settings)
    table = json.loads((run_dir / "search" / "candidates.json").read_text())
    choice = json.loads((run_dir / "search" / "choice.json").read_text())
    assert len(table) >= 4 and all(0.95 * 60000 <= row["params"] <= 60000 for row in table)
    assert sorted(row["pruned_rank"] for row in table) == list(range(len(table)))
    run = RunDir(run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml", [f"run_dir={run_dir}", *settings])
    selection = run.split("selection")[:]
    row = table[-1]
    prune_model(recipe, run.active_teacher(), ImportanceScores.load(run.scores), PruneTarget(**row["target"]),
                tmp_path / "alone")
    alone, _ = load_checkpoint(tmp_path / "alone", transformer_impl="local")
    assert validation_loss(alone, selection, 4) == pytest.approx(row["pruned_loss"], abs=1e-5)
    top = [r for r in table if "distilled_loss" in r]
    assert sorted(r["pruned_rank"] for r in top) == [0, 1, 2]
    assert choice["chosen"] == min(top, key=lambda r: r["distilled_loss"])
    chosen, _ = load_checkpoint(choice["student"], transformer_impl="local")
    assert validation_loss(chosen, selection, 4) == pytest.approx(choice["chosen"]["distilled_loss"], abs=1e-5)
    assert choice["plan"]["arch"]["hidden_size"] == choice["chosen"]["target"]["hidden_size"]

    # From other settings the search starts again: the earlier students are replaced, not resumed.
    minitron("search", "--run-dir", str(run_dir), "search.params=60000", "search.steps=2", "search.multiple_of=8",
             "search.top_k=2")
    again = json.loads((run_dir / "search" / "candidates.json").read_text())
    assert [r["pruned_loss"] for r in again] == pytest.approx([r["pruned_loss"] for r in table], abs=1e-6)
    top2 = sorted(r["name"] for r in again if "distilled_loss" in r)
    assert top2 == sorted(r["name"] for r in top if r["pruned_rank"] < 2)
    assert sorted(p.name for p in (run_dir / "distilled").iterdir()) == top2
    for name in top2:
        assert json.loads((run.distilled(name) / "history.json").read_text())[-1]["step"] == 2
    assert json.loads((run_dir / "search" / "settings.json").read_text())["search"]["steps"] == 2


def test_block_search_by_task_metric(tiny_run, tiny_task_path, tmp_path, single_process):
    """score.block_task: every block is scored on an lm_eval task with the block removed, equal to the task score
    of the model pruned to drop that block; the depth target then drops the block of the highest accuracy."""
    import shutil

    from nemo_minitron.config import load_recipe
    from nemo_minitron.evaluation.lm_eval_adapter import evaluate_tasks
    from nemo_minitron.pipeline import prune_model
    from nemo_minitron.pruning.plan import PruneTarget
    from transformers import AutoTokenizer

    tp1_dir, _ = tiny_run
    run_dir = tmp_path / "task_blocks"
    shutil.copytree(tp1_dir, run_dir, ignore=lambda d, names: ["distilled", "pruned", "scores"]
                    if d == str(tp1_dir) else [])
    settings = ["score.block_task=tiny_mc", "score.block_task_metric=acc_norm", f"eval.task_path={tiny_task_path}"]
    minitron("score", "--run-dir", str(run_dir), *settings)
    minitron("prune", "--run-dir", str(run_dir), *settings)
    run = RunDir(run_dir)
    scores = ImportanceScores.load(run.scores)
    values = scores.meta["block_task"]["values"]["2"]
    assert sorted(values) == ["0", "1", "2"] and scores.meta["block_task"]["metric"] == "acc_norm"
    recipe = load_recipe(run_dir / "recipe.yaml", [f"run_dir={run_dir}", *settings])
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer)
    for start in range(3):
        out = tmp_path / f"drop{start}"
        prune_model(recipe, run.active_teacher(), scores, PruneTarget(drop_layers=[start, start + 1]), out)
        model, _ = load_checkpoint(out, transformer_impl="local")
        expected = evaluate_tasks(model, tokenizer, ["tiny_mc"], include_path=str(tiny_task_path))["tiny_mc"]
        assert values[str(start)] == pytest.approx(expected["acc_norm"]), start
    best = max(range(3), key=lambda s: (values[str(s)], -s))
    plan = json.loads((run.pruned("depth") / "plan.json").read_text())
    assert plan["layers_keep"] == [i for i in range(4) if i not in (best, best + 1)]


def test_resume_refuses_a_re_pruned_student_and_applies_new_schedule(tiny_run, tmp_path):
    """distill on a run folder whose train_state came from another pruned student is refused (naming what
    changed) instead of resuming the old model; more steps on the same inputs resume and the change is logged."""
    import shutil

    tp1_dir, _ = tiny_run
    run_dir = tmp_path / "stale"
    shutil.copytree(tp1_dir, run_dir)
    out = minitron("distill", "--run-dir", str(run_dir), "distill.steps=10", "distill.lr=4e-3")
    assert "[resume] steps: 8 in iter_0000008 -> 10" in out and "[resume] lr: 0.003 in iter_0000008 -> 0.004" in out
    history = json.loads((run_dir / "distilled" / "width" / "history.json").read_text())
    assert history[-1]["step"] == 10 and [h["step"] for h in history][:4] == [1, 2, 3, 4]
    minitron("prune", "--run-dir", str(run_dir), "prune.width.ffn_hidden_size=48")
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "nemo_minitron.cli", "distill", "--run-dir", str(run_dir),
                           "prune.width.ffn_hidden_size=48"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode != 0
    assert "holds training state from other inputs (student changed" in proc.stdout + proc.stderr


def test_stages_refuse_outputs_made_from_other_inputs_and_non_finite_models(tiny_run, tmp_path, single_process):
    """distill refuses a pruned student made from other scores or another teacher than the run's, prune refuses
    scores of another teacher (each naming the folder and the stage to re-run), and a diverging teacher correction
    stops naming its step without writing a teacher."""
    import shutil
    from dataclasses import replace

    from nemo_minitron import pipeline
    from nemo_minitron.config import load_recipe

    tp1_dir, _ = tiny_run
    run_dir = tmp_path / "made_from"
    shutil.copytree(tp1_dir, run_dir, ignore=lambda d, names: ["distilled"] if d == str(tp1_dir) else [])
    recipe = load_recipe(run_dir / "recipe.yaml", [f"run_dir={run_dir}"])
    run = RunDir(run_dir)
    scores = ImportanceScores.load(run.scores)
    scores.heads = scores.heads.flip(-1)  # scored again, e.g. on other calibration data
    scores.save(run.scores)
    with pytest.raises(ValueError, match=r"pruned/width was pruned by other importance scores than those in .*"
                                         r"scores \(scored again after pruning\): run `minitron prune` again"):
        pipeline.distill(recipe)
    pipeline.prune(recipe)
    pipeline._check_made_from(run, run.pruned("width"))  # consistent again

    shutil.rmtree(run.teacher_corrected)  # the teacher corrected again, for longer, after scoring
    pipeline.correct(replace(recipe, correct=replace(recipe.correct, steps=3)))
    with pytest.raises(ValueError, match=r"the scores in .*scores were computed from another model than the teacher "
                                         r".*teacher_corrected .*run `minitron score` again"):
        pipeline.prune(recipe)
    with pytest.raises(ValueError, match=r"pruned/width was pruned from another model than the teacher "
                                         r".*teacher_corrected"):
        pipeline.distill(recipe)

    shutil.rmtree(run.teacher_corrected)
    with pytest.raises(FloatingPointError, match=r"training step \d+: (lm loss|grad norm) is (nan|inf)"):
        pipeline.correct(replace(recipe, correct=replace(recipe.correct, lr=1e30, min_lr=1e30)))
    assert not (run.teacher_corrected / "arch.json").exists()


def test_eval_stage_scores_lm_eval_tasks(tiny_run, tiny_hf_run_inputs, tiny_task_path, tmp_path, single_process,
                                         capsys):
    """With eval.tasks the eval stage (here in-process, on a copy of the tiny run) also scores every model on
    lm_eval tasks, under "tasks" in eval.json; the teacher's scores are those of lm_eval's HFLM on the Hugging Face
    checkpoint it was converted from, and the validation losses are unchanged."""
    import shutil

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nemo_minitron import pipeline
    from nemo_minitron.config import load_recipe

    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run[0], run_dir)
    recipe = load_recipe(run_dir / "recipe.yaml", [f"run_dir={run_dir}", "eval.tasks=[tiny_mc]",
                                                   f"eval.task_path={tiny_task_path}"])
    results = pipeline.evaluate(recipe)
    out = capsys.readouterr().out
    written, before = (json.loads((d / "eval.json").read_text()) for d in (run_dir, tiny_run[0]))
    assert set(written) == set(before) == set(results)
    for label, r in written.items():
        assert r["val_loss"] == pytest.approx(before[label]["val_loss"], abs=1e-6), label
        assert r["tasks"] == results[label]["tasks"] and r["tasks"]["tiny_mc"]["sample_len"] == 12, label
        assert f"[eval] {label:24s} tiny_mc: " in out, label
    hf = AutoModelForCausalLM.from_pretrained(tiny_hf_run_inputs / "model", attn_implementation="eager").eval()
    hflm = HFLM(pretrained=hf, tokenizer=AutoTokenizer.from_pretrained(tiny_hf_run_inputs / "model"), batch_size=4)
    expected = simple_evaluate(model=hflm, tasks=["tiny_mc"], log_samples=False, task_manager=TaskManager(
        include_path=str(tiny_task_path), include_defaults=False))["results"]["tiny_mc"]
    assert written["teacher"]["tasks"]["tiny_mc"]["acc"] == expected["acc,none"]
    assert written["teacher"]["tasks"]["tiny_mc"]["acc_norm"] == expected["acc_norm,none"]


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
def test_smollm2_demo_few_steps(tmp_path, single_process):
    """The real demo recipe on SmolLM2-135M, shortened, with teacher correction on: every stage runs, and
    distillation from the corrected teacher improves the width student. The demo's screened block search
    (score.screen_tokens) picks the block that the exhaustive search (a whole-model pass per block) picks."""
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
    run = RunDir(run_dir)
    scores = ImportanceScores.load(run.scores)
    assert scores.meta["screen_tokens"] == 32 and len(scores.meta["block_confirmed"]["15"]) == 3
    model, _ = load_checkpoint(run.active_teacher(), transformer_impl="local")
    exhaustive = block_losses(model, run.split("selection")[:], 15, micro_batch_size=4)
    assert scores.best_block(15) == (int(exhaustive.argmin()), pytest.approx(exhaustive.min().item(), abs=1e-4))
    plan = json.loads((run.pruned("depth") / "plan.json").read_text())
    start = int(exhaustive.argmin())
    assert plan["layers_keep"] == [i for i in range(30) if not start <= i < start + 15]


def test_api_example_runs_and_distillation_lowers_kd_loss():
    env = dict(os.environ, TORCHDYNAMO_DISABLE="1", PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "minitron_api.py")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    first, last = (float(x) for x in proc.stdout.split("KD loss ")[1].split(";")[0].split(" -> "))
    assert last < first
