"""Recipes as Megatron-Bridge ConfigContainers.

``container`` is the one translation of a training stage's settings (TrainStageConfig: steps, batch sizes, LR
schedule, weight decay, clipping) into Bridge's configs; the stage builders wire it to a run folder made by
`minitron prepare` / `minitron score`:

  correct_run(recipe)   LM fine-tune of the teacher (teacher correction)
  distill_run(recipe)   the student built as the teacher, pruned in place by a pre-wrap hook, distilled from the
                        teacher with the project's ForwardStep
  score_run(recipe)     Bridge's evaluation pass over the calibration split with the ImportanceCallback

The container runs the recipe's model.params_dtype (bf16 / fp16: Megatron's mixed precision with fp32 master
weights), activation recompute and parallel.use_distributed_optimizer; on a GPU it overlaps grad-reduce (and, with
the distributed optimizer, param-gather) with compute. Bridge-side settings can then be changed with
Bridge's own override syntax (``process_config_with_overrides``, e.g. ``train.train_iters=20``).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import torch

from nemo_minitron.bridge.callbacks import HistoryCallback, ImportanceCallback, SaveCheckpoint
from nemo_minitron.bridge.data import PackedSequences
from nemo_minitron.bridge.model import ApplyPlan, AttachProjections, LoadWeights, TeacherFromCheckpoint, gpt_provider
from nemo_minitron.config import RecipeConfig, TrainStageConfig
from nemo_minitron.data.packing import indexed_dataset_prefix
from nemo_minitron.distillation.forward_step import ForwardStep
from nemo_minitron.models.checkpoint import load_arch
from nemo_minitron.pipeline import RunDir, build_kwargs
from nemo_minitron.runtime.absent_imports import absent_imports

with absent_imports():
    from megatron.bridge.training import config as bridge_config
    from megatron.bridge.training.mixed_precision import get_mixed_precision_config
    from megatron.bridge.training.tokenizers.config import TokenizerConfig

# (model.params_dtype, model.fp8) -> Bridge's mixed-precision preset. Bridge copies every precision field of the
# preset onto the model, optimizer and DDP configs (runtime_config_update), so the preset must carry the FP8 recipe.
PRECISION_PRESETS = {
    (torch.bfloat16, None): "bf16_mixed",
    (torch.float16, None): "fp16_mixed",
    (torch.bfloat16, "delayed"): "bf16_with_fp8_delayed_scaling_mixed",
    (torch.bfloat16, "tensorwise"): "bf16_with_fp8_current_scaling_mixed",
    (torch.float16, "delayed"): "fp16_with_fp8_delayed_scaling_mixed",
    (torch.float16, "tensorwise"): "fp16_with_fp8_current_scaling_mixed",
}


class BridgeRun(NamedTuple):
    """What ``pretrain(config, forward_step, callbacks)`` needs for one stage."""

    config: object  # ConfigContainer
    forward_step: ForwardStep
    callbacks: list


def container(model, dataset, train: TrainStageConfig, *, seed: int, checkpoint_dir: str | Path | None = None,
              eval_iters: int = 0, skip_train: bool = False, tokenizer=None, use_distributed_optimizer: bool = False):
    """ConfigContainer training ``model`` (a GPTModelProvider) on ``dataset`` with ``train``'s settings: Adam
    (beta 0.9 / 0.95), linear warmup from 0 then cosine decay to min_lr over the run, constant weight decay,
    gradient clipping; per-token loss normalisation; the model's params_dtype and FP8 recipe as Bridge's
    mixed-precision preset (``mixed_precision``: 16-bit weights, fp32 master weights); use_distributed_optimizer
    shards the master weights and Adam's states. checkpoint_dir: Bridge checkpoints every train.save_interval steps
    (0: at the end) and resume from there. eval_iters: validation batches per evaluation (every
    train.eval_interval steps, 0: at the end only), in ``validation`` from Bridge 0.4 on (its ValidationConfig),
    in ``train`` before."""
    gpu = torch.cuda.is_available()
    bf16, fp16 = model.params_dtype == torch.bfloat16, model.params_dtype == torch.float16
    checkpoint_dir = None if checkpoint_dir is None else str(checkpoint_dir)
    validation = dict(eval_iters=eval_iters, eval_interval=train.eval_interval or train.steps, skip_train=skip_train)
    if hasattr(bridge_config, "ValidationConfig"):  # Bridge >= 0.4: TrainingConfig's eval_* / skip_train deprecated
        train_fields, extra = {}, dict(validation=bridge_config.ValidationConfig(**validation))
    else:
        train_fields, extra = validation, {}
    return bridge_config.ConfigContainer(
        train=bridge_config.TrainingConfig(
            train_iters=train.steps, micro_batch_size=train.micro_batch_size,
            global_batch_size=train.global_batch_size, **train_fields),
        model=model,
        optimizer=bridge_config.OptimizerConfig(
            optimizer="adam", lr=train.lr, min_lr=train.min_lr, weight_decay=train.weight_decay,
            clip_grad=train.clip_grad, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8, fp16=fp16, bf16=bf16,
            params_dtype=model.params_dtype, use_distributed_optimizer=use_distributed_optimizer),
        scheduler=bridge_config.SchedulerConfig(
            lr_decay_style="cosine", lr_warmup_iters=train.warmup_steps, lr_decay_iters=train.steps,
            lr_warmup_init=0.0, start_weight_decay=train.weight_decay, end_weight_decay=train.weight_decay,
            weight_decay_incr_style="constant"),
        ddp=bridge_config.DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=use_distributed_optimizer, overlap_grad_reduce=gpu,
            overlap_param_gather=gpu and use_distributed_optimizer),
        dataset=dataset,
        logger=bridge_config.LoggerConfig(log_interval=1),
        tokenizer=tokenizer or TokenizerConfig(tokenizer_type="NullTokenizer", vocab_size=model.vocab_size),
        checkpoint=bridge_config.CheckpointConfig(
            save=checkpoint_dir, load=checkpoint_dir, save_interval=train.save_interval or train.steps,
            ckpt_format="torch_dist"),
        dist=bridge_config.DistributedInitConfig(distributed_backend="nccl" if gpu else "gloo"),
        rng=bridge_config.RNGConfig(seed=seed),
        mixed_precision=mixed_precision(model),
        **extra,
    )


def mixed_precision(model):
    """Bridge's MixedPrecisionConfig for the provider's params_dtype and FP8 recipe (PRECISION_PRESETS), or None
    for float32. FP8 primary weights (the presets' fp8_param_gather) are turned off: the pre-wrap hooks load and
    prune 16-bit weights, and the teacher keeps 16-bit weights too; FP8 compute is unchanged."""
    fp8 = model.fp8_recipe if model.fp8 else None
    if model.params_dtype == torch.float32:
        if fp8 is not None:
            raise ValueError("model.fp8 through Megatron-Bridge needs model.params_dtype bf16 or fp16 (Bridge's FP8 "
                             "presets are 16-bit mixed precision), got fp32")
        return None
    config = get_mixed_precision_config(PRECISION_PRESETS[(model.params_dtype, fp8)])
    config.fp8_param_gather = False
    return config


def _provider(recipe: RecipeConfig, arch, local: bool = False):
    """The GPTModelProvider of ``arch`` for the recipe's layout (``local``: the local layer spec, which scoring
    hooks)."""
    p = recipe.parallel
    return gpt_provider(arch, seq_length=recipe.data.seq_length,
                        tensor_model_parallel_size=p.tensor_model_parallel_size,
                        pipeline_model_parallel_size=p.pipeline_model_parallel_size, **build_kwargs(recipe, local))


def _dataset(recipe: RecipeConfig, run):
    """The run folder's packed splits, or (data.source an indexed dataset PREFIX) Bridge's GPTDatasetConfig over
    it, tokenised with the teacher's Hugging Face tokenizer."""
    prefix = indexed_dataset_prefix(recipe.data.source)
    if prefix is None:
        return PackedSequences(train_path=str(run.data / "train.npy"),
                               validation_path=str(run.data / "validation.npy"), seed=recipe.data.seed), None
    dataset = bridge_config.GPTDatasetConfig(
        random_seed=recipe.data.seed, seq_length=recipe.data.seq_length, blend=[[prefix], None], split="99,1,0",
        reset_position_ids=False, reset_attention_mask=False, eod_mask_loss=False, num_workers=2,
        dataloader_type="single")
    return dataset, TokenizerConfig(tokenizer_type="HuggingFaceTokenizer", tokenizer_model=str(run.tokenizer))


