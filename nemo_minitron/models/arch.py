"""Typed architecture description of a Llama-family decoder and its Megatron-Core TransformerConfig."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

MODEL_TYPES = ("llama", "mistral", "qwen2")  # Hugging Face model types that convert exactly


@dataclass(frozen=True)
class ModelArch:
    """Shape of a Llama / Mistral / Qwen2-style decoder (RMSNorm, SwiGLU, RoPE, GQA), Megatron-Core names."""

    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    kv_channels: int  # head dim; kept explicit so pruning heads or hidden size never changes it
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    add_qkv_bias: bool = False  # Qwen2
    # Llama-3.x RoPE scaling (rope_type "llama3"): the factor; its low / high frequency factors 1 / 4 and original
    # context of 8192 positions are the ones Megatron-Core computes with. None: plain RoPE.
    rope_scaling_factor: float | None = None
    model_type: str = "llama"  # Hugging Face model type it converts from and exports as (hf_convert.hf_model_type)

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                     "vocab_size", "kv_channels"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"arch.{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_query_groups:
            raise ValueError(
                f"arch.num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"arch.num_query_groups ({self.num_query_groups})"
            )
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"arch.model_type must be one of {MODEL_TYPES}, got {self.model_type!r}")

    def check_tensor_parallel(self, tp_size: int) -> None:
        """Raise ValueError unless every tensor-parallel-sharded size divides by ``tp_size``; KV groups may also be
        fewer than ``tp_size`` if they divide it (Megatron-Core then replicates each group's K/V)."""
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size", "vocab_size"):
            value = getattr(self, name)
            if value % tp_size and not (name == "num_query_groups" and tp_size % value == 0):
                raise ValueError(f"arch.{name}={value} is not divisible by "
                                 f"parallel.tensor_model_parallel_size={tp_size}; choose a size that divides it")

    def replace(self, **changes) -> "ModelArch":
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        """Exact parameter count of the Megatron-Core model (norm weights included, no biases but QKV's)."""
        h, f, d = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        qkv_out = (self.num_attention_heads + 2 * self.num_query_groups) * d
        attention = h * qkv_out + self.num_attention_heads * d * h + (qkv_out if self.add_qkv_bias else 0)
        mlp = 2 * h * f + f * h
        per_layer = attention + mlp + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelArch":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"arch: unknown fields {sorted(unknown)}; allowed: {sorted(known)}")
        return cls(**values)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "ModelArch":
        """The ModelArch saved as ``path``; ValueError naming the file if it is not one."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (ValueError, TypeError) as err:  # not JSON, not an object, unknown or missing fields
            raise ValueError(f"{path} is not a model architecture saved by nemo-minitron ({err}): it is damaged; "
                             "re-run the stage that wrote this checkpoint") from None


def transformer_engine_available() -> bool:
    """True when Transformer Engine imports and a CUDA device is present (its layers and FP8 need both)."""
    import importlib.util

    return torch.cuda.is_available() and importlib.util.find_spec("transformer_engine") is not None


def check_transformer_impl(transformer_impl: str, fp8: str | None, on_this_machine: bool = True) -> None:
    """Raise ValueError unless (transformer_impl, fp8) is a valid choice (that this machine can run, unless
    ``on_this_machine`` is False: e.g. planning a GPU run on a CPU login node)."""
    if transformer_impl not in ("local", "transformer_engine"):
        raise ValueError(f"model.transformer_impl must be 'local' or 'transformer_engine', got {transformer_impl!r}")
    if fp8 not in (None, "delayed", "tensorwise"):
        raise ValueError(f"model.fp8 must be null, 'delayed' or 'tensorwise', got {fp8!r}")
    if fp8 is not None and transformer_impl != "transformer_engine":
        raise ValueError("model.fp8 needs model.transformer_impl='transformer_engine'")
    if on_this_machine and transformer_impl == "transformer_engine" and not transformer_engine_available():
        raise ValueError("model.transformer_impl='transformer_engine' needs Transformer Engine and a GPU (it ships in "
                         "the NeMo Framework container); use model.transformer_impl='local' here")


PARAMS_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
RECOMPUTE_GRANULARITIES = (None, "full", "selective")


def params_dtype(name: str) -> torch.dtype:
    """torch dtype of a recipe's model.params_dtype ("fp32" | "bf16" | "fp16")."""
    if name not in PARAMS_DTYPES:
        raise ValueError(f"model.params_dtype must be one of {list(PARAMS_DTYPES)}, got {name!r}")
    return PARAMS_DTYPES[name]


def _recompute_kwargs(recompute_granularity: str | None) -> dict:
    """Megatron's activation recompute: "full" re-runs every transformer layer in backward from its saved input
    (uniform method, one layer per unit); "selective" re-runs only the core attention (softmax(QK^T) V)."""
    if recompute_granularity not in RECOMPUTE_GRANULARITIES:
        raise ValueError(f"model.recompute_granularity must be one of {list(RECOMPUTE_GRANULARITIES)}, got "
                         f"{recompute_granularity!r}")
    if recompute_granularity == "full":
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return dict(recompute_granularity=recompute_granularity)


def transformer_config_kwargs(arch: ModelArch, *, tensor_model_parallel_size: int,
                              pipeline_model_parallel_size: int, transformer_impl: str = "local",
                              fp8: str | None = None, params_dtype: torch.dtype = torch.float32,
                              sequence_parallel: bool = False, recompute_granularity: str | None = None) -> dict:
    """Megatron-Core TransformerConfig fields for ``arch`` under this parallel layout (also the fields of a
    Megatron-Bridge GPTModelProvider, which is a TransformerConfig).

    transformer_impl: "local" (pure Megatron-Core modules, runs on CPU) or "transformer_engine" (GPU, enables FP8).
    fp8: None, "delayed" or "tensorwise" (current scaling); needs transformer_impl="transformer_engine".
    params_dtype: torch.float32, or bfloat16 / float16 for Megatron's mixed precision (16-bit weights and
        activations; the optimizer keeps float32 master weights).
    recompute_granularity: None, "full" or "selective" activation recompute.
    """
    check_transformer_impl(transformer_impl, fp8)
    arch.check_tensor_parallel(tensor_model_parallel_size)
    if params_dtype not in PARAMS_DTYPES.values():
        raise ValueError(f"params_dtype must be one of {list(PARAMS_DTYPES.values())}, got {params_dtype}")
    on_gpu = torch.cuda.is_available()
    fp8_kwargs = {} if fp8 is None else dict(fp8="hybrid", fp8_recipe=fp8)
    return dict(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_attention_heads,
        num_query_groups=arch.num_query_groups,
        kv_channels=arch.kv_channels,
        layernorm_epsilon=arch.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.add_qkv_bias,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        pipeline_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        masked_softmax_fusion=on_gpu,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        transformer_impl=transformer_impl,
        # Megatron-Core's defaults, stated because Bridge's GPTModelProvider changes them: both builders make the
        # same model, with the same numerics.
        attention_softmax_in_fp32=True,
        cross_entropy_loss_fusion=False,
        **_recompute_kwargs(recompute_granularity),
        **fp8_kwargs,
    )


def transformer_config(arch: ModelArch, **kwargs):
    """Megatron-Core TransformerConfig for ``arch`` under the current parallel state (``kwargs``: the choices of
    ``transformer_config_kwargs``)."""
    from megatron.core import parallel_state
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(**transformer_config_kwargs(
        arch, tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(), **kwargs))
