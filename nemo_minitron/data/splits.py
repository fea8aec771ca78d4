"""Token windows cut at read time from memory-mapped token streams, several sources blended by weight, and the seeded
calibration / validation / selection / train splits, saved in a run folder as window indices.

Source k's stream of t_k tokens gives n_k = t_k // (seq_length + 1) non-overlapping windows of seq_length + 1 tokens
(the tail is dropped; column seq_length is the next-token label of the last input). Window w of the blend is
window w - o_k of the source k with o_k <= w < o_k + n_k, where o_k = n_0 + ... + n_{k-1}.

A run folder's data/ holds windows.json (each source's token file, dtype, length and weight, and seq_length) and
<split>.npy (the split's window indices) for each split.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from nemo_minitron.data.packing import token_stream, tokenized_source

SPLITS = ("calibration", "validation", "selection", "train")  # in the order they are cut from the blend
WINDOWS_FILE = "windows.json"


class PackedSplit:
    """Rows [n, seq_length + 1] of a split, read on demand as int64 tensors: row i is window indices[i] of the
    memory-mapped token streams (see the module docstring). Offers what the training and evaluation loops use of
    a tensor: shape, ndim, dtype, len, and indexing by an int (one row), a slice, or an integer tensor / array
    (those rows, in that order)."""

    ndim = 2
    dtype = torch.int64

    def __init__(self, streams: list[np.ndarray], seq_length: int, indices: np.ndarray):
        width = seq_length + 1
        self.windows = [s[: len(s) // width * width].reshape(-1, width) for s in streams]
        self.offsets = np.cumsum([0] + [len(w) for w in self.windows])
        self.indices = indices
        self.shape = torch.Size((len(indices), width))

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key) -> torch.Tensor:
        picks = np.asarray(self.indices[key.numpy() if isinstance(key, torch.Tensor) else key])
        flat = picks.reshape(-1)
        rows = np.empty((flat.size, self.shape[1]), dtype=np.int64)
        source = np.searchsorted(self.offsets, flat, side="right") - 1
        for k in np.unique(source):
            hit = source == k
            rows[hit] = self.windows[k][flat[hit] - self.offsets[k]]
        return torch.from_numpy(rows.reshape(*picks.shape, self.shape[1]))


def blend(sizes: list[int], weights: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """(source, sample) of every position of Megatron's greedy blend of sources holding ``sizes`` samples: position
    i takes the next sample of the source whose count lags weight * max(i, 1) most (Megatron-Core's
    build_blending_indices; weights are normalised to sum to 1). The blend ends where its source runs out."""
    from megatron.core.datasets.helpers_cpp import build_blending_indices

    weights = np.asarray(weights, dtype=np.float64)
    total = sum(sizes)
    source, sample = np.zeros(total, dtype=np.int16), np.zeros(total, dtype=np.int64)
    build_blending_indices(source, sample, weights / weights.sum(), len(sizes), total, False)
    exhausted = sample >= np.asarray(sizes, dtype=np.int64)[source]
    end = int(exhausted.argmax()) if exhausted.any() else total
    return source[:end], sample[:end]


def split_indices(sizes: list[int], weights: list[float], seed: int, num_calibration: int, num_validation: int,
                  num_selection: int, num_train: int, seq_length: int) -> dict[str, np.ndarray]:
    """Window indices (int64, into the blend's windows) of each split, from sources of ``sizes`` windows.

    Source k's windows are shuffled by torch.randperm(n_k) seeded with seed + k; the greedy blend of the shuffled
    sources is cut into calibration = positions [0, c), validation = [c, c + v), selection = [c + v, c + v + s)
    and train = the next num_train positions (-1: the rest of the blend). The held-out splits are the head of the
    blend, so each holds the sources in proportion to their weights, and they do not move when num_train changes.
    With one source the blend is its shuffled windows.
    """
    counts = {"calibration": num_calibration, "validation": num_validation, "selection": num_selection}
    for name, value in counts.items():
        if value < 0:
            raise ValueError(f"num_{name} must be >= 0, got {value}")
    if num_train < 1 and num_train != -1:
        raise ValueError(f"num_train must be >= 1 or -1 (all the rest), got {num_train}")
    source, sample = blend(sizes, weights)
    held_out = sum(counts.values())
    needed = held_out + max(num_train, 1)
    if needed > len(source):
        train = "num_train=-1 (all the rest, at least 1)" if num_train == -1 else f"num_train={num_train}"
        blended = f" (blended by weight until a source runs out; {sum(sizes)} in all)" if len(sizes) > 1 else ""
        raise ValueError(
            f"the corpus gives {len(source)} sequences of seq_length={seq_length}{blended}, but "
            + " + ".join(f"num_{name}={value}" for name, value in counts.items())
            + f" + {train} needs {needed}; lower these settings or seq_length, or use a larger corpus")
    offsets = np.cumsum([0] + list(sizes))
    shuffled = np.concatenate([np.zeros(0, dtype=np.int64)] + [
        offsets[k] + torch.randperm(n, generator=torch.Generator().manual_seed(seed + k)).numpy()
        for k, n in enumerate(sizes)])
    order = shuffled[offsets[source] + sample]
    bounds = np.cumsum([0, num_calibration, num_validation, num_selection,
                        len(order) - held_out if num_train == -1 else num_train])
    return {name: order[bounds[i]:bounds[i + 1]] for i, name in enumerate(SPLITS)}


def write_splits(out_dir: str | os.PathLike, sources: list[tuple[str, float]], tokenizer, *, seq_length: int,
                 seed: int, num_calibration: int, num_validation: int, num_selection: int, num_train: int,
                 text_field: str = "text", cache_dir: str | os.PathLike | None = None) -> dict[str, int]:
    """Tokenise every (source, weight) of ``sources`` (packing.tokenized_source, cached), split the blend of their
    windows (split_indices) and write out_dir/windows.json and out_dir/<split>.npy; returns the number of rows of
    each split and "windows", the number of windows of all sources."""
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    streams = []
    for source, weight in sources:
        prefix, dtype, num_tokens = tokenized_source(source, tokenizer, text_field, cache_dir)
        streams.append({"source": str(source), "weight": weight, "prefix": os.path.abspath(prefix), "dtype": dtype.name,
                        "tokens": num_tokens})
    sizes = [s["tokens"] // (seq_length + 1) for s in streams]
    for stream, size in zip(streams, sizes):
        if size == 0:
            raise ValueError(f"data.source {stream['source']} holds {stream['tokens']} tokens (with an EOS after "
                             f"each document), not one sequence of data.seq_length + 1 = {seq_length + 1}: is it "
                             f"empty, or the wrong file?")
    splits = split_indices(sizes, [s["weight"] for s in streams], seed, num_calibration, num_validation,
                           num_selection, num_train, seq_length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / WINDOWS_FILE).write_text(json.dumps({"seq_length": seq_length, "sources": streams}, indent=2) + "\n")
    for name, indices in splits.items():
        np.save(out_dir / f"{name}.npy", indices)
    return {**{name: len(indices) for name, indices in splits.items()}, "windows": sum(sizes)}


def load_split(path: str | os.PathLike) -> PackedSplit:
    """The split that write_splits saved as ``path`` (<split>.npy next to windows.json); its window indices and the
    token streams are memory-mapped."""
    path = Path(path)
    windows = path.parent / WINDOWS_FILE
    try:
        meta = json.loads(windows.read_text())
        streams = [(s["prefix"], s["dtype"], s["tokens"]) for s in meta["sources"]]
        seq_length, indices = meta["seq_length"], np.load(path, mmap_mode="r")
    except (OSError, ValueError, KeyError, TypeError, EOFError) as err:
        raise ValueError(f"{windows} or {path} is missing or damaged ({type(err).__name__}: {err}): run "
                         "`minitron prepare` again") from None
    return PackedSplit([token_stream(*s) for s in streams], seq_length, indices)
