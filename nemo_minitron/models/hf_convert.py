"""Hugging Face (Llama / Mistral / Qwen2) <-> Megatron-Core GPTModel conversion, for any TP size and PP stage.

Weight layouts (HF -> Megatron-Core, per layer):
- q/k/v_proj -> linear_qkv, group by group: for each KV group g its heads_per_group query heads, then k_g, then v_g
  ([num_query_groups * (heads_per_group + 2) * kv_channels, hidden]); Qwen2's q/k/v biases -> linear_qkv.bias.
- gate_proj, up_proj -> linear_fc1 = [gate; up]; under TP each rank holds [gate_shard; up_shard].
- o_proj -> linear_proj, down_proj -> linear_fc2 (row-parallel: columns sharded).
- embed_tokens -> embedding.word_embeddings, lm_head -> output_layer (vocab-parallel: rows sharded).
- input_layernorm -> input_layernorm, post_attention_layernorm -> pre_mlp_layernorm (local layer spec); the
  Transformer Engine spec fuses each norm into the linear after it: linear_qkv.layer_norm_weight and
  linear_fc1.layer_norm_weight. TE's "_extra_state" buffers are not parameters and are not converted.
RoPE needs no permutation: HF's rotate_half equals Megatron's rotary_interleaved=False.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from nemo_minitron.models.arch import MODEL_TYPES, ModelArch
from nemo_minitron.runtime.distributed import is_rank0

# Megatron-Core parameter suffix of a decoder layer -> (HF suffixes, layout kind, TP shard dim or None).
# kind "copy": one HF tensor in Megatron's layout; "qkv": q, k, v fused group by group; "fc1": gate, up fused.
_LAYER_MAP = {
    "input_layernorm.weight": (("input_layernorm.weight",), "copy", None),
    "self_attention.linear_qkv.layer_norm_weight": (("input_layernorm.weight",), "copy", None),
    "self_attention.linear_qkv.weight": (
        ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv", 0),
    "self_attention.linear_qkv.bias": (
        ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv", 0),
    "self_attention.linear_proj.weight": (("self_attn.o_proj.weight",), "copy", 1),
    "pre_mlp_layernorm.weight": (("post_attention_layernorm.weight",), "copy", None),
    "mlp.linear_fc1.layer_norm_weight": (("post_attention_layernorm.weight",), "copy", None),
    "mlp.linear_fc1.weight": (("mlp.gate_proj.weight", "mlp.up_proj.weight"), "fc1", 1),
    "mlp.linear_fc2.weight": (("mlp.down_proj.weight",), "copy", 1),
}
_LAYER_PARAM = re.compile(r"decoder\.layers\.(\d+)\.(.+)")


# Llama-3.x RoPE scaling as Megatron-Core computes it (RotaryEmbedding._apply_scaling): only the factor varies.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _rope(hf_config) -> tuple[float, str, dict]:
    """(rope_theta, rope_type, all RoPE settings) from ``rope_parameters`` (transformers 5) or ``rope_theta`` /
    ``rope_scaling`` (4.x)."""
    params = {**dict(getattr(hf_config, "rope_scaling", None) or {}),
              **dict(getattr(hf_config, "rope_parameters", None) or {})}
    theta = params.get("rope_theta", getattr(hf_config, "rope_theta", None) or 10000.0)
    rope_type = params.get("rope_type") or params.get("type") or "default"
    return float(theta), rope_type, params


def _rope_scaling_factor(rope_type: str, params: dict) -> float | None:
    """ModelArch.rope_scaling_factor of the HF RoPE settings; ValueError for a scaling Megatron-Core cannot run."""
    if rope_type == "default":
        return None
    if rope_type != "llama3":
        raise ValueError(f"hf_config rope_type (rope_parameters / rope_scaling) must be 'default', 'llama3' or "
                         f"none, got {rope_type!r}")
    for field, value in LLAMA3_ROPE.items():
        if float(params.get(field, value)) != value:
            raise ValueError(f"hf_config rope_scaling.{field} must be {value} for rope_type 'llama3' (what "
                             f"Megatron-Core computes), got {params[field]!r}")
    return float(params["factor"])


def arch_from_hf_config(hf_config) -> ModelArch:
    """ModelArch of a transformers Llama / Mistral / Qwen2 config; ValueError for anything Megatron would compute
    differently (other model types, activations, RoPE scaling, linear biases, sliding-window attention)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in MODEL_TYPES:
        raise ValueError(f"hf_config.model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    if hf_config.hidden_act != "silu":
        raise ValueError(f"hf_config.hidden_act must be 'silu', got {hf_config.hidden_act!r}")
    theta, rope_type, rope_params = _rope(hf_config)
    rope_scaling_factor = _rope_scaling_factor(rope_type, rope_params)
    for field in ("attention_bias", "mlp_bias"):
        if getattr(hf_config, field, False):
            raise ValueError(f"hf_config.{field} must be False, got True")
    window = getattr(hf_config, "sliding_window", None)
    uses_window = getattr(hf_config, "use_sliding_window", True)  # Qwen2 switches it off explicitly
    if uses_window and window is not None and window < hf_config.max_position_embeddings:
        raise ValueError(f"hf_config.sliding_window must be null or >= max_position_embeddings "
                         f"({hf_config.max_position_embeddings}), got {window}")
    heads = hf_config.num_attention_heads
    return ModelArch(
        num_layers=hf_config.num_hidden_layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        vocab_size=hf_config.vocab_size,
        kv_channels=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        max_position_embeddings=hf_config.max_position_embeddings,
        rotary_base=theta,
        norm_epsilon=hf_config.rms_norm_eps,
        tie_word_embeddings=bool(hf_config.tie_word_embeddings),
        add_qkv_bias=model_type == "qwen2",
        rope_scaling_factor=rope_scaling_factor,
        model_type=model_type,
    )


def hf_model_type(arch: ModelArch) -> str:
    """The transformers model type ``arch`` exports as: arch.model_type, except that a "llama" whose hidden_size is
    not a multiple of num_attention_heads (which LlamaConfig rejects since transformers 5) exports as "mistral":
    MistralForCausalLM without a sliding window is the same network with the same tensor names, and its config
    takes any head_dim."""
    if arch.model_type == "llama" and arch.hidden_size % arch.num_attention_heads:
        return "mistral"
    return arch.model_type


def hf_config_from_arch(arch: ModelArch):
    """transformers LlamaConfig / MistralConfig / Qwen2Config (``hf_model_type``) describing ``arch`` (SwiGLU with
    silu, no biases but Qwen2's q/k/v, full attention, head_dim = kv_channels)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    model_type = hf_model_type(arch)
    if arch.add_qkv_bias != (model_type == "qwen2"):
        raise ValueError(f"arch.add_qkv_bias must be {model_type == 'qwen2'} for arch.model_type "
                         f"{arch.model_type!r} (q/k/v biases exist in 'qwen2' only), got {arch.add_qkv_bias}")
    common = dict(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.ffn_hidden_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_query_groups,
        head_dim=arch.kv_channels,
        hidden_act="silu",
        max_position_embeddings=arch.max_position_embeddings,
        rms_norm_eps=arch.norm_epsilon,
        rope_theta=arch.rotary_base,
        tie_word_embeddings=arch.tie_word_embeddings,
    )
    if arch.rope_scaling_factor is not None:
        common["rope_scaling"] = {"rope_type": "llama3", "factor": arch.rope_scaling_factor, **LLAMA3_ROPE}
    if model_type == "llama":
        return LlamaConfig(attention_bias=False, mlp_bias=False, **common)
    if model_type == "mistral":
        return MistralConfig(sliding_window=None, **common)
    return Qwen2Config(use_sliding_window=False, **common)


def _hf_names(name: str, model, arch: ModelArch) -> tuple[tuple[str, ...], str, int | None]:
    """(HF tensor names, layout kind, TP shard dim) of Megatron-Core parameter ``name`` of this rank's model."""
    match = _LAYER_PARAM.fullmatch(name)
    if match:
        local, suffix = int(match.group(1)), match.group(2)
        if suffix not in _LAYER_MAP:
            raise ValueError(f"no Hugging Face mapping for Megatron-Core parameter {name!r}")
        layer = model.decoder.layers[local].layer_number - 1  # global index: this stage's offset + local
        hf_suffixes, kind, dim = _LAYER_MAP[suffix]
        return tuple(f"model.layers.{layer}.{s}" for s in hf_suffixes), kind, dim
    if name == "embedding.word_embeddings.weight":
        return ("model.embed_tokens.weight",), "copy", 0
    if name == "decoder.final_layernorm.weight":
        return ("model.norm.weight",), "copy", None
    if name == "output_layer.weight":
        # Tied embeddings under PP > 1: the last stage keeps its own copy of the embedding matrix.
        return ("model.embed_tokens.weight" if arch.tie_word_embeddings else "lm_head.weight",), "copy", 0
    raise ValueError(f"no Hugging Face mapping for Megatron-Core parameter {name!r}")


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_channels: int) -> torch.Tensor:
    """Megatron's linear_qkv rows (or bias) of whole KV groups: for each group its q heads, then its k and v."""
    groups, rest = k.shape[0] // kv_channels, q.shape[1:]
    per_group = [t.reshape(groups, -1, kv_channels, *rest) for t in (q, k, v)]
    return torch.cat(per_group, dim=1).reshape(-1, *rest)


