"""Apply a PrunePlan in place to this rank's shard / stage of a Megatron-Core GPTModel (local layer spec)."""

from __future__ import annotations

import torch

from nemo_minitron.models.arch import ModelArch
from nemo_minitron.pruning.plan import PrunePlan

CONFIG_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
# Cached sizes that are not widths: they differ between stages / layers by construction, or are the context
# length the model was built for (Megatron-Bridge builds with the training sequence length).
_NOT_WIDTHS = ("layer_number", "num_layers_per_pipeline_rank", "max_sequence_length", "max_position_embeddings")


def apply_plan(model, arch: ModelArch, plan: PrunePlan) -> ModelArch:
    """Prune ``model`` (this rank's GPTModel of ``arch``, not yet wrapped in DDP) to ``plan.arch``; return it.

    Every pruned Parameter is replaced by a smaller one (keeping its Megatron attributes), the dropped layers of
    this stage are removed and the rest renumbered (new layer_number = position in ``plan.layers_keep`` + 1), and
    the sizes Megatron caches in the config and modules are updated. No communication: each rank slices its own
    TP shard. Afterwards ``check_shapes`` verifies the model against a freshly built ``plan.arch``.
    """
    from megatron.core import parallel_state

    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    _check_inputs(model, arch, plan, tp_size)
    new = plan.arch
    hidden = plan.hidden_keep.to(next(model.parameters()).device)
    with torch.no_grad():
        if model.pre_process:
            emb = model.embedding.word_embeddings
            _set_param(emb, "weight", emb.weight.index_select(1, hidden))
            emb.embedding_dim = new.hidden_size
        kept = []
        for layer in model.decoder.layers:
            source = layer.layer_number - 1
            if source in plan.layers_keep:
                _prune_layer(layer, arch, plan, source, hidden, tp_rank, tp_size)
                _renumber(layer, plan.layers_keep.index(source) + 1)
                kept.append(layer)
        model.decoder.layers = torch.nn.ModuleList(kept)
        model.decoder.num_layers_per_pipeline_rank = len(kept)
        if model.decoder.final_layernorm is not None:
            _prune_norm(model.decoder.final_layernorm, hidden)
        if model.post_process:
            _prune_linear(model.output_layer, cols=hidden)  # tied at PP=1: no weight, reads the embedding's
    for config in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
        for name in CONFIG_FIELDS:
            setattr(config, name, getattr(new, name))
    check_shapes(model, new)
    return new


