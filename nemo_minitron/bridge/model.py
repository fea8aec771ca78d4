"""The student as Megatron-Bridge builds it: a GPTModelProvider for a ModelArch, and pre-wrap hooks that run after
Bridge has built the model and before it wraps it in DDP and builds the optimizer (``register_pre_wrap_hook``):
load weights, apply a pruning plan, load the teacher.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from nemo_minitron.distillation.intermediate import IntermediateLoss
from nemo_minitron.distillation.teacher import Teacher
from nemo_minitron.models.arch import ModelArch, transformer_config_kwargs
from nemo_minitron.models.build import layer_spec
from nemo_minitron.models.checkpoint import load_checkpoint
from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.pruning.apply import apply_plan
from nemo_minitron.pruning.plan import PrunePlan, PruneTarget, make_plan
from nemo_minitron.runtime.absent_imports import absent_imports

with absent_imports():
    from megatron.bridge.models.gpt_provider import GPTModelProvider


def gpt_provider(arch: ModelArch, *, seq_length: int, tensor_model_parallel_size: int = 1,
                 pipeline_model_parallel_size: int = 1, sequence_parallel: bool = False,
                 transformer_impl: str = "local", fp8: str | None = None,
                 params_dtype: torch.dtype = torch.float32,
                 recompute_granularity: str | None = None) -> GPTModelProvider:
    """Bridge's GPTModelProvider building exactly the GPTModel of ``build_gpt_model(arch, ...)``: same config
    fields, same layer spec, unpadded vocabulary, RoPE, tied embeddings as ``arch`` says; per-token loss
    normalisation (the forward step returns loss sums and token counts)."""
    kwargs = transformer_config_kwargs(
        arch, tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size, transformer_impl=transformer_impl, fp8=fp8,
        params_dtype=params_dtype, sequence_parallel=sequence_parallel, recompute_granularity=recompute_granularity)
    provider, rope = _rope_provider(arch)
    return provider(
        **kwargs, **rope, transformer_layer_spec=layer_spec, vocab_size=arch.vocab_size, should_pad_vocab=False,
        seq_length=seq_length, share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope", rotary_base=int(arch.rotary_base), calculate_per_token_loss=True)


def _rope_provider(arch: ModelArch) -> tuple[type, dict]:
    """(provider class, its RoPE-scaling fields) for ``arch``'s Llama-3.1 RoPE scaling (factor, low / high frequency
    factors 1 / 4, original context 8192): ``GPTModelProvider.rope_scaling`` from Bridge 0.3.1 on; Bridge 0.3.0 has
    no such field and scales in ``Llama31ModelProvider.provide`` (``scale_factor``) instead."""
    if arch.rope_scaling_factor is None:
        return GPTModelProvider, {}
    if "rope_scaling" in {f.name for f in dataclasses.fields(GPTModelProvider)}:
        return GPTModelProvider, dict(rope_scaling=True, rope_scaling_factor=arch.rope_scaling_factor)
    from megatron.bridge.models.llama.llama_provider import Llama31ModelProvider

    return Llama31ModelProvider, dict(scale_factor=arch.rope_scaling_factor)


class LoadWeights:
    """Pre-wrap hook: load a nemo-minitron checkpoint (any TP / PP layout) into the freshly built model chunk."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def __call__(self, model: list) -> list:
        from megatron.core import dist_checkpointing

        (chunk,) = model
        chunk.load_state_dict(dist_checkpointing.load(chunk.sharded_state_dict(), str(self.directory)))
        return model


class ApplyPlan:
    """Pre-wrap hook: prune the model chunk (built for ``arch``, weights loaded) in place by the plan that
    ``make_plan`` gives for ``scores`` and ``target`` (what `minitron prune` applies, at any TP size); the
    provider, which is the chunk's config, records the new sizes, so Bridge wraps and optimises the student."""

    def __init__(self, arch: ModelArch, scores: ImportanceScores, target: PruneTarget):
        self.arch, self.scores, self.target = arch, scores, target
        self.plan: PrunePlan | None = None

    def __call__(self, model: list) -> list:
        (chunk,) = model
        self.plan = make_plan(self.arch, self.scores, self.target)
        apply_plan(chunk, self.arch, self.plan)
        return model


class TeacherFromCheckpoint(Teacher):
    """A live Teacher whose model is loaded from a nemo-minitron checkpoint when Bridge builds the student (as a
    pre-wrap hook, so under the parallel state Bridge initialised; same TP / PP layout as the student)."""

    def __init__(self, directory: str | Path, **build_kwargs):
        self.directory, self.build_kwargs, self.model = Path(directory), build_kwargs, None

    def __call__(self, model: list) -> list:
        teacher, _ = load_checkpoint(self.directory, **self.build_kwargs)
        Teacher.__init__(self, teacher)
        return model


class AttachProjections:
    """Pre-wrap hook (after TeacherFromCheckpoint): check the intermediate-loss pairs against both models and,
    when their hidden sizes differ, register the learned projections on the student, so that Bridge's DDP,
    optimizer and checkpoints include them (what the project trainer does before it wraps the student)."""

    def __init__(self, intermediate: IntermediateLoss, teacher: Teacher, seed: int):
        self.intermediate, self.teacher, self.seed = intermediate, teacher, seed

    def __call__(self, model: list) -> list:
        (chunk,) = model
        self.intermediate.attach(chunk, self.teacher.model, seed=self.seed)
        return model
