"""`minitron search`: the pruned architecture under a parameter budget (recipe section ``search``).

1. Enumerate targets: every combination of the grid fractions (search.fractions) of the teacher's hidden_size,
   ffn_hidden_size, num_attention_heads (multiples of num_query_groups, kept) and num_layers, rounded to
   search.multiple_of (hidden, ffn), whose parameters lie in [(1 - search.tolerance) x budget, budget] and that
   fit the tensor-parallel size (pruning.plan.validate).
2. Prune each from the teacher by the run's scores (layers by block search where blocks of that size were
   scored, else by Block Influence) and rank them by the LM loss on the selection split.
3. Give the search.top_k best a short distillation (search.steps, other settings: distill) and rank them again on
   the selection split; the best is the choice. Nothing here reads the validation split, which eval reports.
Writes search/candidates.json (every candidate: sizes, params, pruned loss and rank, and for the top-k the loss
and rank after distillation) and search/choice.json (the chosen target and its plan); the chosen student is
distilled/search_<i>/. search/settings.json records what the search ran from (the search and distillation settings,
the teacher's fingerprint, the scores' digest, the tensor-parallel size): a search re-run from other settings
replaces the earlier one's outputs instead of resuming its students.
"""

from __future__ import annotations

import itertools
import json
import shutil
from dataclasses import asdict, replace

from nemo_minitron import pipeline
from nemo_minitron.config import RecipeConfig
from nemo_minitron.pipeline import RunDir, log
from nemo_minitron.runtime.distributed import is_rank0


def _round_to(value: float, multiple: int) -> int:
    return max(multiple, int(round(value / multiple)) * multiple)


def candidates(arch, search, tp_size: int = 1) -> list:
    """The PruneTargets of the grid (see module docstring) within the budget, fewest parameters last."""
    from nemo_minitron.pruning.plan import PruneTarget, validate

    groups = arch.num_query_groups
    options = {
        "hidden_size": {min(arch.hidden_size, _round_to(f * arch.hidden_size, search.multiple_of))
                        for f in search.fractions},
        "ffn_hidden_size": {min(arch.ffn_hidden_size, _round_to(f * arch.ffn_hidden_size, search.multiple_of))
                            for f in search.fractions},
        "num_attention_heads": {min(arch.num_attention_heads, _round_to(f * arch.num_attention_heads, groups))
                                for f in search.fractions},
        "num_layers": {max(1, round(f * arch.num_layers)) for f in search.fractions},
    }
    found = []
    for sizes in itertools.product(*(sorted(v) for v in options.values())):
        target = PruneTarget(**dict(zip(options, sizes)))
        params = target.new_arch(arch).num_parameters()
        if not (1 - search.tolerance) * search.params <= params <= search.params:
            continue
        try:
            validate(arch, target, tp_size=tp_size)
        except ValueError:
            continue
        found.append(target)
    return sorted(found, key=lambda t: -t.new_arch(arch).num_parameters())


