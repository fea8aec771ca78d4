"""Apply a PrunePlan in place to this rank's shard / stage of a Megatron-Core GPTModel (local layer spec)."""

from __future__ import annotations

import torch

from nemo_minitron.models.arch import ModelArch
from nemo_minitron.pruning.plan import PrunePlan, check_tp_sizes

CONFIG_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")
# Cached sizes that are not widths: they differ between stages / layers by construction, or are the context
# length the model was built for (Megatron-Bridge builds with the training sequence length).
_NOT_WIDTHS = ("layer_number", "num_layers_per_pipeline_rank", "max_sequence_length", "max_position_embeddings")


def apply_plan(model, arch: ModelArch, plan: PrunePlan) -> ModelArch:
    """Prune ``model`` (this rank's GPTModel of ``arch``, not yet wrapped in DDP) to ``plan.arch``; return it.

    Every pruned Parameter is replaced by a smaller one (keeping its Megatron attributes), the dropped layers of
    this stage are removed and the rest renumbered (new layer_number = position in ``plan.layers_keep`` + 1), and
    the sizes Megatron caches in the config and modules are updated. The plan's global keep indices may fall
    unevenly on the source TP shards: each TP-sharded weight whose sharded axis is pruned is all-gathered over the
    TP group, its kept units are selected, and this rank keeps its contiguous 1/TP of them (call it on every TP
    rank). Replicated axes (hidden channels) are sliced locally. Afterwards ``check_shapes`` verifies the model
    against a freshly built ``plan.arch``.
    """
    from megatron.core import parallel_state

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
                _prune_layer(layer, arch, plan, source, hidden, tp_size)
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
    check_tp_sizes(plan.arch, tp_size, "plan.arch")
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


def _prune_layer(layer, arch: ModelArch, plan: PrunePlan, source: int, hidden: torch.Tensor, tp_size: int) -> None:
    """Prune one transformer layer's attention (groups, heads), MLP (neurons) and hidden channels on this TP rank."""
    new = plan.arch
    device = hidden.device
    d = arch.kv_channels
    per_group = arch.num_attention_heads // arch.num_query_groups
    groups, heads = plan.groups_keep[source], plan.heads_keep[source]  # [G'], [G', A'/G'] global indices
    # Full linear_qkv rows, group by group: per_group q heads, then k, then v, kv_channels rows each; every rank
    # holds a contiguous 1/TP of them (a KV group may span ranks when there are fewer groups than ranks).
    kv = torch.tensor([per_group, per_group + 1]).expand(len(groups), 2)
    qkv_heads = groups.unsqueeze(-1) * (per_group + 2) + torch.cat([heads % per_group, kv], dim=1)
    attn = layer.self_attention
    _prune_linear(attn.linear_qkv, rows=_channels(qkv_heads, d).to(device), cols=hidden)
    _prune_linear(attn.linear_proj, rows=hidden, cols=_channels(heads, d).to(device))

    heads_local = new.num_attention_heads // tp_size
    attn.query_projection_size = d * new.num_attention_heads
    attn.kv_projection_size = d * new.num_query_groups
    attn.linear_qkv_out_dim = d * (new.num_attention_heads + 2 * new.num_query_groups)
    if new.num_query_groups < tp_size:  # Megatron-Core: each rank computes one KV group (with all its heads)
        attn.num_query_groups_per_partition = 1
        attn.num_attention_heads_per_partition = new.num_attention_heads // new.num_query_groups
    else:
        attn.num_query_groups_per_partition = new.num_query_groups // tp_size
        attn.num_attention_heads_per_partition = heads_local
    attn.core_attention.num_attention_heads_per_partition = heads_local
    attn.core_attention.num_query_groups_per_partition = max(new.num_query_groups, tp_size) // tp_size
    attn.core_attention.hidden_size_per_partition = d * heads_local

    # SwiGLU: linear_fc1 holds [gate shard; up shard]; keep the same neurons in both halves.
    neurons = plan.ffn_keep[source].to(device)
    _prune_linear(layer.mlp.linear_fc1, rows=neurons, cols=hidden, halves=2)
    _prune_linear(layer.mlp.linear_fc2, rows=hidden, cols=neurons)
    layer.mlp.input_size = new.hidden_size

    _prune_norm(layer.input_layernorm, hidden)
    _prune_norm(layer.pre_mlp_layernorm, hidden)


def _channels(slots: torch.Tensor, width: int) -> torch.Tensor:
    """Row indices of the ``width``-row blocks numbered ``slots`` (any shape), flattened in order."""
    return (slots.unsqueeze(-1) * width + torch.arange(width, device=slots.device)).flatten()


def _reshard(tensor: torch.Tensor, dim: int, keep: torch.Tensor, group, halves: int = 1) -> torch.Tensor:
    """This rank's shard of the full tensor (all-gathered over ``group`` along ``dim``) after keeping the global
    indices ``keep`` along ``dim``: the contiguous 1/TP of the kept units. With ``halves`` > 1 every shard is the
    concatenation of that many fused parts (SwiGLU's [gate shard; up shard]), each gathered, kept and split alone."""
    size = group.size()
    if size == 1:
        shards = [tensor]
    else:
        shards = [torch.empty_like(tensor) for _ in range(size)]
        torch.distributed.all_gather(shards, tensor.contiguous(), group=group)
    parts = [torch.cat([shard.chunk(halves, dim)[i] for shard in shards], dim).index_select(dim, keep)
             for i in range(halves)]
    return torch.cat([part.chunk(size, dim)[group.rank()] for part in parts], dim)


def _set_param(module, name: str, value: torch.Tensor) -> None:
    """Replace ``module.<name>`` by a Parameter holding ``value``, carrying over its attributes (TP partitioning,
    allreduce, shared embedding flags, requires_grad)."""
    old = getattr(module, name)
    new = torch.nn.Parameter(value.contiguous(), requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    setattr(module, name, new)


def _prune_linear(linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None, halves: int = 1) -> None:
    """Keep output ``rows`` and input ``cols`` (None = all) of a Column- or RowParallelLinear and update its cached
    sizes. Indices along the TP-sharded axis (a column-parallel layer's rows, a row-parallel layer's columns) are
    global and resharded over the TP group (``halves``: see ``_reshard``); the other axis is replicated."""
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    if isinstance(linear, ColumnParallelLinear):
        sharded, replicated, dim = rows, cols, 0
    elif isinstance(linear, RowParallelLinear):
        sharded, replicated, dim = cols, rows, 1
    else:
        raise TypeError(f"cannot prune {type(linear).__name__}: only Megatron-Core's local Column/RowParallelLinear")
    group, tp_size = linear.tp_group, linear.tp_group.size()
    if linear.weight is not None:
        weight = linear.weight
        if replicated is not None:
            weight = weight.index_select(1 - dim, replicated)
        if sharded is not None:
            weight = _reshard(weight, dim, sharded, group, halves)
        _set_param(linear, "weight", weight)
    if linear.bias is not None and rows is not None:  # column-parallel: sharded like the rows; row-parallel: not
        bias = _reshard(linear.bias, 0, rows, group, halves) if dim == 0 else linear.bias.index_select(0, rows)
        _set_param(linear, "bias", bias)
    if isinstance(linear, ColumnParallelLinear):
        if rows is not None:
            linear.output_size = len(rows) * halves
            linear.output_size_per_partition = linear.output_size // tp_size
        if cols is not None:
            linear.input_size = len(cols)
    else:
        if rows is not None:
            linear.output_size = len(rows)
        if cols is not None:
            linear.input_size_per_partition = len(cols) // tp_size
            linear.input_size = len(cols)


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
