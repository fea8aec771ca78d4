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
distilled/search_<i>/.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import replace

from nemo_minitron import pipeline
from nemo_minitron.config import RecipeConfig
from nemo_minitron.pipeline import RunDir, log


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
        d = replace(recipe.distill, steps=s.steps, eval_interval=0, save_interval=0,
                    warmup_steps=min(recipe.distill.warmup_steps, s.steps - 1))
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
