"""Documents -> Megatron-Core indexed datasets (PREFIX.bin + PREFIX.idx) of tokens, cached; read back by memory map.

A source's token stream is doc_0 EOS doc_1 EOS ... doc_k EOS (no other special tokens), stored in the smallest
integer type that holds the vocabulary. Megatron's .bin file holds the documents back to back, so the stream is
the .bin file itself, memory-mapped: nothing of corpus size is ever read into memory.
"""
import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nemo_minitron.data.corpus import SHAKESPEARE, iter_texts, source_files
from nemo_minitron.runtime.cache import cache_path

TOKENIZE_BATCH_CHARS = 1_000_000  # characters per tokenizer call (the fast tokenizer batches across documents)
SCAN_TOKENS = 1 << 24  # tokens read per chunk when checking a pre-tokenised dataset against the vocabulary


def token_dtype(vocab_size: int) -> type[np.integer]:
    """The smallest integer type of Megatron's indexed datasets that holds token ids 0 .. vocab_size - 1."""
    return next(t for t in (np.uint8, np.uint16, np.int32, np.int64) if vocab_size - 1 <= np.iinfo(t).max)


def write_indexed_dataset(texts: Iterable[str], tokenizer, prefix: str) -> int:
    """Tokenise ``texts`` into PREFIX.bin / PREFIX.idx, one Megatron document per text with EOS appended; returns
    the number of tokens written. Only TOKENIZE_BATCH_CHARS characters of text are tokenised at a time."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no eos_token; it separates documents")
    eos = [tokenizer.eos_token_id]
    dtype = token_dtype(len(tokenizer))
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
    num_tokens = 0
    with tqdm(unit="char", unit_scale=True, desc="tokenizing") as bar:
        for batch in _batches(texts, TOKENIZE_BATCH_CHARS):
            for ids in tokenizer(batch, add_special_tokens=False, return_attention_mask=False)["input_ids"]:
                builder.add_document(np.array(ids + eos, dtype=dtype), [len(ids) + 1])
                num_tokens += len(ids) + 1
            bar.update(sum(map(len, batch)))
    builder.finalize(prefix + ".idx")
    return num_tokens


def _batches(texts: Iterable[str], max_chars: int):
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


def indexed_dataset_prefix(source) -> str | None:
    """The path prefix of the Megatron-Core indexed dataset (PREFIX.bin + PREFIX.idx) that ``source`` names
    (the prefix itself, or either file), or None if it names none (or is not a path)."""
    if not isinstance(source, (str, os.PathLike)):
        return None
    text = str(source)
    prefix = text[:-4] if text.endswith((".bin", ".idx")) else text
    return prefix if Path(prefix + ".bin").is_file() and Path(prefix + ".idx").is_file() else None


def token_stream(prefix: str, dtype, num_tokens: int) -> np.ndarray:
    """The ``num_tokens`` tokens of PREFIX.bin as one read-only memory-mapped array."""
    path = Path(prefix + ".bin")
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing (was the cache folder cleared?): run `minitron prepare` again")
    if path.stat().st_size != num_tokens * np.dtype(dtype).itemsize:
        raise ValueError(f"{path} holds {path.stat().st_size} bytes, not the {num_tokens} {np.dtype(dtype).name} "
                         f"tokens it held when the splits were written: run `minitron prepare` again")
    if num_tokens == 0:  # mmap cannot map an empty file
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(num_tokens,))


def tokenized_source(source: str | os.PathLike, tokenizer, text_field: str = "text",
                     cache_dir: str | os.PathLike | None = None) -> tuple[str, np.dtype, int]:
    """(prefix, token dtype, number of tokens) of the indexed dataset holding ``source``'s token stream.

    A Megatron indexed dataset PREFIX is used in place (its token ids are checked against the tokenizer's
    vocabulary). Text is tokenised once with write_indexed_dataset into cache_dir (default: data/ in the cache
    folder, runtime/cache.py) as <key>.bin/.idx, where the key hashes the source (name, or path with each file's
    size and mtime), text_field, and the tokenizer's name_or_path, vocabulary size and EOS id. The files are
    written under temporary names and renamed into place, the .idx last, so a <key>.idx always has its whole .bin.
    """
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefix = indexed_dataset_prefix(source)
    if prefix is not None:
        dtype = IndexedDataset(prefix).index.dtype
        num_tokens = Path(prefix + ".bin").stat().st_size // np.dtype(dtype).itemsize
        _check_vocabulary(prefix, dtype, num_tokens, len(tokenizer))
        return prefix, np.dtype(dtype), num_tokens
    files = [] if str(source) == SHAKESPEARE else source_files(source)
    key = json.dumps({
        "source": str(source) if str(source) == SHAKESPEARE else str(Path(source).resolve()),
        "files": [(str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "text_field": text_field, "tokenizer": tokenizer.name_or_path, "vocab_size": len(tokenizer),
        "eos": tokenizer.eos_token_id,
    }, sort_keys=True)
    folder = Path(cache_dir) if cache_dir is not None else cache_path("data")
    prefix = str(folder / hashlib.sha256(key.encode()).hexdigest()[:16])
    dtype = np.dtype(token_dtype(len(tokenizer)))
    if not Path(prefix + ".idx").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = f"{prefix}.tmp{os.getpid()}"
        try:
            write_indexed_dataset(iter_texts(source, text_field), tokenizer, tmp)
            os.replace(tmp + ".bin", prefix + ".bin")
            os.replace(tmp + ".idx", prefix + ".idx")
        finally:
            for suffix in (".bin", ".idx"):
                Path(tmp + suffix).unlink(missing_ok=True)
    return prefix, dtype, Path(prefix + ".bin").stat().st_size // dtype.itemsize


def _check_vocabulary(prefix: str, dtype, num_tokens: int, vocab_size: int) -> None:
    """Raise if a token id of PREFIX.bin is outside the vocabulary; reads the file SCAN_TOKENS tokens at a time."""
    largest = -1
    with open(prefix + ".bin", "rb") as f, tqdm(total=num_tokens, unit="token", unit_scale=True,
                                                 desc=f"checking {Path(prefix).name}",
                                                 disable=num_tokens <= SCAN_TOKENS) as bar:
        while (chunk := np.fromfile(f, dtype=dtype, count=SCAN_TOKENS)).size:
            largest = max(largest, int(chunk.max()))
            bar.update(chunk.size)
    if largest >= vocab_size:
        raise ValueError(f"data.source {prefix}: token id {largest} is outside the tokenizer's vocabulary of "
                         f"{vocab_size}; was it tokenised with another tokenizer?")
