"""NeMo-Run CLI entry points: `nemo minitron STAGE recipe=FILE ...` runs `python -m nemo_minitron.bridge STAGE`.

Discovery: setup.py declares the entry point group ``nemo_run.cli`` with ``minitron = nemo_minitron.bridge.nemo_run``.
NeMo-Run's ``nemo`` command (installed in the NeMo Framework container) loads every module of that group, and the
``@run.cli.entrypoint(namespace="minitron")`` decorators below register one command per stage under ``minitron``.
Only that discovery imports this module (it needs nemo_run, which the CPU test environment does not install).

Inside the container, after `minitron prepare --recipe FILE run_dir=DIR`:

    nemo minitron score recipe=/opt/nemo-minitron/recipes/llama31_8b_to_4b.yaml \\
        'overrides=["run_dir=/results/llama31_8b_to_4b"]' --yes
    nemo minitron distill recipe=/opt/nemo-minitron/recipes/llama31_8b_to_4b.yaml \\
        'overrides=["run_dir=/results/llama31_8b_to_4b", "distill.steps=20", "train.eval_iters=4"]' --yes

The stages are correct-teacher, score, prune and distill; ``overrides`` are the same key=value items that
`python -m nemo_minitron.bridge` takes (recipe keys, or Bridge ConfigContainer keys). Without an ``executor=``
argument the stage runs in the calling process, so under srun / torchrun every rank runs the same command.
"""

from __future__ import annotations

import nemo_run as run

from nemo_minitron.bridge import __main__ as bridge_cli


def _run_stage(stage: str, recipe: str, overrides: list[str] | None) -> int:
    return bridge_cli.main([stage, "--recipe", recipe, *(overrides or [])])


@run.cli.entrypoint(namespace="minitron", name="correct-teacher")
def correct_teacher(recipe: str, overrides: list[str] | None = None) -> int:
    """Fine-tune the teacher on the distillation data (the recipe's `correct` section)."""
    return _run_stage("correct-teacher", recipe, overrides)


@run.cli.entrypoint(namespace="minitron", name="score")
def score(recipe: str, overrides: list[str] | None = None) -> int:
    """Importance scores (width activations, depth metrics) of the teacher on the calibration data."""
    return _run_stage("score", recipe, overrides)


@run.cli.entrypoint(namespace="minitron", name="prune")
def prune(recipe: str, overrides: list[str] | None = None) -> int:
    """Every prune target written as a Megatron-Bridge checkpoint (pruned/NAME/bridge)."""
    return _run_stage("prune", recipe, overrides)


@run.cli.entrypoint(namespace="minitron", name="distill")
def distill(recipe: str, overrides: list[str] | None = None) -> int:
    """Distill the student distill.student (pruned in the run from the scores) from the teacher in Bridge."""
    return _run_stage("distill", recipe, overrides)
