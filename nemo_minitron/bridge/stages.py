"""Stages of a run folder executed by Megatron-Bridge (see recipes.py for what each training stage builds)."""

from __future__ import annotations

import contextlib
from pathlib import Path

from nemo_minitron.bridge.callbacks import TeacherStages
from nemo_minitron.bridge.overrides import check_bridge_keys
from nemo_minitron.bridge.recipes import TRAINING_STAGES, BridgeRun, pruned_provider
from nemo_minitron.config import RecipeConfig
from nemo_minitron.distillation.teacher import Teacher
from nemo_minitron.runtime.bridge_shims import bridge_cpu


def training_stage(stage: str, recipe: RecipeConfig, bridge_overrides=()) -> BridgeRun:
    """The BridgeRun of ``stage`` (correct-teacher, score, distill) with Bridge-side overrides applied in Bridge's
    syntax (``process_config_with_overrides``, e.g. validation.eval_iters=4); each key must be a field of the
    ConfigContainer (overrides.check_bridge_keys)."""
    from megatron.bridge.training.utils.omegaconf_utils import process_config_with_overrides

    run = TRAINING_STAGES[stage](recipe)
    check_bridge_keys(run.config, bridge_overrides)
    if bridge_overrides:
        try:
            process_config_with_overrides(run.config, cli_overrides=list(bridge_overrides))
        except Exception as err:  # Hydra's parser errors name the key; say which arguments went to Bridge
            raise ValueError(f"Bridge overrides {list(bridge_overrides)} (keys the recipe does not have go to "
                             f"Bridge's ConfigContainer): {err}") from None
    return run


def launch(run: BridgeRun) -> None:
    """``pretrain(run.config, run.forward_step, run.callbacks)``; on a CPU under bridge_cpu's scoped shims. Under
    pipeline parallelism a live teacher's stages run alongside the student's (``TeacherStages``)."""
    with bridge_cpu(), contextlib.ExitStack() as stack:
        from megatron.bridge.training.pretrain import pretrain

        callbacks = list(run.callbacks)
        if run.config.model.pipeline_model_parallel_size > 1 and isinstance(run.forward_step.teacher, Teacher):
            callbacks.append(stack.enter_context(TeacherStages(run.forward_step)))
        pretrain(run.config, run.forward_step, callbacks=callbacks)


def prune(recipe: RecipeConfig) -> list[Path]:
    """Every prune target as a Megatron-Bridge checkpoint, pruned/NAME/bridge: Bridge's provider builds the
    teacher, the distill stage's pre-wrap hooks load and prune it, and Bridge's ``save_megatron_model`` writes
    it (load it in any Bridge recipe with ``checkpoint.pretrained_checkpoint``). The saved config names Bridge's
    own layer-spec function (``bridge_layer_spec``). Returns the folders."""
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
                provider.transformer_layer_spec = bridge_layer_spec(provider)  # what the saved config names
                out = run.pruned(name) / "bridge"
                tokenizer = run.tokenizer if run.tokenizer.exists() else None
                save_megatron_model(model, out, hf_tokenizer_path=tokenizer)
                written.append(out)
        finally:
            destroy_distributed()
    return written


def bridge_layer_spec(provider):
    """Bridge's own layer-spec function for the provider's transformer_impl, with the same parameter names as
    models.build.layer_spec's modules: a Bridge checkpoint's saved config names it, because Bridge's loader
    instantiates only allow-listed ``_target_``s from 0.5 on (megatron.*, not nemo_minitron.*)."""
    from megatron.bridge.models.gpt_provider import local_layer_spec, transformer_engine_layer_spec

    return transformer_engine_layer_spec if provider.transformer_impl == "transformer_engine" else local_layer_spec


def run_all(recipe: RecipeConfig, bridge_overrides=()) -> str:
    """The whole recipe with its training stages in Megatron-Bridge: `minitron prepare`, then Bridge's
    correct-teacher (if enabled), score and distill (pruning the student in its own run), then the project's prune
    (every target, to compare with), eval and report. Returns the report markdown."""
    from nemo_minitron import pipeline
    from nemo_minitron.runtime.distributed import init_distributed

    init_distributed(recipe.parallel, seed=recipe.data.seed)
    pipeline.prepare(recipe)
    for stage in ("correct-teacher", "score", "distill"):
        if stage == "correct-teacher" and not recipe.correct.enabled:
            continue
        pipeline.log(f"\n=== {stage} (Megatron-Bridge) ===")
        with pipeline.timed(pipeline.RunDir(recipe.run_dir), f"{stage} (bridge)"):
            launch(training_stage(stage, recipe, bridge_overrides))
        init_distributed(recipe.parallel, seed=recipe.data.seed)  # Bridge tears down the model-parallel state
    for stage in ("prune", "eval", "report"):
        pipeline.log(f"\n=== {stage} ===")
        result = pipeline.STAGES[stage](recipe)
    return result