def correct_run(recipe: RecipeConfig) -> BridgeRun:
    """Teacher correction through Bridge: the teacher, loaded from the run folder, fine-tuned with the LM loss;
    the result is saved to the run folder's teacher_corrected/ (the project's checkpoint format)."""
    run = RunDir(recipe.run_dir)
    teacher_dir = run.require(run.teacher, "prepare")
    arch = load_arch(teacher_dir)
    model = _provider(recipe, arch)
    model.register_pre_wrap_hook(LoadWeights(teacher_dir))
    dataset, tokenizer = _dataset(recipe, run)
    out = run.teacher_corrected
    config = container(model, dataset, recipe.correct, seed=recipe.data.seed, checkpoint_dir=out / "bridge_state",
                       use_distributed_optimizer=recipe.parallel.use_distributed_optimizer,
                       eval_iters=_eval_iters(recipe, recipe.correct), tokenizer=tokenizer)
    return BridgeRun(config, ForwardStep(), [HistoryCallback(out / "history.json"), SaveCheckpoint(arch, out)])


def pruned_provider(recipe: RecipeConfig, target: str):
    """The GPTModelProvider of the student ``target`` (a key of recipe.prune): built as the run's (corrected)
    teacher, then loaded and pruned in place by pre-wrap hooks (LoadWeights, ApplyPlan) with the plan made from the
    run's scores. The target is checked against the teacher and the scores here, before Bridge starts."""
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.pruning.plan import validate

    run = RunDir(recipe.run_dir)
    if target not in recipe.prune:
        raise ValueError(f"distill.student: {target!r} is not a prune target; allowed: {sorted(recipe.prune)}")
    teacher_dir = run.active_teacher()
    arch = load_arch(teacher_dir)
    scores = ImportanceScores.load(run.require(run.scores, "score"))
    validate(arch, recipe.prune[target], recipe.parallel.tensor_model_parallel_size, scores)
    model = _provider(recipe, arch)
    model.register_pre_wrap_hook(LoadWeights(teacher_dir))
    model.register_pre_wrap_hook(ApplyPlan(arch, scores, recipe.prune[target]))
    return model


