import os

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