def _to_hf(kind: str, full: torch.Tensor, arch: ModelArch) -> list[torch.Tensor]:
    """HF tensors of a full (unsharded) Megatron tensor; "fc1" comes stacked [2, ffn, hidden]."""
    if kind == "copy":
        return [full]
    if kind == "fc1":
        return list(full.unbind(0))
    groups, d = arch.num_query_groups, arch.kv_channels
    heads_per_group = arch.num_attention_heads // groups
    rest = full.shape[1:]
    q, k, v = full.reshape(groups, heads_per_group + 2, d, *rest).split([heads_per_group, 1, 1], dim=1)
    return [t.reshape(-1, *rest) for t in (q, k, v)]


def _safe_open(file: Path):
    """safetensors' safe_open(file); ValueError naming the file when it is not a whole safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(file, framework="pt")
    except SafetensorError as err:
        raise ValueError(f"{file} is not a complete safetensors file ({err}): is it truncated? copy or download "
                         "it again") from None


class LazyStateDict(Mapping):
    """Read-only mapping HF name -> tensor of a directory's safetensors weights (one file, or the shards listed in
    model.safetensors.index.json). Holds only names and file paths; every access reads from disk, and ``read``
    reads just a range of rows or columns."""

    def __init__(self, directory: str | Path):
        directory = Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                self._files = {name: directory / file for name, file in weight_map.items()}
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{index} is not a safetensors index ({type(err).__name__}: {err})") from None
            for file in sorted(set(self._files.values())):
                if not file.is_file():
                    raise FileNotFoundError(f"{index} lists {file.name}, which is missing from {directory}")
                with _safe_open(file):  # checks its header against its size: a truncated shard fails now
                    pass
        else:
            self._files = {}
            for file in sorted(directory.glob("*.safetensors")):
                with _safe_open(file) as f:
                    self._files.update(dict.fromkeys(f.keys(), file))
        if not self._files:
            raise FileNotFoundError(f"{directory} has no weights: no *.safetensors files (PyTorch .bin weights: "
                                    "convert them to safetensors)")

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name)

    def __contains__(self, name) -> bool:
        return name in self._files

    def __iter__(self):
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of tensor ``name`` (read from the file's header)."""
        with _safe_open(self._files[name]) as f:
            return tuple(f.get_slice(name).get_shape())

    def read(self, name: str, dim: int | None = None, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Tensor ``name``, or only its indices [start, stop) along ``dim`` (only those are read from disk)."""
        with _safe_open(self._files[name]) as f:
            if dim is None:
                return f.get_tensor(name)
            return f.get_slice(name)[(slice(None),) * dim + (slice(start, stop),)]


def _shape(state: Mapping[str, torch.Tensor], name: str) -> tuple[int, ...]:
    return state.shape(name) if isinstance(state, LazyStateDict) else tuple(state[name].shape)


def _read(state: Mapping[str, torch.Tensor], name: str, dim: int | None = None, start: int = 0,
          stop: int | None = None) -> torch.Tensor:
    """``state[name]``, or its indices [start, stop) along ``dim``; a LazyStateDict reads only those."""
    if isinstance(state, LazyStateDict):
        return state.read(name, dim, start, stop)
    return state[name] if dim is None else state[name][(slice(None),) * dim + (slice(start, stop),)]


def _hf_shapes(kind: str, dim: int | None, shape: tuple[int, ...], tp: int, arch: ModelArch) -> list[tuple]:
    """Shapes of the HF tensors of a Megatron parameter whose shard on this rank has ``shape``."""
    if kind == "qkv":
        d, rest = arch.kv_channels, shape[1:]
        return [(arch.num_attention_heads * d, *rest)] + [(arch.num_query_groups * d, *rest)] * 2
    if kind == "fc1":
        return [(shape[0] // 2 * tp, *shape[1:])] * 2
    return [tuple(n * tp if i == dim else n for i, n in enumerate(shape))]


def _read_shard(state: Mapping[str, torch.Tensor], hf_names: tuple[str, ...], kind: str, dim: int | None,
                shape: tuple[int, ...], arch: ModelArch, tp: int, rank: int) -> torch.Tensor:
    """This TP rank's shard (of ``shape``) of a Megatron parameter, read from its HF tensors.

    Sharded "copy" and "fc1" tensors: only this rank's rows / columns of each (gate's, then up's). "qkv": the q, k
    and v rows of the KV groups this rank's rows of the fused layout overlap: exactly its own groups when the
    groups divide over the ranks, one group's q / k / v (of which it keeps a part) when there are fewer groups than
    ranks; never a whole layer's q / k / v.
    """
    if dim is None:
        return _read(state, hf_names[0])
    if kind == "copy":
        n = shape[dim]
        return _read(state, hf_names[0], dim, rank * n, (rank + 1) * n)
    if kind == "fc1":
        n = shape[0] // 2
        return torch.cat([_read(state, name, 0, rank * n, (rank + 1) * n) for name in hf_names])
    d = arch.kv_channels
    q_rows = arch.num_attention_heads // arch.num_query_groups * d
    group_rows, start, n = q_rows + 2 * d, rank * shape[0], shape[0]
    first, last = start // group_rows, -(-(start + n) // group_rows)
    q = _read(state, hf_names[0], 0, first * q_rows, last * q_rows)
    k, v = (_read(state, name, 0, first * d, last * d) for name in hf_names[1:])
    offset = start - first * group_rows
    return _fuse_qkv(q, k, v, d)[offset:offset + n]


@torch.no_grad()
def load_hf_state_dict(model, hf_state_dict: Mapping[str, torch.Tensor], arch: ModelArch) -> None:
    """Copy HF tensors into this rank's Megatron-Core GPTModel (its TP shard and PP stage) in place.

    Only this rank's part of each tensor is read (``_read_shard``); from a LazyStateDict (``load_hf_checkpoint``)
    that is all that is read from disk, one parameter at a time, so peak memory is the model plus one parameter's
    HF rows, never the whole checkpoint.
    """
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    rank = parallel_state.get_tensor_model_parallel_rank()
    params = dict(model.named_parameters())
    plan = {name: _hf_names(name, model, arch) for name in params}
    missing = sorted({n for hf_names, _, _ in plan.values() for n in hf_names} - set(hf_state_dict))
    if missing:
        raise ValueError(f"hf_state_dict lacks {len(missing)} tensors this model needs, e.g. {missing[:4]}")
    for name, (hf_names, kind, dim) in plan.items():
        param = params[name]
        shape = tuple(param.shape)
        actual, expected = [_shape(hf_state_dict, n) for n in hf_names], _hf_shapes(kind, dim, shape, tp, arch)
        if actual != expected:
            raise ValueError(f"{name}: HF tensors {hf_names} have shapes {actual}, but this rank's parameter "
                             f"{shape} at TP={tp} needs {expected}")
        param.copy_(_read_shard(hf_state_dict, hf_names, kind, dim, shape, arch, tp, rank))


@torch.no_grad()
def gather_hf_state_dict(model, arch: ModelArch) -> dict[str, torch.Tensor]:
    """Full HF-named tensors of the whole model, returned on every rank (on the CPU when PP > 1, else on the
    model's device).

    TP shards are all-gathered over the tensor-parallel group, then each stage's tensors over the pipeline group.
    With TP = PP = 1 nothing is gathered and the tensors are detached copies of the parameters.
    A tied model has no "lm_head.weight" (transformers ties it to "model.embed_tokens.weight").
    """
    import torch.distributed as dist
    from megatron.core import parallel_state

    tp = parallel_state.get_tensor_model_parallel_world_size()
    tp_group = parallel_state.get_tensor_model_parallel_group()
    hf = {}
    for name, param in model.named_parameters():
        if name == "output_layer.weight" and arch.tie_word_embeddings:
            continue  # last stage's copy of the embedding under PP > 1
        hf_names, kind, dim = _hf_names(name, model, arch)
        shard = param.detach()
        if kind == "fc1":
            shard = shard.reshape(2, -1, shard.shape[-1])
        if dim is not None and tp > 1:
            parts = [torch.empty_like(shard) for _ in range(tp)]
            dist.all_gather(parts, shard.contiguous(), group=tp_group)
            shard = torch.cat(parts, dim=dim)
        for hf_name, tensor in zip(hf_names, _to_hf(kind, shard, arch)):
            hf[hf_name] = tensor.clone()  # own storage: safetensors refuses tensors that share memory
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    if pp > 1:
        stages = [None] * pp
        hf = {k: v.cpu() for k, v in hf.items()}
        dist.all_gather_object(stages, hf, group=parallel_state.get_pipeline_model_parallel_group())
        hf = {k: v for stage in stages for k, v in stage.items()}
    return hf


def save_hf_checkpoint(model, arch: ModelArch, out_dir: str | Path, tokenizer=None) -> Path:
    """Write ``out_dir`` (config.json of ``hf_config_from_arch``, model.safetensors, tokenizer files if given) for
    transformers' AutoModelForCausalLM.from_pretrained. Collective: every rank calls it; global rank 0 writes."""
    import torch.distributed as dist
    from safetensors.torch import save_file

    config = hf_config_from_arch(arch)  # validate before gathering
    state = gather_hf_state_dict(model, arch)
    out_dir = Path(out_dir)
    if is_rank0():
        out_dir.mkdir(parents=True, exist_ok=True)
        if tokenizer is not None:
            config.bos_token_id = tokenizer.bos_token_id
            config.eos_token_id = tokenizer.eos_token_id
            config.pad_token_id = tokenizer.pad_token_id
            tokenizer.save_pretrained(out_dir)
        config.save_pretrained(out_dir)
        save_file({k: v.contiguous().cpu() for k, v in state.items()}, out_dir / "model.safetensors",
                  metadata={"format": "pt"})
    if dist.is_initialized():
        dist.barrier()
    return out_dir


def load_hf_checkpoint(path_or_dir: str | Path, arch_override: dict | None = None
                       ) -> tuple[ModelArch, LazyStateDict]:
    """(ModelArch, lazy HF state dict) of a local HF directory (config.json + model.safetensors, or shards with
    model.safetensors.index.json); no network, and no tensor is read until ``load_hf_state_dict`` reads its shard.

    ``path_or_dir`` may also be a file inside that directory. ``arch_override``: ModelArch fields to replace
    (e.g. {"max_position_embeddings": 512}).
    """
    directory = Path(path_or_dir)
    if directory.is_file():
        directory = directory.parent
    arch = hf_config_arch(directory)
    state = LazyStateDict(directory)
    if arch_override:
        arch = arch.replace(**arch_override)
    return arch, state


def hf_config_arch(directory: str | Path) -> ModelArch:
    """ModelArch of a local Hugging Face model folder from its config.json alone; FileNotFoundError / ValueError
    naming the file when it is missing, not JSON, or not a model Megatron-Core computes alike."""
    from transformers import AutoConfig

    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{directory} has no config.json (expected a Hugging Face model folder)")
    try:
        config = json.loads(path.read_bytes())
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in MODEL_TYPES:
        raise ValueError(f"{path}: model_type {model_type!r} is not supported; nemo-minitron converts "
                         f"{', '.join(MODEL_TYPES)}")
    try:
        return arch_from_hf_config(AutoConfig.from_pretrained(directory, local_files_only=True))
    except (ValueError, TypeError, AttributeError) as err:  # missing or ill-typed settings
        raise ValueError(f"{path}: {err}") from None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_hf_tokenizer(directory: str | Path):
    """AutoTokenizer of a local Hugging Face model folder; FileNotFoundError / ValueError naming the folder when it
    has no tokenizer files or they do not load."""
    from transformers import AutoTokenizer

    directory = Path(directory)
    if not any((directory / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{directory} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}): copy the "
                                "model's tokenizer files into it")
    try:
        return AutoTokenizer.from_pretrained(directory)
    except (ValueError, OSError) as err:
        raise ValueError(f"the tokenizer of {directory} does not load: {err}") from None
