"""Stages of a run folder executed by Megatron-Bridge (see recipes.py for what each training stage builds)."""

from __future__ import annotations

from pathlib import Path

from nemo_minitron.bridge.recipes import TRAINING_STAGES, BridgeRun, pruned_provider
from nemo_minitron.config import RecipeConfig
from nemo_minitron.runtime.bridge_shims import bridge_cpu


def launch(run: BridgeRun) -> None:
    """``pretrain(run.config, run.forward_step, run.callbacks)``; on a CPU under bridge_cpu's scoped shims."""
    with bridge_cpu():
        from megatron.bridge.training.pretrain import pretrain

        pretrain(run.config, run.forward_step, callbacks=run.callbacks)


def prune(recipe: RecipeConfig) -> list[Path]:
    """Every prune target as a Megatron-Bridge checkpoint, pruned/NAME/bridge: Bridge's provider builds the
    teacher, the distill stage's pre-wrap hooks load and prune it, and Bridge's ``save_megatron_model`` writes
    it (load it in any Bridge recipe with ``checkpoint.pretrained_checkpoint``). Returns the folders."""
    from nemo_minitron.pipeline import RunDir
    from nemo_minitron.runtime.distributed import destroy_distributed, init_distributed

    run = RunDir(recipe.run_dir)
    written = []
    with bridge_cpu():
        from megatron.bridge.training.model_load_save import save_megatron_model

        init_distributed(recipe.parallel, seed=recipe.data.seed)
        try:
            for name in recipe.prune:
                provider = pruned_provider(recipe, name)
                provider.finalize()  # what Bridge's setup does before it builds a model
                model = provider.provide_distributed_model(wrap_with_ddp=False)
                out = run.pruned(name) / "bridge"
                tokenizer = run.tokenizer if run.tokenizer.exists() else None
                save_megatron_model(model, out, hf_tokenizer_path=tokenizer)
                written.append(out)
        finally:
            destroy_distributed()
    return written
