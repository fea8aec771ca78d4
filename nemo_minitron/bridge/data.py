"""Packed token sequences as a Megatron-Bridge dataset: Bridge's data loader then reads the training stream in the
order of the project trainer (data/order.py), so both loops see the same global batches."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from nemo_minitron.data.order import SequenceStream
from nemo_minitron.data.splits import load_split
from nemo_minitron.runtime.absent_imports import absent_imports

with absent_imports():
    from megatron.bridge.training.config import DatasetProvider


@dataclass(kw_only=True)
class PackedSequences(DatasetProvider):
    """Train / validation splits: a run folder's data/train.npy and data/validation.npy (window indices into
    memory-mapped tokens, read with data.splits.load_split), or int64 tensors [n, seq_length + 1] saved with
    ``torch.save`` (.pt). The training dataset has as many positions as Bridge will read
    (train_iters x global batch); validation is read in order, from the first sequence again at each
    evaluation when train.eval_iters x global batch = the number of validation sequences."""

    train_path: str
    validation_path: str | None = None
    seed: int = 1234
    seq_length: int = 0  # filled from the tensors; kept so Bridge's data-loader checks can read it
    # Bridge's data-loader settings, for tensors already in memory: no worker processes, Megatron's sequential
    # sampler (the order is the dataset's), pinned memory only where there is a GPU to copy to.
    num_workers: int = 0
    dataloader_type: str = "single"
    pin_memory: bool = field(default_factory=torch.cuda.is_available)

    def build_datasets(self, context):
        train = _load(self.train_path)
        self.seq_length = train.shape[1] - 1
        valid = None
        if self.validation_path is not None and context.valid_samples > 0:
            valid = SequenceStream(_load(self.validation_path), context.valid_samples, shuffle=False)
        return SequenceStream(train, context.train_samples, self.seed), valid, None


def _load(path: str):
    if not Path(path).is_file():
        raise FileNotFoundError(f"dataset: {path} not found (a split written by `minitron prepare`)")
    return load_split(path) if path.endswith(".npy") else torch.load(path, weights_only=True)
