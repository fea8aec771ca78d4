import pytest
import torch
import torch.nn.functional as F

from nemo_minitron.evaluation.loss import validation_loss
from nemo_minitron.models.build import build_gpt_model, forward_logits
from nemo_minitron.models.hf_convert import (arch_from_hf_config, gather_hf_state_dict, hf_config_from_arch,
                                             load_hf_checkpoint, load_hf_state_dict, save_hf_checkpoint)
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed


def _tiny_hf(model_type="llama", tied=False, num_key_value_heads=2, num_layers=2):
    """Random tiny HF causal LM (fp32, eager attention); weights std 0.1 and norm weights 1 +- 0.1."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}[
        model_type]
    config = config_cls(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=num_layers,
                        num_attention_heads=4, num_key_value_heads=num_key_value_heads, max_position_embeddings=64,
                        rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=tied, initializer_range=0.1,
                        attn_implementation="eager")
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _hf_tensors(hf_model, tied):
    return {k: v for k, v in hf_model.state_dict().items() if not (tied and k == "lm_head.weight")}


def _assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def _gathered_logits(model, tokens):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(forward_logits(model, tokens))


def test_arch_from_hf_config_and_back():
    from transformers import LlamaConfig, Qwen2Config

    llama = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=64,
                        rope_theta=5e5, rms_norm_eps=1e-6, tie_word_embeddings=True)
    arch = arch_from_hf_config(llama)
    assert (arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads,
            arch.num_query_groups, arch.kv_channels, arch.vocab_size) == (3, 64, 96, 4, 2, 24, 128)
    assert (arch.rotary_base, arch.norm_epsilon, arch.tie_word_embeddings, arch.add_qkv_bias) == (5e5, 1e-6, True,
                                                                                                   False)
    qwen = arch_from_hf_config(Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    assert qwen.kv_channels == 16 and qwen.add_qkv_bias
    for model_type, a in (("llama", arch), ("mistral", arch), ("qwen2", qwen)):
        exported = hf_config_from_arch(a, model_type)
        assert exported.model_type == model_type and exported.hidden_act == "silu"
        assert arch_from_hf_config(exported) == a


@pytest.mark.parametrize("overrides, field", [
    (dict(model_type="gpt2"), "model_type"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope_type"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(model_type="mistral", sliding_window=16), "sliding_window"),
])
def test_unsupported_hf_configs_are_rejected(overrides, field):
    from transformers import AutoConfig

    config = AutoConfig.for_model(overrides.pop("model_type", "llama"), hidden_size=64, num_attention_heads=4,
                                  max_position_embeddings=64, **overrides)
    with pytest.raises(ValueError, match=field):
        arch_from_hf_config(config)


def test_unsupported_export_is_rejected(tiny_arch):
    with pytest.raises(ValueError, match="model_type"):
        hf_config_from_arch(tiny_arch, "gpt2")
    with pytest.raises(ValueError, match="add_qkv_bias"):
        hf_config_from_arch(tiny_arch, "qwen2")


@pytest.mark.parametrize("model_type, tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_hf_to_megatron_logits_and_round_trip(model_type, tied, single_process):
    hf = _tiny_hf(model_type, tied)
    arch = arch_from_hf_config(hf.config)
    model = build_gpt_model(arch)
    load_hf_state_dict(model, hf.state_dict(), arch)
    tokens = torch.randint(0, arch.vocab_size, (2, 12))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert expected.std() > 0.1  # the comparison below is not between near-zero numbers
    assert (forward_logits(model, tokens).detach() - expected).abs().max() < 1e-4
    _assert_same_tensors(gather_hf_state_dict(model, arch), _hf_tensors(hf, tied))


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "to", "be", "or", "not"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("model_type, tied", [("llama", True), ("qwen2", False)])
def test_export_loads_in_transformers(model_type, tied, tiny_arch, single_process, tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    arch = tiny_arch.replace(tie_word_embeddings=tied, add_qkv_bias=model_type == "qwen2")
    model = build_gpt_model(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_hf_checkpoint(model, arch, tmp_path, tokenizer=_word_tokenizer(), model_type=model_type)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, attn_implementation="eager").eval()
    assert hf.config.hidden_act == "silu" and hf.config.model_type == model_type
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (1, 2)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path, local_files_only=True)
    assert tokenizer("to be or not").input_ids == [3, 4, 5, 6]
    tokens = torch.randint(0, arch.vocab_size, (2, 12))
    with torch.no_grad():
        expected = forward_logits(model, tokens)
        assert (hf(tokens).logits - expected).abs().max() < 1e-4
    loaded_arch, state = load_hf_checkpoint(tmp_path)
    assert loaded_arch == arch
    _assert_same_tensors(state, gather_hf_state_dict(model, arch))


def _distributed_checks(rank, world_size):
    # TP=2: tied with 2 KV groups (one per rank), untied with 1 KV group (each rank holds half of its q heads).
    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    tokens = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    for tied, groups in ((True, 2), (False, 1)):
        hf = _tiny_hf("llama", tied, num_key_value_heads=groups)
        arch = arch_from_hf_config(hf.config)
        model = build_gpt_model(arch)
        load_hf_state_dict(model, hf.state_dict(), arch)
        with torch.no_grad():
            expected = hf(tokens).logits
        assert (_gathered_logits(model, tokens) - expected).abs().max() < 1e-4, (tied, groups)
        _assert_same_tensors(gather_hf_state_dict(model, arch), _hf_tensors(hf, tied))
    # PP=2 (2 layers per stage; tied output layer copy on the last stage): loss and round trip.
    init_distributed(ParallelConfig(pipeline_model_parallel_size=2))
    sequences = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(2))
    for tied in (True, False):
        hf = _tiny_hf("llama", tied, num_layers=4)
        arch = arch_from_hf_config(hf.config)
        model = build_gpt_model(arch)
        load_hf_state_dict(model, hf.state_dict(), arch)
        with torch.no_grad():
            logits = hf(sequences[:, :-1]).logits
        expected = F.cross_entropy(logits.reshape(-1, 128), sequences[:, 1:].reshape(-1)).item()
        assert abs(validation_loss(model, sequences, micro_batch_size=1) - expected) < 1e-5, tied
        _assert_same_tensors(gather_hf_state_dict(model, arch), _hf_tensors(hf, tied))


def test_tp2_logits_and_pp2_loss_match_hf():
    run_distributed(_distributed_checks, 2)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}


def test_llama3_rope_scaling_converts_and_matches_hf(single_process):
    """Llama-3.1's RoPE (rope_type llama3, theta 5e5) on a shape-alike miniature: Megatron's logits equal HF's over
    64 positions, a model without the scaling does not, and the scaling survives export."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=16384,
                         rope_theta=5e5, rope_scaling=dict(LLAMA3_SCALING), rms_norm_eps=1e-5,
                         tie_word_embeddings=False, initializer_range=0.1, attn_implementation="eager")
    torch.manual_seed(0)
    hf = LlamaForCausalLM(config).eval()
    arch = arch_from_hf_config(hf.config)
    assert arch.rope_scaling_factor == 8.0 and arch.rotary_base == 5e5 and arch.num_query_groups == 1
    tokens = torch.randint(0, arch.vocab_size, (2, 64))
    with torch.no_grad():
        expected = hf(tokens).logits
    models = {}
    for name, a in (("scaled", arch), ("plain", arch.replace(rope_scaling_factor=None))):
        models[name] = build_gpt_model(a)
        load_hf_state_dict(models[name], hf.state_dict(), a)
    assert (forward_logits(models["scaled"], tokens).detach() - expected).abs().max() < 1e-4
    assert (forward_logits(models["plain"], tokens).detach() - expected).abs().max() > 1e-3
    assert arch_from_hf_config(hf_config_from_arch(arch)) == arch


def test_llama3_rope_scaling_megatron_cannot_compute_is_rejected():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=16384,
                         rope_scaling={**LLAMA3_SCALING, "low_freq_factor": 2.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        arch_from_hf_config(config)