def distill_run(recipe: RecipeConfig) -> BridgeRun:
    """Distillation through Bridge: the student of ``pruned_provider`` (pruned in the run by a pre-wrap hook),
    distilled from the teacher (loaded by a further hook, same parallel layout) with the project's ForwardStep.
    The student is saved to the run folder's distilled/NAME/ (the project's checkpoint format + Hugging Face)."""
    from nemo_minitron.distillation.intermediate import IntermediateLoss
    from nemo_minitron.distillation.losses import VocabParallelKDLoss

    run = RunDir(recipe.run_dir)
    d = recipe.distill
    teacher_dir = run.active_teacher()
    arch = load_arch(teacher_dir)
    model = pruned_provider(recipe, d.student)
    teacher = TeacherFromCheckpoint(teacher_dir, **build_kwargs(recipe))
    model.register_pre_wrap_hook(teacher)
    intermediate = None
    if d.intermediate_pairs:
        intermediate = IntermediateLoss(d.intermediate_pairs, kind=d.intermediate_loss, weight=d.intermediate_weight,
                                        balance=d.balance_losses)
        model.register_pre_wrap_hook(AttachProjections(intermediate, teacher, seed=recipe.data.seed))
    dataset, tokenizer = _dataset(recipe, run)
    out = run.distilled(d.student)
    config = container(model, dataset, d, seed=recipe.data.seed, checkpoint_dir=out / "bridge_state",
                       use_distributed_optimizer=recipe.parallel.use_distributed_optimizer,
                       eval_iters=_eval_iters(recipe, d), tokenizer=tokenizer)
    loss = VocabParallelKDLoss(kind=d.loss, temperature=d.temperature, top_k=d.top_k, chunk_size=d.chunk_size)
    forward_step = ForwardStep(teacher, loss, lm_loss_weight=d.lm_loss_weight, intermediate=intermediate,
                               fuse_output_layer=d.fuse_output_layer)
    forward_step.check_layout(model.pipeline_model_parallel_size)
    save = SaveCheckpoint(arch, out, hf_tokenizer=run.tokenizer, export_hf=True)
    return BridgeRun(config, forward_step, [HistoryCallback(out / "history.json"), save])


