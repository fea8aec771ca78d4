"""Stages of a run folder executed by Megatron-Bridge's ``pretrain()`` (see recipes.py for what each one builds)."""

from __future__ import annotations

from nemo_minitron.bridge.recipes import BridgeRun, correct_run, distill_run, score_run
from nemo_minitron.runtime.bridge_shims import bridge_cpu

STAGES = {"correct-teacher": correct_run, "score": score_run, "distill": distill_run}


def launch(run: BridgeRun) -> None:
    """``pretrain(run.config, run.forward_step, run.callbacks)``; on a CPU under bridge_cpu's scoped shims."""
    with bridge_cpu():
        from megatron.bridge.training.pretrain import pretrain

        pretrain(run.config, run.forward_step, callbacks=run.callbacks)
