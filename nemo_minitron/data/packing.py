"""Documents -> packed token windows [n, seq_length + 1], seeded calibration / train / validation splits, cache."""
import hashlib
import json
import os
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

import torch
from tqdm import tqdm

from nemo_minitron.data.corpus import SHAKESPEARE, load_texts, source_files

TOKENIZE_BATCH_CHARS = 1_000_000  # characters per tokenizer call (the fast tokenizer batches across documents)


def pack_tokens(texts: list[str], tokenizer, seq_length: int) -> torch.Tensor:
    """Token windows [n, seq_length + 1] (int64) of the documents packed end to end.

    Stream = doc_0 EOS doc_1 EOS ... doc_k EOS (no other special tokens), cut into n = len(stream) // (seq_length + 1)
    non-overlapping windows; the tail is dropped. Column seq_length is the next-token label of the last input.
    """
    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; it separates documents")
    eos = [tokenizer.eos_token_id]
    chunks = [torch.zeros(0, dtype=torch.long)]  # an empty corpus packs to [0, seq_length + 1]
    num_chars = sum(map(len, texts))
    with tqdm(total=num_chars, unit="char", unit_scale=True, desc="tokenizing",
              disable=num_chars <= TOKENIZE_BATCH_CHARS) as bar:
        for batch in _batches(texts, TOKENIZE_BATCH_CHARS):
            ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
            chunks.append(torch.tensor(list(chain.from_iterable(doc + eos for doc in ids)), dtype=torch.long))
            bar.update(sum(map(len, batch)))
    return _windows(torch.cat(chunks), seq_length)


def _windows(stream: torch.Tensor, seq_length: int) -> torch.Tensor:
    """Non-overlapping windows [n, seq_length + 1] of a token stream; the tail is dropped."""
    n = len(stream) // (seq_length + 1)
    return stream[: n * (seq_length + 1)].view(n, seq_length + 1)


def indexed_dataset_prefix(source: str | os.PathLike) -> str | None:
    """The path prefix of the Megatron-Core indexed dataset (PREFIX.bin + PREFIX.idx) that ``source`` names
    (the prefix itself, or either file), or None if it names none."""
    text = str(source)
    prefix = text[:-4] if text.endswith((".bin", ".idx")) else text
    return prefix if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file() else None


def pack_indexed_dataset(prefix: str, seq_length: int, vocab_size: int) -> torch.Tensor:
    """Token windows [n, seq_length + 1] of a pre-tokenised Megatron-Core indexed dataset, its documents packed end
    to end as stored (Megatron's preprocessing already appends the end-of-document token when asked to)."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if seq_length < 1:
        raise ValueError(f"seq_length must be >= 1, got {seq_length}")
    dataset = IndexedDataset(prefix)
    stream = torch.from_numpy(np.concatenate([dataset[i] for i in range(len(dataset))]).astype(np.int64))
    if len(stream) and int(stream.max()) >= vocab_size:
        raise ValueError(f"data.source {prefix}: token id {int(stream.max())} is outside the tokenizer's vocabulary "
                         f"of {vocab_size}; was it tokenised with another tokenizer?")
    return _windows(stream, seq_length)


def _batches(texts: list[str], max_chars: int):
    """Consecutive groups of documents of at most max_chars characters each (a longer document stands alone)."""
    batch, size = [], 0
    for text in texts:
        if batch and size + len(text) > max_chars:
            yield batch
            batch, size = [], 0
        batch.append(text)
        size += len(text)
    if batch:
        yield batch


@dataclass
class DataSplits:
    """Disjoint token windows, each [n_i, seq_length + 1]."""

    calibration: torch.Tensor
    train: torch.Tensor
    validation: torch.Tensor


def split_sequences(sequences: torch.Tensor, num_calibration: int, num_train: int, num_validation: int,
                    seed: int) -> DataSplits:
    """Disjoint splits from one seeded permutation p of the rows: calibration = p[:c], validation = p[c:c+v],
    train = p[c+v:c+v+t] (num_train=-1: all the rest), so the validation set does not move with num_train."""
    for name, value in (("num_calibration", num_calibration), ("num_validation", num_validation)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if num_train < 1 and num_train != -1:
        raise ValueError(f"num_train must be >= 1 or -1 (all the rest), got {num_train}")
    n = sequences.shape[0]
    needed = num_calibration + num_validation + max(num_train, 1)
    if needed > n:
        train = "num_train=-1 (all the rest, at least 1)" if num_train == -1 else f"num_train={num_train}"
        raise ValueError(
            f"the corpus gives {n} sequences of seq_length={sequences.shape[1] - 1}, but num_calibration="
            f"{num_calibration} + {train} + num_validation={num_validation} needs {needed}; lower these settings "
            f"or seq_length, or use a larger corpus")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    c, v = num_calibration, num_calibration + num_validation
    end = n if num_train == -1 else v + num_train
    return DataSplits(calibration=sequences[perm[:c]], train=sequences[perm[v:end]],
                      validation=sequences[perm[c:v]])


def packed_corpus(source: str | os.PathLike, tokenizer, seq_length: int, cache_dir: str | os.PathLike = ".cache/data",
                  text_field: str = "text") -> torch.Tensor:
    """pack_tokens(load_texts(source, text_field), tokenizer, seq_length), cached in cache_dir/<key>.pt; a Megatron
    indexed dataset (already tokenised) is packed directly with pack_indexed_dataset.

    The key hashes the source (name, or path with each file's size and mtime), text_field, the tokenizer's
    name_or_path, vocab size and EOS id, and seq_length.
    """
    prefix = indexed_dataset_prefix(source)
    if prefix is not None:
        return pack_indexed_dataset(prefix, seq_length, len(tokenizer))
    files = [] if str(source) == SHAKESPEARE else source_files(source)
    key = json.dumps({
        "source": str(source) if str(source) == SHAKESPEARE else str(Path(source).resolve()),
        "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "text_field": text_field, "tokenizer": tokenizer.name_or_path, "vocab_size": len(tokenizer),
        "eos": tokenizer.eos_token_id, "seq_length": seq_length,
    }, sort_keys=True)
    path = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    sequences = pack_tokens(load_texts(source, text_field), tokenizer, seq_length)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    torch.save(sequences, tmp)
    os.replace(tmp, path)
    return sequences