def score_run(recipe: RecipeConfig) -> BridgeRun:
    """Importance scoring through Bridge: an evaluation-only run over the calibration split whose passes feed the
    ImportanceCallback; the loss-based depth metrics use the selection split (data.num_selection sequences held
    out from validation). Writes the
    run folder's scores/ (what `minitron prune` reads)."""
    run = RunDir(recipe.run_dir)
    s = recipe.score
    teacher_dir = run.active_teacher()
    arch = load_arch(teacher_dir)
    model = _provider(recipe, arch, local=True)
    model.register_pre_wrap_hook(LoadWeights(teacher_dir))
    calibration = run.split("calibration")
    dataset = PackedSequences(train_path=str(run.data / "calibration.npy"),
                              validation_path=str(run.data / "calibration.npy"), seed=recipe.data.seed)
    batches = TrainStageConfig(steps=1, micro_batch_size=s.micro_batch_size, global_batch_size=s.micro_batch_size,
                               warmup_steps=0)
    config = container(model, dataset, batches, seed=recipe.data.seed,
                       eval_iters=calibration.shape[0] // s.micro_batch_size, skip_train=True)
    callback = ImportanceCallback(arch, run.scores, seq_agg=s.seq_agg, batch_agg=s.batch_agg,
                                  depth_metrics=s.depth_metrics, block_sizes=s.block_sizes,
                                  screen_tokens=s.screen_tokens, screen_keep=s.screen_keep,
                                  validation=run.split("selection")[:], micro_batch_size=s.micro_batch_size)
    return BridgeRun(config, ForwardStep(), [callback])


def _eval_iters(recipe: RecipeConfig, train: TrainStageConfig) -> int:
    """Validation batches per evaluation: the whole validation split (data.num_validation sequences)."""
    if recipe.data.num_validation < train.global_batch_size:
        raise ValueError(f"data.num_validation ({recipe.data.num_validation}) must be at least one global batch "
                         f"({train.global_batch_size}): Bridge evaluates whole global batches")
    return recipe.data.num_validation // train.global_batch_size


RECIPES = Path(__file__).resolve().parent.parent.parent / "recipes"
TRAINING_STAGES = {"correct-teacher": correct_run, "score": score_run, "distill": distill_run}


def recipe_config(recipe_file: str | Path, stage: str = "distill", overrides=()):
    """The ConfigContainer of ``stage`` of a recipe YAML file (project keys, ``key=value`` overrides); the run
    folder it names must have been prepared (`minitron prepare`, then score before distill)."""
    from nemo_minitron.config import load_recipe

    if stage not in TRAINING_STAGES:
        raise ValueError(f"stage: {stage!r} is not a Bridge training stage; choose one of {list(TRAINING_STAGES)}")
    return TRAINING_STAGES[stage](load_recipe(recipe_file, list(overrides))).config


def smollm2_135m_config(stage: str = "distill", overrides=()):
    """SmolLM2-135M on Shakespeare (the embedded default, CPU-sized: recipes/demo.yaml)."""
    return recipe_config(RECIPES / "demo.yaml", stage, overrides)


def llama31_8b_to_4b_width_config(stage: str = "distill", overrides=()):
    """Llama-3.1-8B -> 4B by width (hidden 4096 -> 3072, ffn 14336 -> 9216), recipes/llama31_8b_to_4b.yaml."""
    return recipe_config(RECIPES / "llama31_8b_to_4b.yaml", stage, ["distill.student=width", *overrides])


def llama31_8b_to_4b_depth_config(stage: str = "distill", overrides=()):
    """Llama-3.1-8B -> 4B by depth (32 -> 16 layers, the contiguous block the search finds cheapest)."""
    return recipe_config(RECIPES / "llama31_8b_to_4b.yaml", stage, ["distill.student=depth", *overrides])


def mistral_nemo_12b_to_8b_config(stage: str = "distill", overrides=()):
    """Mistral-NeMo-12B -> 8B by width (hidden 5120 -> 4096, ffn 14336 -> 11520)."""
    return recipe_config(RECIPES / "mistral_nemo_12b_to_8b.yaml", stage, overrides)
