"""The order in which training sees packed sequences, shared by every training loop.

Position p of the training stream (p = 0, 1, ...) is sequence ``order_e[p mod n]`` of the n packed sequences, where
epoch e = p // n and ``order_e`` is the permutation torch.randperm(n) drawn from a generator seeded with seed + e.
Step k of a run with global batch G consumes positions [k * G, (k + 1) * G).
The sequences are a tensor [n, s + 1] or a data.splits.PackedSplit (rows read from memory-mapped tokens).
"""

from __future__ import annotations

import torch


def epoch_order(n: int, epoch: int, seed: int) -> torch.Tensor:
    """The permutation of n sequences for ``epoch``."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))


def global_batch(sequences, step: int, global_batch_size: int, seed: int) -> torch.Tensor:
    """Rows [global_batch_size, s + 1] (int64) of step ``step`` (0-based) of the training stream over
    ``sequences``."""
    return stream_batch(sequences, step * global_batch_size, global_batch_size, seed)


def stream_batch(sequences, position: int, size: int, seed: int) -> torch.Tensor:
    """Rows [size, s + 1] (int64) at positions [position, position + size) of the training stream over
    ``sequences`` (a run whose global batch size changed continues from the positions it consumed)."""
    n = sequences.shape[0]
    positions = torch.arange(position, position + size)
    epochs = positions // n
    rows = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        hit = epochs == epoch
        rows[hit] = epoch_order(n, epoch, seed)[positions[hit] % n]
    return sequences[rows]


def rows_read(n: int, steps: int, global_batch_size: int, seed: int) -> torch.Tensor:
    """The sorted distinct rows of n sequences that ``steps`` steps of global_batch_size read."""
    positions = steps * global_batch_size
    return torch.arange(n) if positions >= n else epoch_order(n, 0, seed)[:positions].sort().values


class SequenceStream(torch.utils.data.Dataset):
    """The training stream as a map-style dataset of ``length`` positions: item p is {tokens, labels, loss_mask}
    of the sequence at position p (tokens = sequence[:-1], labels = sequence[1:]); with shuffle=False, item p is
    sequence p mod n (validation: every pass over n positions reads the n sequences in order)."""

    def __init__(self, sequences, length: int, seed: int = 0, shuffle: bool = True):
        if sequences.ndim != 2 or sequences.shape[1] < 2:
            raise ValueError(f"sequences must be [n, s + 1] with s >= 1, got shape {tuple(sequences.shape)}")
        self.sequences, self.length, self.seed, self.shuffle = sequences, length, seed, shuffle
        self._order = (None, None)  # (epoch, permutation) of the last epoch read

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, position: int) -> dict[str, torch.Tensor]:
        n = self.sequences.shape[0]
        row = position % n
        if self.shuffle:
            epoch = position // n
            if self._order[0] != epoch:
                self._order = (epoch, epoch_order(n, epoch, self.seed))
            row = int(self._order[1][position % n])
        sequence = self.sequences[row]
        return {"tokens": sequence[:-1], "labels": sequence[1:],
                "loss_mask": torch.ones(sequence.shape[0] - 1, dtype=torch.float32)}