def settings(recipe: RecipeConfig) -> dict:
    """What a search of ``recipe`` runs from (the content of search/settings.json)."""
    from megatron.core import parallel_state

    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.models.checkpoint import fingerprint

    run = RunDir(recipe.run_dir)
    teacher = run.require(run.active_teacher(), "prepare")
    scores = ImportanceScores.load(run.require(run.scores, "score"))
    payload = {"search": asdict(recipe.search), "distill": asdict(_distill_settings(recipe)),
               "teacher": fingerprint(teacher), "scores": scores.digest(),
               "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size()}
    return json.loads(json.dumps(payload))  # as read back from the file


def finished(recipe: RecipeConfig) -> dict | None:
    """search/choice.json when a search ran to the end from ``recipe``'s settings, else None."""
    out = RunDir(recipe.run_dir).root / "search"
    if not (out / "choice.json").exists() or not (out / "settings.json").exists():
        return None
    if json.loads((out / "settings.json").read_text()) != settings(recipe):
        return None
    return json.loads((out / "choice.json").read_text())


def _distill_settings(recipe: RecipeConfig):
    """The distillation settings of each top-k candidate: distill, for search.steps, without evaluation or saves."""
    steps = recipe.search.steps
    return replace(recipe.distill, steps=steps, eval_interval=0, save_interval=0,
                   warmup_steps=min(recipe.distill.warmup_steps, steps - 1))


def _replace_stale(run: RunDir, current: dict) -> None:
    """Remove an earlier search's outputs (search/, pruned/search_*, distilled/search_*) when it ran from other
    settings than ``current``; then record ``current`` in search/settings.json."""
    import torch.distributed as dist

    out = run.root / "search"
    path = out / "settings.json"
    previous = json.loads(path.read_text()) if path.exists() else None
    stale = [out, *(run.root / "pruned").glob("search_*"), *(run.root / "distilled").glob("search_*")]
    if previous != current and any(p.exists() for p in stale):
        if previous is None:
            why = "does not record its settings"
        else:
            why = "ran from other " + ", ".join(k for k in current if previous.get(k) != current[k])
        log(f"[search] the search in {out} {why}: its candidates and students are replaced")
        if is_rank0():
            for p in stale:
                shutil.rmtree(p, ignore_errors=True)
    if dist.is_initialized():
        dist.barrier()
    pipeline._write_json(path, current)


def run_search(recipe: RecipeConfig) -> dict:
    """The search of the module docstring; returns the content of search/choice.json."""
    from megatron.core import parallel_state

    from nemo_minitron.evaluation.loss import validation_loss
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.models.checkpoint import fingerprint, load_arch
    from nemo_minitron.pruning.apply import apply_plan
    from nemo_minitron.pruning.plan import make_plan

    run = RunDir(recipe.run_dir)
    s = recipe.search
    if s.params is None:
        raise ValueError("minitron search needs a budget: set search.params (the most parameters of the student)")
    out = run.root / "search"
    teacher = run.require(run.active_teacher(), "prepare")
    _replace_stale(run, settings(recipe))
    arch = load_arch(teacher)
    scores = ImportanceScores.load(run.require(run.scores, "score"))
    found = candidates(arch, s, parallel_state.get_tensor_model_parallel_world_size())
    if not found:
        raise ValueError(f"search.params={s.params:.4g}: no candidate of the grid has between "
                         f"{(1 - s.tolerance) * s.params:.4g} and {s.params:.4g} parameters (the teacher has "
                         f"{arch.num_parameters():.4g}); widen search.fractions or search.tolerance")
    selection = pipeline._local_split(run.split("selection"))
    mb = recipe.eval.micro_batch_size
    found = [target if arch.num_layers - target.num_layers in (0, *scores.blocks)
             else replace(target, layer_metric="block_influence") for target in found]
    table = []
    with pipeline.timed(run, "search"):
        for i, target in enumerate(found):
            model, _ = pipeline._load(teacher, recipe, local=True)
            new_arch = apply_plan(model, arch, make_plan(arch, scores, target))
            loss = validation_loss(model, selection, mb)
            table.append({"name": f"search_{i}", "target": _sizes(target), "params": new_arch.num_parameters(),
                          "pruned_loss": loss})
            log(f"[search] {i + 1}/{len(found)} {_sizes(target)}: {new_arch.num_parameters() / 1e6:.1f}M "
                f"parameters, pruned selection loss {loss:.4f}")
        for rank, row in enumerate(sorted(table, key=lambda r: r["pruned_loss"])):
            row["pruned_rank"] = rank
        top = sorted(table, key=lambda r: r["pruned_rank"])[:s.top_k]
        d = _distill_settings(recipe)
        for row in top:
            target = found[int(row["name"].split("_")[1])]
            pipeline.prune_model(recipe, teacher, scores, target, run.pruned(row["name"]))
            student, student_arch = pipeline._load(run.pruned(row["name"]), recipe)
            pipeline.distill_model(recipe, student, student_arch, run.distilled(row["name"]), d, teacher,
                                   fingerprint(run.pruned(row["name"])))
            row["distilled_loss"] = validation_loss(student, selection, mb)
            log(f"[search] {row['name']} after {s.steps} distillation steps: selection loss "
                f"{row['distilled_loss']:.4f} (pruned rank {row['pruned_rank']})")
        for rank, row in enumerate(sorted(top, key=lambda r: r["distilled_loss"])):
            row["distilled_rank"] = rank
        best = min(top, key=lambda r: r["distilled_loss"])
        choice = {"chosen": best, "ranking_changed": [r["name"] for r in sorted(top, key=lambda r: r["pruned_rank"])]
                  != [r["name"] for r in sorted(top, key=lambda r: r["distilled_rank"])],
                  "plan": json.loads((run.pruned(best["name"]) / "plan.json").read_text()),
                  "student": str(run.distilled(best["name"]))}
        pipeline._write_json(out / "candidates.json", table)
        pipeline._write_json(out / "choice.json", choice)
    log(f"[search] chose {best['name']} {best['target']} ({best['params'] / 1e6:.1f}M); the ranking "
        f"{'changed' if choice['ranking_changed'] else 'did not change'} after distillation -> {out}")
    return choice


def _sizes(target) -> dict:
    return {name: getattr(target, name) for name in
            ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_layers", "layer_metric")}