def _check_inputs(model, arch: ModelArch, plan: PrunePlan, tp_size: int) -> None:
    if model.config.transformer_impl != "local":
        raise ValueError(f"apply_plan supports model.transformer_impl='local', got {model.config.transformer_impl!r}:"
                         " prune the local-spec model, save it, and load the checkpoint into Transformer Engine")
    for name in CONFIG_FIELDS:
        if getattr(model.config, name) != getattr(arch, name):
            raise ValueError(f"model config {name}={getattr(model.config, name)} differs from arch.{name}="
                             f"{getattr(arch, name)}: pass the arch the model was built from")
    if plan.tp_size % tp_size:
        raise ValueError(f"plan.tp_size ({plan.tp_size}) must be a multiple of the tensor-parallel size ({tp_size}): "
                         "make the plan with make_plan(..., tp_size=TP)")
    new, L = plan.arch, arch.num_layers
    expected = {"hidden_keep": (new.hidden_size,), "ffn_keep": (L, new.ffn_hidden_size),
                "groups_keep": (L, new.num_query_groups),
                "heads_keep": (L, new.num_query_groups, new.num_attention_heads // new.num_query_groups)}
    for name, shape in expected.items():
        if tuple(getattr(plan, name).shape) != shape:
            raise ValueError(f"plan.{name} has shape {tuple(getattr(plan, name).shape)}, expected {shape}: the plan "
                             "was made for another model")
    if len(plan.layers_keep) != new.num_layers or not all(0 <= i < L for i in plan.layers_keep):
        raise ValueError(f"plan.layers_keep {plan.layers_keep} must list {new.num_layers} layers in [0, {L - 1}]")


def _prune_layer(layer, arch: ModelArch, plan: PrunePlan, source: int, hidden: torch.Tensor,
                 tp_rank: int, tp_size: int) -> None:
    """Prune one transformer layer's attention (groups, heads), MLP (neurons) and hidden channels on this TP rank."""
    new = plan.arch
    device = hidden.device
    d = arch.kv_channels
    per_group = arch.num_attention_heads // arch.num_query_groups
    # This rank's kept groups (local index j) and, per group, the kept heads (index i within the group).
    groups = _local(plan.groups_keep[source], tp_rank, tp_size, arch.num_query_groups // tp_size)
    mine = slice(tp_rank * len(groups), (tp_rank + 1) * len(groups))
    heads = plan.heads_keep[source, mine] - plan.groups_keep[source, mine].unsqueeze(-1) * per_group
    # linear_qkv rows, per local group: per_group q heads, then k, then v, kv_channels rows each.
    kv = torch.tensor([per_group, per_group + 1]).expand(len(groups), 2)
    qkv_heads = groups.unsqueeze(-1) * (per_group + 2) + torch.cat([heads, kv], dim=1)
    proj_heads = groups.unsqueeze(-1) * per_group + heads
    attn = layer.self_attention
    _prune_linear(attn.linear_qkv, rows=_channels(qkv_heads, d).to(device), cols=hidden)
    _prune_linear(attn.linear_proj, rows=hidden, cols=_channels(proj_heads, d).to(device))

    heads_local, groups_local = new.num_attention_heads // tp_size, new.num_query_groups // tp_size
    attn.query_projection_size = d * new.num_attention_heads
    attn.kv_projection_size = d * new.num_query_groups
    attn.linear_qkv_out_dim = d * (new.num_attention_heads + 2 * new.num_query_groups)
    for module in (attn, attn.core_attention):
        module.num_attention_heads_per_partition = heads_local
        module.num_query_groups_per_partition = groups_local
    attn.core_attention.hidden_size_per_partition = d * heads_local

    # SwiGLU: linear_fc1 holds [gate shard; up shard]; keep the same neurons in both halves.
    ffn_shard = arch.ffn_hidden_size // tp_size
    neurons = _local(plan.ffn_keep[source], tp_rank, tp_size, ffn_shard).to(device)
    _prune_linear(layer.mlp.linear_fc1, rows=torch.cat([neurons, neurons + ffn_shard]), cols=hidden)
    _prune_linear(layer.mlp.linear_fc2, rows=hidden, cols=neurons)
    layer.mlp.input_size = new.hidden_size

    _prune_norm(layer.input_layernorm, hidden)
    _prune_norm(layer.pre_mlp_layernorm, hidden)


def _local(keep: torch.Tensor, tp_rank: int, tp_size: int, shard: int) -> torch.Tensor:
    """This rank's part of a per-shard balanced global keep list, as indices local to its shard of ``shard``."""
    n = len(keep) // tp_size
    local = keep[tp_rank * n:(tp_rank + 1) * n] - tp_rank * shard
    if not (0 <= int(local.min()) and int(local.max()) < shard):
        raise ValueError(f"plan indices {keep.tolist()} are not balanced over {tp_size} TP shards of {shard}")
    return local


def _channels(slots: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of the ``width``-row blocks numbered ``slots`` (any shape), flattened in order."""
    return (slots.unsqueeze(-1) * width + torch.arange(width)).flatten()


def _set_param(module, name: str, value: torch.Tensor) -> None:
    """Replace ``module.<name>`` by a Parameter holding ``value``, carrying over its attributes (TP partitioning,
    allreduce, shared embedding flags, requires_grad)."""
    old = getattr(module, name)
    new = torch.nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    setattr(module, name, new)


def _prune_linear(linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    """Keep output ``rows`` and input ``cols`` (this rank's local indices, None = all) of a Column- or
    RowParallelLinear and update its cached sizes."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if linear.weight is not None:
        weight = linear.weight
        if rows is not None:
            weight = weight.index_select(0, rows)
        if cols is not None:
            weight = weight.index_select(1, cols)
        _set_param(linear, "weight", weight)
    if linear.bias is not None and rows is not None:
        _set_param(linear, "bias", linear.bias.index_select(0, rows))
    tp_size = linear.tp_group.size()
    if isinstance(linear, ColumnParallelLinear):
        if rows is not None:
            linear.output_size_per_partition = len(rows)
            linear.output_size = len(rows) * tp_size
        if cols is not None:
            linear.input_size = len(cols)
    elif isinstance(linear, RowParallelLinear):
        if rows is not None:
            linear.output_size = len(rows)
        if cols is not None:
            linear.input_size_per_partition = len(cols)
            linear.input_size = len(cols) * tp_size
    else:
        raise TypeError(f"cannot prune {type(linear).__name__}: only Megatron-Core's local Column/RowParallelLinear")


def _prune_norm(norm, keep: torch.Tensor) -> None:
    if not isinstance(norm, (torch.nn.RMSNorm, torch.nn.LayerNorm)):
        raise TypeError(f"cannot prune {type(norm).__name__}: only torch RMSNorm / LayerNorm (the local spec)")
    _set_param(norm, "weight", norm.weight.index_select(0, keep))
    if getattr(norm, "bias", None) is not None:  # LayerNorm
        _set_param(norm, "bias", norm.bias.index_select(0, keep))
    norm.normalized_shape = (len(keep),)


def _renumber(layer, number: int) -> None:
    """Set the 1-based global layer number on the layer and on every submodule that caches it."""
    for module in layer.modules():
        if hasattr(module, "layer_number"):
            module.layer_number = number


def _sizes(module) -> dict:
    """The integer sizes a module cached at construction (what its forward reshapes with)."""
    return {k: v for k, v in vars(module).items()
            if type(v) in (int, tuple, torch.Size) and k not in _NOT_WIDTHS}


def check_shapes(model, arch: ModelArch) -> None:
    """Raise AssertionError unless every parameter shape, cached module size and config size of ``model`` equals
    that of a GPTModel freshly built for ``arch`` at this TP size and pipeline stage.

    Guards against a config that records a new size while weights keep the old one (or the reverse). Layers are
    compared with the reference's single layer, so any number of layers per stage passes. Call it on every rank:
    building the reference is collective under pipeline parallelism with tied embeddings.
    """
    from megatron.core import parallel_state

    from nemo_minitron.models.build import build_gpt_model

    for name in CONFIG_FIELDS:
        assert getattr(model.config, name) == getattr(arch, name), \
            f"config.{name}={getattr(model.config, name)} but arch.{name}={getattr(arch, name)}"
    with torch.random.fork_rng(devices=[]):
        reference = build_gpt_model(arch.replace(num_layers=parallel_state.get_pipeline_model_parallel_world_size()))
    ref_layer = reference.decoder.layers[0]
    pairs = [(name, module, reference.get_submodule(name)) for name, module in model.named_modules()
             if not name.startswith("decoder.layers")]
    for i, layer in enumerate(model.decoder.layers):
        pairs += [(f"decoder.layers.{i}.{name}".rstrip("."), module, ref_layer.get_submodule(name))
                  for name, module in layer.named_modules()]
    for name, module, ref in pairs:
        assert type(module) is type(ref), f"{name}: {type(module).__name__} but expected {type(ref).__name__}"
        assert _sizes(module) == _sizes(ref), f"{name}: cached sizes {_sizes(module)} but expected {_sizes(ref)}"
        shapes = {k: tuple(p.shape) for k, p in module.named_parameters(recurse=False)}
        expected = {k: tuple(p.shape) for k, p in ref.named_parameters(recurse=False)}
        assert shapes == expected, f"{name}: parameter shapes {shapes} but expected {expected}"
    numbers = [layer.layer_number for layer in model.decoder.layers]
    assert numbers == sorted(set(numbers)) and all(1 <= n <= arch.num_layers for n in numbers), \
        f"layer numbers {numbers} must increase within [1, {arch.num_layers}]"
