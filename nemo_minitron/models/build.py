"""Build a Megatron-Core GPTModel (this rank's pipeline stage) from a ModelArch, and run it on token batches."""

from __future__ import annotations

import dataclasses

import torch

from nemo_minitron.models.arch import ModelArch, transformer_config
from nemo_minitron.models.norm import RMSNorm
from nemo_minitron.runtime.distributed import device


def unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers (the first module with a ``decoder``)."""
    while not hasattr(model, "decoder"):
        model = model.module
    return model


def layer_spec(config):
    """Block spec for config.transformer_impl: Transformer Engine's fused modules (GPU, FP8), or Megatron-Core's
    own ("local") with nemo_minitron's RMSNorm, which also runs under sequence parallelism."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build

    if config.transformer_impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm))
    return TransformerBlockSubmodules(layer_specs=[spec] * get_num_layers_to_build(config), layer_norm=RMSNorm)


def build_gpt_model(arch: ModelArch, *, transformer_impl: str = "local", fp8: str | None = None,
                    params_dtype: torch.dtype = torch.float32, sequence_parallel: bool = False,
                    recompute_granularity: str | None = None):
    """GPTModel for this rank's tensor shard and pipeline stage, on this rank's device (options: see
    models.arch.transformer_config_kwargs)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel

    config = transformer_config(arch, transformer_impl=transformer_impl, fp8=fp8, params_dtype=params_dtype,
                                sequence_parallel=sequence_parallel, recompute_granularity=recompute_granularity)
    model = GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config),
        vocab_size=arch.vocab_size,
        max_sequence_length=arch.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(),
        post_process=parallel_state.is_pipeline_last_stage(),
        share_embeddings_and_output_weights=arch.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(arch.rotary_base),
        rope_scaling=arch.rope_scaling_factor is not None,
        rope_scaling_factor=arch.rope_scaling_factor or 8.0,
    )
    return model.to(device())


def causal_inputs(tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids [b, s] and Megatron's boolean attention mask [1, 1, s, s] (True = masked out)."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    mask = torch.triu(torch.ones(1, 1, s, s, dtype=torch.bool, device=tokens.device), diagonal=1)
    return position_ids, mask


def forward_logits(model, tokens: torch.Tensor) -> torch.Tensor:
    """Vocab-sharded logits [b, s, vocab / TP] of a single-stage (PP=1) model."""
    position_ids, mask = causal_inputs(tokens)
    return model(tokens, position_ids, mask)
