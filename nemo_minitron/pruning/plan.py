"""Pruning targets and the keep-index plan computed from importance scores (global indices, independent of TP)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.models.arch import ModelArch

LAYER_METRICS = ("block_search", "block_influence", "lm_loss_drop")
WIDTH_FIELDS = ("hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups")


@dataclass
class PruneTarget:
    """Target sizes of the pruned model; None keeps the source value.

    num_layers picks the layers to drop by ``layer_metric``:
      "block_search":    drop the contiguous block of k = L - num_layers layers whose removal costs the least loss
                         (``ImportanceScores.best_block``);
      "block_influence": drop the k layers with the lowest Block Influence;
      "lm_loss_drop":    drop the k layers whose removal raises the LM loss least.
    drop_layers names the (0-based) layers to drop instead; it excludes num_layers.
    """

    hidden_size: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    num_layers: Optional[int] = None
    drop_layers: Optional[list[int]] = None
    layer_metric: str = "block_search"

    def new_arch(self, arch: ModelArch) -> ModelArch:
        """The pruned architecture: each set size replaces the source one."""
        sizes = {name: getattr(self, name) for name in WIDTH_FIELDS + ("num_layers",)
                 if getattr(self, name) is not None}
        if self.drop_layers is not None:
            sizes["num_layers"] = arch.num_layers - len(self.drop_layers)
        return arch.replace(**sizes)


def validate(arch: ModelArch, target: PruneTarget, tp_size: int = 1, scores: ImportanceScores | None = None) -> None:
    """Raise ValueError (naming the field, its value and what is allowed) if ``target`` cannot prune ``arch``.

    The source and pruned sharded sizes must fit ``tp_size`` (see ``check_tp_sizes``); every KV group keeps the
    same number of heads. With ``scores`` their shapes and the chosen layer metric are checked too.
    """
    if not isinstance(tp_size, int) or tp_size < 1:
        raise ValueError(f"tp_size must be a positive integer, got {tp_size!r}")
    for name in WIDTH_FIELDS + ("num_layers",):
        value, source = getattr(target, name), getattr(arch, name)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= source):
            raise ValueError(f"prune.{name} must be an integer in [1, {source}] (the source's {name}), got {value!r}")
    if target.layer_metric not in LAYER_METRICS:
        raise ValueError(f"prune.layer_metric: {target.layer_metric!r} is not allowed; "
                         f"choose one of {list(LAYER_METRICS)}")
    if target.drop_layers is not None:
        drop = target.drop_layers
        if target.num_layers is not None:
            raise ValueError(f"prune.drop_layers ({drop}) and prune.num_layers ({target.num_layers}) exclude each "
                             "other; set one of them")
        if not all(isinstance(i, int) and 0 <= i < arch.num_layers for i in drop):
            raise ValueError(f"prune.drop_layers must hold layer indices in [0, {arch.num_layers - 1}], got {drop}")
        if len(set(drop)) != len(drop) or len(drop) >= arch.num_layers:
            raise ValueError(f"prune.drop_layers must be unique and keep at least one of the {arch.num_layers} "
                             f"layers, got {drop}")

    def size(name: str) -> int:
        value = getattr(target, name)
        return getattr(arch, name) if value is None else value

    heads, groups = size("num_attention_heads"), size("num_query_groups")
    if heads % groups:
        raise ValueError(f"prune.num_attention_heads ({heads}) must be a multiple of num_query_groups ({groups}): "
                         "every KV group keeps the same number of heads")
    source_per_group = arch.num_attention_heads // arch.num_query_groups
    if heads // groups > source_per_group:
        raise ValueError(f"prune.num_attention_heads ({heads}) gives {heads // groups} heads per KV group but the "
                         f"source has {source_per_group}; allowed: at most {groups * source_per_group} for "
                         f"{groups} groups (heads never move between groups)")
    new = target.new_arch(arch)
    check_tp_sizes(arch, tp_size, "arch")
    check_tp_sizes(new, tp_size, "prune")
    if scores is not None:
        _validate_scores(arch, target, new, scores)


def check_tp_sizes(arch: ModelArch, tp_size: int, prefix: str) -> None:
    """Raise ValueError unless ``arch``'s TP-sharded sizes fit ``tp_size`` ranks: num_attention_heads and
    ffn_hidden_size divide by it; num_query_groups divides by it or divides it (Megatron-Core then replicates each
    KV group's K/V over tp_size / num_query_groups ranks). ``prefix`` names the fields in the message."""
    for name in ("num_attention_heads", "ffn_hidden_size"):
        if getattr(arch, name) % tp_size:
            raise ValueError(f"{prefix}.{name} ({getattr(arch, name)}) must be divisible by the tensor-parallel size "
                             f"({tp_size}): it is sharded over TP ranks")
    groups = arch.num_query_groups
    if groups % tp_size and tp_size % groups:
        raise ValueError(f"{prefix}.num_query_groups ({groups}) must be divisible by the tensor-parallel size "
                         f"({tp_size}) or divide it (then each KV group is replicated over TP ranks)")


def _validate_scores(arch: ModelArch, target: PruneTarget, new: ModelArch, scores: ImportanceScores) -> None:
    L = arch.num_layers
    expected = {"hidden": (arch.hidden_size,), "ffn": (L, arch.ffn_hidden_size),
                "heads": (L, arch.num_attention_heads), "groups": (L, arch.num_query_groups)}
    for name, shape in expected.items():
        if tuple(getattr(scores, name).shape) != shape:
            raise ValueError(f"scores.{name} has shape {tuple(getattr(scores, name).shape)}, expected {shape} for "
                             "this model: were the scores computed on another model?")
    if target.num_layers is None or new.num_layers == L:
        return
    k = L - new.num_layers
    if target.layer_metric == "block_search":
        if k not in scores.blocks or tuple(scores.blocks[k].shape) != (L - k + 1,):
            raise ValueError(f"prune.layer_metric 'block_search' with num_layers={new.num_layers} needs block scores "
                             f"for k={k} ([{L - k + 1}] values); the scores have block sizes {sorted(scores.blocks)}: "
                             f"add {k} to score.block_sizes")
    elif target.layer_metric not in scores.layers or tuple(scores.layers[target.layer_metric].shape) != (L,):
        raise ValueError(f"prune.layer_metric {target.layer_metric!r} is not in the scores; available: "
                         f"{sorted(scores.layers)} (block_search needs score.block_sizes)")


@dataclass
class PrunePlan:
    """Global keep indices (sorted ascending) of every pruned axis; the same for any parallel layout.

    hidden_keep [H']:            hidden channels
    ffn_keep    [L, F']:         MLP neurons of each source layer
    groups_keep [L, G']:         KV query groups of each source layer
    heads_keep  [L, G', A'/G']:  query heads (global within the layer) kept in each kept group
    layers_keep:                 kept source layers (0-based)
    arch:                        the pruned architecture
    """

    hidden_keep: torch.Tensor
    ffn_keep: torch.Tensor
    groups_keep: torch.Tensor
    heads_keep: torch.Tensor
    layers_keep: list[int]
    arch: ModelArch

    def to_dict(self) -> dict:
        return {"arch": self.arch.to_dict(), "layers_keep": list(self.layers_keep),
                "hidden_keep": self.hidden_keep.tolist(), "ffn_keep": self.ffn_keep.tolist(),
                "groups_keep": self.groups_keep.tolist(), "heads_keep": self.heads_keep.tolist()}

    @classmethod
    def from_dict(cls, values: dict) -> "PrunePlan":
        """The plan of ``to_dict``. Plans of older runs also record the "tp_size" their units were balanced over;
        it is ignored: their keep indices are global too, and apply the same at any TP size."""
        index = {k: torch.tensor(values[k], dtype=torch.long)
                 for k in ("hidden_keep", "ffn_keep", "groups_keep", "heads_keep")}
        return cls(**index, layers_keep=list(values["layers_keep"]), arch=ModelArch.from_dict(values["arch"]))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "PrunePlan":
        return cls.from_dict(json.loads(Path(path).read_text()))


def _top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices [R, keep] of the ``keep`` highest values in each row of scores [R, N], sorted ascending; ties keep
    the lower index."""
    ranked = torch.argsort(scores.float(), dim=-1, descending=True, stable=True)
    return ranked[:, :keep].sort(dim=-1).values


def _layers_keep(arch: ModelArch, scores: ImportanceScores, target: PruneTarget, num_layers: int) -> list[int]:
    L = arch.num_layers
    if target.drop_layers is not None:
        drop = set(target.drop_layers)
    elif num_layers == L:
        drop = set()
    elif target.layer_metric == "block_search":
        k = L - num_layers
        start, _ = scores.best_block(k)
        drop = set(range(start, start + k))
    else:
        ranked = torch.argsort(scores.layers[target.layer_metric].float(), stable=True)
        drop = set(ranked[:L - num_layers].tolist())
    return [i for i in range(L) if i not in drop]


def make_plan(arch: ModelArch, scores: ImportanceScores, target: PruneTarget) -> PrunePlan:
    """Keep the top-scored channels, neurons, groups, heads and layers of ``arch`` for ``target``.

    Hidden channels, neurons and groups: the global top H', F', G' (of each layer); heads: the top A'/G' within
    each kept group; ties keep the lower index. The plan does not depend on the tensor-parallel size: ``apply_plan``
    reshards the kept units evenly over the ranks.
    """
    validate(arch, target, scores=scores)
    new = target.new_arch(arch)
    L, G = arch.num_layers, arch.num_query_groups
    per_group, new_per_group = arch.num_attention_heads // G, new.num_attention_heads // new.num_query_groups
    groups_keep = _top(scores.groups, new.num_query_groups)
    # heads ranked within their group: [L * G, A/G] -> [L, G, A'/G'] global head indices, then the kept groups' rows
    heads_all = _top(scores.heads.reshape(L * G, per_group), new_per_group).view(L, G, new_per_group)
    heads_all = heads_all + per_group * torch.arange(G).view(1, G, 1)
    heads_keep = heads_all.gather(1, groups_keep.unsqueeze(-1).expand(-1, -1, new_per_group))
    return PrunePlan(
        hidden_keep=_top(scores.hidden.view(1, -1), new.hidden_size)[0],
        ffn_keep=_top(scores.ffn, new.ffn_hidden_size),
        groups_keep=groups_keep,
        heads_keep=heads_keep,
        layers_keep=_layers_keep(arch, scores, target, new.num_layers),
        arch=new,
    )
