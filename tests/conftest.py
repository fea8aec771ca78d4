import os
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

from nemo_minitron.models.arch import ModelArch


@pytest.fixture
def tiny_arch() -> ModelArch:
    """A tiny Llama: 2 layers, hidden 64, 4 heads in 2 KV groups, ffn 96, vocab 128."""
    return ModelArch(num_layers=2, hidden_size=64, ffn_hidden_size=96, num_attention_heads=4, num_query_groups=2,
                     vocab_size=128, kv_channels=16, max_position_embeddings=64, tie_word_embeddings=True)


@pytest.fixture
def single_process():
    """Megatron-Core parallel state for one CPU process (TP=PP=DP=1), torn down afterwards."""
    from nemo_minitron.runtime.distributed import ParallelConfig, destroy_distributed, init_distributed

    init_distributed(ParallelConfig(), seed=1234)
    yield
    destroy_distributed()


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: end-to-end tests on the embedded SmolLM2 model (minutes)")
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def char_tokenizer(text: str):
    """A character-level fast tokenizer over the 126 most frequent characters of ``text`` (+ <unk>, <eos>)."""
    from collections import Counter

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    chars = [c for c, _ in Counter(text).most_common(126)]
    vocab = {"<unk>": 0, "<eos>": 1, **{c: i + 2 for i, c in enumerate(chars)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


@pytest.fixture(scope="session")
def tiny_hf_run_inputs(tmp_path_factory):
    """A tiny random Llama (4 layers, vocab 128) with a character tokenizer, and a ~100 kB Shakespeare text file."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from nemo_minitron.data.corpus import shakespeare_files

    root = tmp_path_factory.mktemp("tiny_run_inputs")
    text = shakespeare_files()[0].read_text(encoding="latin-1")[:100_000]
    (root / "corpus.txt").write_text(text)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=True, rms_norm_eps=1e-5)
    LlamaForCausalLM(config).save_pretrained(root / "model")
    char_tokenizer(text).save_pretrained(root / "model")
    return root


@pytest.fixture(scope="session")
def tiny_task_path(tmp_path_factory):
    """A folder with tests/fixtures/lm_eval/tiny_mc.yaml (an lm_eval multiple-choice task, 12 questions), its
    data_files made absolute: lm_eval resolves them against the current directory."""
    import yaml

    fixtures = Path(__file__).parent / "fixtures" / "lm_eval"
    config = yaml.safe_load((fixtures / "tiny_mc.yaml").read_text())
    config["dataset_kwargs"]["data_files"]["test"] = str(fixtures / "tiny_mc.jsonl")
    folder = tmp_path_factory.mktemp("lm_eval_tasks")
    (folder / "tiny_mc.yaml").write_text(yaml.safe_dump(config))
    return folder
