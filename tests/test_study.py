"""`minitron study` end to end on the tiny random Llama (every arm, resume), and its summary arithmetic."""

import json

import numpy as np
import pytest

from nemo_minitron.cli import QUICK_STUDY, STUDY_RECIPE
from nemo_minitron.config import load_recipe
from nemo_minitron.study import ARMS, tokens_to_match
from tests.test_pipeline import minitron

STEPS, GLOBAL_BATCH, SEQ_LENGTH = 6, 8, 32


def tiny_study_overrides(inputs, run_dir):
    return [f"run_dir={run_dir}", f"model.source={inputs / 'model'}", f"data.source={inputs / 'corpus.txt'}",
            f"data.seq_length={SEQ_LENGTH}", "data.num_calibration=8", "data.num_validation=8",
            "data.num_selection=4", "score.block_sizes=[2]", "score.screen_tokens=null",
            "prune.width.hidden_size=48", "prune.width.ffn_hidden_size=64", "prune.width.num_attention_heads=2",
            "prune.depth.num_layers=2", "prune.width70.hidden_size=56", "prune.width70.ffn_hidden_size=80",
            "correct.steps=2", "correct.warmup_steps=0", "correct.lr=1e-3", f"distill.steps={STEPS}",
            "distill.eval_interval=3", "distill.warmup_steps=1", "distill.lr=3e-3", "distill.min_lr=3e-4",
            "study.sdg_prompt_tokens=4", "study.sdg_batch_size=8", "search.params=60000", "search.multiple_of=8",
            "search.top_k=2", "search.steps=2"]


def test_tiny_study_runs_every_arm_on_one_budget_and_resumes(tiny_hf_run_inputs, tmp_path, monkeypatch):
    monkeypatch.setenv("MINITRON_CACHE_DIR", str(tmp_path / "cache"))
    run_dir = tmp_path / "study"
    overrides = tiny_study_overrides(tiny_hf_run_inputs, run_dir)
    out = minitron("study", *overrides, timeout=900)
    quality = json.loads((run_dir / "study" / "quality.json").read_text())
    arms = quality["arms"]
    assert set(arms) == set(ARMS) and quality["budget_tokens"] == STEPS * GLOBAL_BATCH * SEQ_LENGTH
    for arm, r in arms.items():
        assert r["tokens"][0] == 0 and r["tokens"][-1] == quality["budget_tokens"], arm
        assert r["final_val_loss"] == r["val_loss"][-1] and np.isfinite(r["val_loss"]).all(), arm
    width = arms["minitron_width"]["arch"]
    for arm in ("width_random_importance", "scratch_lm", "scratch_kd", "sdg_lm", "two_rounds"):
        assert arms[arm]["arch"] == width, arm  # the same student shape
    assert arms["depth_block_search"]["arch"]["num_layers"] == 2
    # the same initial student where the arms share it; different where they must differ
    assert arms["scratch_lm"]["val_loss"][0] == arms["scratch_kd"]["val_loss"][0]
    assert arms["sdg_lm"]["val_loss"][0] == pytest.approx(arms["minitron_width"]["val_loss"][0], abs=1e-6)
    assert arms["width_random_importance"]["val_loss"][0] != arms["minitron_width"]["val_loss"][0]
    # the two depth arms follow their own metric
    scores = json.loads((run_dir / "scores" / "scores.json").read_text())
    plan = json.loads((run_dir / "pruned" / "depth_block_search" / "plan.json").read_text())
    start = min(range(3), key=lambda s: scores["blocks"]["2"][s])
    assert plan["layers_keep"] == [i for i in range(4) if i not in (start, start + 1)]
    influence = np.argsort(scores["layers"]["block_influence"], kind="stable")[:2]
    plan = json.loads((run_dir / "pruned" / "depth_block_influence" / "plan.json").read_text())
    assert plan["layers_keep"] == [i for i in range(4) if i not in influence]
    # sdg_lm trains on teacher-sampled windows that continue prompts taken from the train split
    sdg = np.load(run_dir / "study" / "sdg_train.npy")
    assert sdg.shape == (STEPS * GLOBAL_BATCH, SEQ_LENGTH + 1)
    train = np.load(run_dir / "data" / "train.npy")
    assert len(train) >= STEPS * GLOBAL_BATCH
    assert quality["tokens_to_match"] == tokens_to_match(arms["scratch_lm"], arms["minitron_width"])
    assert "| minitron_width |" in out and (run_dir / "study" / "loss_vs_tokens.png").exists()
    assert (run_dir / "study" / "params_vs_loss.png").exists()
    # the study ends with the architecture search: its top_k before and after the short KD
    search, table = quality["search"], json.loads((run_dir / "search" / "candidates.json").read_text())
    choice = json.loads((run_dir / "search" / "choice.json").read_text())
    top = [r["name"] for r in sorted(table, key=lambda r: r["pruned_rank"])[:2]]
    assert search["candidates"] == len(table) > 2 and [r["name"] for r in search["top_k"]] == top
    after = [r["name"] for r in sorted(search["top_k"], key=lambda r: r["distilled_loss"])]
    assert search["ranking_changed"] == (after != top) == choice["ranking_changed"]
    assert search["chosen"] == after[0] == choice["chosen"]["name"] and "Architecture search within" in out

    # Resume: finished arms are kept; a removed arm is trained again, to the same numbers.
    kept = (run_dir / "study" / "arms" / "scratch_lm.json").stat().st_mtime_ns
    searched = (run_dir / "search" / "choice.json").stat().st_mtime_ns
    (run_dir / "study" / "arms" / "depth_block_search.json").unlink()
    minitron("study", *overrides, timeout=900)
    again = json.loads((run_dir / "study" / "quality.json").read_text())["arms"]
    assert (run_dir / "study" / "arms" / "scratch_lm.json").stat().st_mtime_ns == kept
    assert (run_dir / "search" / "choice.json").stat().st_mtime_ns == searched  # the same search settings
    assert again["depth_block_search"]["val_loss"] == pytest.approx(arms["depth_block_search"]["val_loss"], abs=1e-6)


def test_tokens_to_match_interpolates_or_gives_a_lower_bound():
    minitron = {"final_val_loss": 3.0, "tokens": [0, 100]}
    scratch = {"tokens": [0, 100, 200, 400], "val_loss": [6.0, 4.0, 3.5, 2.5], "final_val_loss": 2.5}
    assert tokens_to_match(scratch, minitron) == {"reached": True, "scratch_tokens": 300.0, "minitron_tokens": 100,
                                                  "ratio": 3.0}
    slow = {"tokens": [0, 100, 200], "val_loss": [6.0, 4.0, 3.5], "final_val_loss": 3.5}
    match = tokens_to_match(slow, {**minitron, "val_loss": [5.0, 3.0]})
    assert not match["reached"] and match["ratio_at_least"] == 2.0
    # the converse: minitron's curve (5.0 -> 3.0 over 100 tokens) reaches slow's final 3.5 at 75 tokens
    assert match["minitron_tokens_to_scratch_final"] == 75.0 and match["converse_ratio"] == 200 / 75


@pytest.mark.parametrize("override, words", [
    (["study.arms=[minitron_width, nope]"], ["study.arms", "nope", "scratch_lm"]),
    (["study.width_target=w"], ["study.width_target", "width70"]),
    (["correct.enabled=false"], ["correct.enabled"]),
])
def test_study_settings_are_checked(override, words, single_process):
    from nemo_minitron.study import Study

    with pytest.raises(ValueError) as err:
        Study(load_recipe(STUDY_RECIPE, QUICK_STUDY + override))
    for word in words:
        assert word in str(err.value)
