"""Importance scores of every prunable axis, unsharded, saved as safetensors + a JSON summary."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


@dataclass
class ImportanceScores:
    """Full-size (TP-gathered, all pipeline stages) float32 scores; larger = more important.

    hidden: [hidden_size]                        embedding channels, summed over every norm
    ffn:    [num_layers, ffn_hidden_size]        MLP neurons
    heads:  [num_layers, num_attention_heads]    attention heads
    groups: [num_layers, num_query_groups]       KV query groups (L2 over their heads' scores)
    layers: {metric: [num_layers]}               depth scores, e.g. "block_influence", "lm_loss_drop"
    blocks: {k: [num_layers - k + 1]}            loss with layers start..start+k-1 removed (lower = safer)
    """

    hidden: torch.Tensor
    ffn: torch.Tensor
    heads: torch.Tensor
    groups: torch.Tensor
    layers: dict[str, torch.Tensor] = field(default_factory=dict)
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Every score by its name in scores.safetensors (float32, on the CPU)."""
        tensors = {"hidden": self.hidden, "ffn": self.ffn, "heads": self.heads, "groups": self.groups}
        tensors.update({f"layers.{k}": v for k, v in self.layers.items()})
        tensors.update({f"blocks.{k}": v for k, v in self.blocks.items()})
        return {k: v.float().contiguous().cpu() for k, v in tensors.items()}

    def check_finite(self, source: str) -> None:
        """FloatingPointError naming every score that holds NaN or inf (scores of ``source``)."""
        bad = {k: int((~torch.isfinite(v)).sum()) for k, v in self.tensors().items() if not torch.isfinite(v).all()}
        if bad:
            listed = ", ".join(f"{k}: {n} values" for k, n in bad.items())
            raise FloatingPointError(f"the importance scores of {source} are non-finite ({listed}): its weights or "
                                     "activations hold NaN / inf; check that model (e.g. re-run correct-teacher "
                                     "with a lower lr). Nothing was saved")

    def digest(self) -> str:
        """A hex digest of the scores' values (what a pruning plan was made from)."""
        digest = hashlib.blake2b(digest_size=16)
        for name, tensor in sorted(self.tensors().items()):
            digest.update(name.encode())
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors()
        save_file(tensors, str(directory / "scores.safetensors"))
        summary = {
            "meta": self.meta,
            "layers": {k: v.tolist() for k, v in self.layers.items()},
            "blocks": {str(k): v.tolist() for k, v in self.blocks.items()},
            "shapes": {k: list(v.shape) for k, v in tensors.items()},
        }
        (directory / "scores.json").write_text(json.dumps(summary, indent=2) + "\n")

    def best_block(self, k: int) -> tuple[int, float]:
        """(start, loss) of the contiguous block of ``k`` layers whose removal costs the least: the block of the
        highest task metric where blocks were scored on a task (meta["block_task"], loss = the metric); else the
        lowest loss among the blocks confirmed on all tokens after screening (meta["block_confirmed"]), else of
        blocks[k]."""
        if k not in self.blocks:
            raise ValueError(f"best_block: no block search for k={k}; searched block sizes: {sorted(self.blocks)}")
        by_task = self.meta.get("block_task", {}).get("values", {}).get(str(k))
        if by_task:
            start = max(by_task, key=lambda s: (by_task[s], -int(s)))
            return int(start), float(by_task[start])
        confirmed = self.meta.get("block_confirmed", {}).get(str(k))
        if confirmed:
            start = min(confirmed, key=lambda s: (confirmed[s], int(s)))
            return int(start), float(confirmed[start])
        start = int(torch.argmin(self.blocks[k]))
        return start, float(self.blocks[k][start])

    @classmethod
    def load(cls, directory: str | Path) -> "ImportanceScores":
        """The scores that ``save`` wrote to ``directory``; ValueError naming the file when one does not load."""
        from safetensors import SafetensorError

        directory = Path(directory)
        path = directory / "scores.safetensors"
        if not path.exists():
            raise FileNotFoundError(f"no importance scores at {path}: run `minitron score` first")
        try:
            tensors = load_file(str(path))
            meta = json.loads((directory / "scores.json").read_text()).get("meta", {})
            return cls(
                hidden=tensors["hidden"], ffn=tensors["ffn"], heads=tensors["heads"], groups=tensors["groups"],
                layers={k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("layers.")},
                blocks={int(k.split(".", 1)[1]): v for k, v in tensors.items() if k.startswith("blocks.")},
                meta=meta,
            )
        except (SafetensorError, OSError, ValueError, KeyError, AttributeError) as err:
            raise ValueError(f"the importance scores in {directory} do not load ({type(err).__name__}: {err}): "
                             f"re-run `minitron score`") from None
