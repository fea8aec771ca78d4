import torch

from nemo_minitron.models.build import build_gpt_model, forward_logits
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed


def test_parameter_count_matches_arch(tiny_arch, single_process):
    model = build_gpt_model(tiny_arch)
    assert sum(p.numel() for p in model.parameters()) == tiny_arch.num_parameters()
    untied = tiny_arch.replace(tie_word_embeddings=False, add_qkv_bias=True)
    model = build_gpt_model(untied)
    assert sum(p.numel() for p in model.parameters()) == untied.num_parameters()


def test_forward_shape(tiny_arch, single_process):
    model = build_gpt_model(tiny_arch)
    logits = forward_logits(model, torch.randint(0, tiny_arch.vocab_size, (2, 8)))
    assert logits.shape == (2, 8, tiny_arch.vocab_size)


def _tp_forward(rank, world_size, arch):
    init_distributed(ParallelConfig(tensor_model_parallel_size=world_size))
    model = build_gpt_model(arch)
    logits = forward_logits(model, torch.randint(0, arch.vocab_size, (2, 8)))
    assert logits.shape == (2, 8, arch.vocab_size // world_size)


def test_tp2_builds_sharded_model(tiny_arch):
    run_distributed(_tp_forward, 2, tiny_arch)


def _tp2_rejects_indivisible(rank, world_size, arch):
    import pytest

    init_distributed(ParallelConfig(tensor_model_parallel_size=world_size))
    with pytest.raises(ValueError, match=r"arch.num_attention_heads=9 is not divisible by parallel.tensor_model"):
        build_gpt_model(arch.replace(num_attention_heads=9, num_query_groups=3))


def test_tp_indivisible_sizes_fail_clearly(tiny_arch):
    run_distributed(_tp2_rejects_indivisible, 2, tiny_arch)
