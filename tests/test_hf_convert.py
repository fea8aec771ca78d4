import contextlib

import pytest
import torch
import torch.nn.functional as F

from nemo_minitron.evaluation.loss import validation_loss
from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.models.arch import ModelArch, transformer_engine_available
from nemo_minitron.models.build import build_gpt_model, forward_logits
from nemo_minitron.models.hf_convert import (arch_from_hf_config, gather_hf_state_dict, hf_config_from_arch,
                                             load_hf_checkpoint, load_hf_state_dict, save_hf_checkpoint)
from nemo_minitron.pruning.apply import apply_plan
from nemo_minitron.pruning.plan import PruneTarget, make_plan
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}
_SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, max_position_embeddings=64,
              rms_norm_eps=1e-5, initializer_range=0.1)
# Shape-alike miniatures of the models the recipes name: (transformers config class, what sets each apart).
MINIATURES = {
    # Llama-3.1-8B: GQA, untied, RoPE theta 5e5 with llama3 scaling.
    "llama3.1": ("LlamaConfig", dict(num_attention_heads=4, num_key_value_heads=1, rope_theta=5e5,
                                     rope_scaling=LLAMA3_SCALING, max_position_embeddings=16384,
                                     tie_word_embeddings=False)),
    # Mistral-NeMo-12B: head_dim 128 with hidden 5120 and 32 heads (heads * head_dim != hidden), 8 KV groups,
    # untied, theta 1e6, no sliding window.
    "mistral-nemo": ("MistralConfig", dict(num_attention_heads=4, num_key_value_heads=2, head_dim=32, rope_theta=1e6,
                                           sliding_window=None, tie_word_embeddings=False)),
    # Qwen2 (e.g. Qwen2.5-0.5B: 14 heads, 2 KV groups): q/k/v biases, tied embeddings, GQA.
    "qwen2": ("Qwen2Config", dict(num_attention_heads=8, num_key_value_heads=2, rope_theta=1e6,
                                  tie_word_embeddings=True)),
}


def _random_hf(config):
    """Random HF causal LM of ``config`` (fp32, eager attention): weights std 0.1, norm weights 1 +- 0.1, biases
    +- 0.1."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


def _miniature(name):
    import transformers

    config_class, fields = MINIATURES[name]
    return _random_hf(getattr(transformers, config_class)(**{**_SMALL, **fields}))


def _tiny_hf(model_type="llama", tied=False, num_key_value_heads=2, num_layers=2):
    from transformers import LlamaConfig, Qwen2Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[model_type]
    return _random_hf(config_class(**{**_SMALL, "num_hidden_layers": num_layers}, num_attention_heads=4,
                                   num_key_value_heads=num_key_value_heads, tie_word_embeddings=tied))


def _hf_tensors(hf_model):
    tied = hf_model.config.tie_word_embeddings
    return {k: v for k, v in hf_model.state_dict().items() if not (tied and k == "lm_head.weight")}


def _assert_same_tensors(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(actual[name], tensor), name


def _gathered_logits(model, tokens):
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    with torch.no_grad():
        return gather_from_tensor_model_parallel_region(forward_logits(model, tokens))


def _loaded(hf, state=None):
    """(arch, this rank's Megatron model) of HF model ``hf``, loaded from ``state`` (default: hf's tensors)."""
    arch = arch_from_hf_config(hf.config)
    model = build_gpt_model(arch)
    load_hf_state_dict(model, hf.state_dict() if state is None else state, arch)
    return arch, model


@contextlib.contextmanager
def _counting_reads():
    """Record the number of elements of every tensor read through ``safetensors.safe_open`` (get_tensor, or
    indexing a get_slice) while active."""
    import safetensors

    real, reads = safetensors.safe_open, []

    class Slice:
        def __init__(self, source):
            self.source = source

        def get_shape(self):
            return self.source.get_shape()

        def __getitem__(self, index):
            tensor = self.source[index]
            reads.append(tensor.numel())
            return tensor

    class File:
        def __init__(self, *args, **kwargs):
            self.file = real(*args, **kwargs)

        def __enter__(self):
            self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.file.keys()

        def get_tensor(self, name):
            tensor = self.file.get_tensor(name)
            reads.append(tensor.numel())
            return tensor

        def get_slice(self, name):
            return Slice(self.file.get_slice(name))

    safetensors.safe_open = File
    try:
        yield reads
    finally:
        safetensors.safe_open = real


def test_arch_from_hf_config_and_back():
    from transformers import LlamaConfig, Qwen2Config

    llama = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=64,
                        rope_theta=5e5, rms_norm_eps=1e-6, tie_word_embeddings=True)
    arch = arch_from_hf_config(llama)
    assert (arch.num_layers, arch.hidden_size, arch.ffn_hidden_size, arch.num_attention_heads,
            arch.num_query_groups, arch.kv_channels, arch.vocab_size) == (3, 64, 96, 4, 2, 24, 128)
    assert (arch.rotary_base, arch.norm_epsilon, arch.tie_word_embeddings, arch.add_qkv_bias,
            arch.model_type) == (5e5, 1e-6, True, False, "llama")
    qwen = arch_from_hf_config(Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2))
    assert qwen.kv_channels == 16 and qwen.add_qkv_bias and qwen.model_type == "qwen2"
    for a in (arch, arch.replace(model_type="mistral"), qwen):
        exported = hf_config_from_arch(a)
        assert exported.model_type == a.model_type and exported.hidden_act == "silu"
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


def test_model_type_is_checked_and_old_arch_files_load_as_llama(tiny_arch):
    with pytest.raises(ValueError, match=r"arch.model_type must be one of \('llama', 'mistral', 'qwen2'\)"):
        tiny_arch.replace(model_type="gpt2")
    with pytest.raises(ValueError, match="arch.add_qkv_bias must be True for arch.model_type 'qwen2'"):
        hf_config_from_arch(tiny_arch.replace(model_type="qwen2"))
    with pytest.raises(ValueError, match="arch.add_qkv_bias must be False for arch.model_type 'llama'"):
        hf_config_from_arch(tiny_arch.replace(add_qkv_bias=True))
    written_before_model_type = {k: v for k, v in tiny_arch.to_dict().items() if k != "model_type"}
    assert ModelArch.from_dict(written_before_model_type).model_type == "llama"


@pytest.mark.parametrize("model_type, tied", [("llama", False), ("llama", True), ("qwen2", False)])
def test_hf_to_megatron_logits_and_round_trip(model_type, tied, single_process):
    hf = _tiny_hf(model_type, tied)
    arch, model = _loaded(hf)
    tokens = torch.randint(0, arch.vocab_size, (2, 12))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert expected.std() > 0.1  # the comparison below is not between near-zero numbers
    assert (forward_logits(model, tokens).detach() - expected).abs().max() < 1e-4
    _assert_same_tensors(gather_hf_state_dict(model, arch), _hf_tensors(hf))


def test_hf_tensors_of_another_shape_are_rejected(single_process):
    hf = _tiny_hf()
    arch = arch_from_hf_config(hf.config).replace(ffn_hidden_size=48)
    with pytest.raises(ValueError, match=r"decoder.layers.0.mlp.linear_fc1.weight: HF tensors .* have shapes "
                                         r"\[\(96, 64\), \(96, 64\)\], but this rank's parameter \(96, 64\) at TP=1 "
                                         r"needs \[\(48, 64\), \(48, 64\)\]"):
        load_hf_state_dict(build_gpt_model(arch), hf.state_dict(), arch)


@pytest.mark.parametrize("name, expected", [
    ("llama3.1", dict(model_type="llama", rope_scaling_factor=8.0, rotary_base=5e5, num_query_groups=1,
                      tie_word_embeddings=False)),
    ("mistral-nemo", dict(model_type="mistral", kv_channels=32, rotary_base=1e6, num_query_groups=2,
                          tie_word_embeddings=False)),
    ("qwen2", dict(model_type="qwen2", add_qkv_bias=True, num_query_groups=2, tie_word_embeddings=True)),
])
def test_recipe_models_convert_and_export_as_their_type(name, expected, single_process, tmp_path):
    """Each miniature: Megatron's logits equal HF's over 64 positions, the weights round-trip, and the export is
    the same model type with the same logits."""
    from transformers import AutoModelForCausalLM

    hf = _miniature(name)
    arch, model = _loaded(hf)
    assert {k: getattr(arch, k) for k in expected} == expected
    tokens = torch.randint(0, arch.vocab_size, (2, 64))
    with torch.no_grad():
        reference = hf(tokens).logits
    assert reference.std() > 0.1
    assert (forward_logits(model, tokens).detach() - reference).abs().max() < 1e-4
    _assert_same_tensors(gather_hf_state_dict(model, arch), _hf_tensors(hf))
    save_hf_checkpoint(model, arch, tmp_path)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, attn_implementation="eager")
    assert exported.config.model_type == arch.model_type and arch_from_hf_config(exported.config) == arch
    with torch.no_grad():
        assert (exported(tokens).logits - reference).abs().max() < 1e-4


def test_llama3_rope_scaling_is_needed_at_these_positions(single_process):
    """Without its llama3 RoPE scaling the Llama-3.1 miniature's logits differ from HF's over 64 positions (so the
    match above tests the scaling)."""
    hf = _miniature("llama3.1")
    arch = arch_from_hf_config(hf.config).replace(rope_scaling_factor=None)
    model = build_gpt_model(arch)
    load_hf_state_dict(model, hf.state_dict(), arch)
    tokens = torch.randint(0, arch.vocab_size, (2, 64))
    with torch.no_grad():
        assert (forward_logits(model, tokens) - hf(tokens).logits).abs().max() > 1e-3


def test_llama3_rope_scaling_megatron_cannot_compute_is_rejected():
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=16384,
                         rope_scaling={**LLAMA3_SCALING, "low_freq_factor": 2.0})
    with pytest.raises(ValueError, match="low_freq_factor"):
        arch_from_hf_config(config)


def _word_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<s>", "</s>", "to", "be", "or", "not"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("changes, exported_type", [
    (dict(), "llama"),
    (dict(hidden_size=36, num_attention_heads=9, num_query_groups=3, kv_channels=8, ffn_hidden_size=40), "llama"),
    # hidden_size not a multiple of num_attention_heads: LlamaConfig refuses it, MistralConfig takes it.
    (dict(hidden_size=40, num_attention_heads=9, num_query_groups=3, kv_channels=8, tie_word_embeddings=False),
     "mistral"),
    (dict(hidden_size=44, num_attention_heads=8, num_query_groups=1, kv_channels=8, rope_scaling_factor=8.0,
          max_position_embeddings=16384), "mistral"),
    (dict(model_type="mistral", hidden_size=48, num_attention_heads=6, num_query_groups=2, kv_channels=16,
          tie_word_embeddings=False), "mistral"),
    (dict(model_type="qwen2", add_qkv_bias=True, hidden_size=40, num_attention_heads=9, num_query_groups=3,
          kv_channels=8, tie_word_embeddings=False), "qwen2"),
], ids=["llama", "llama_heads_x_dim_ne_hidden", "llama_hidden_not_multiple_of_heads", "llama3_rope_gqa_8",
        "mistral_gqa_3", "qwen2_hidden_not_multiple_of_heads"])
def test_any_pruned_shape_exports_and_loads_in_transformers(changes, exported_type, tiny_arch, single_process,
                                                             tmp_path):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    arch = tiny_arch.replace(**changes)
    model = build_gpt_model(arch)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    save_hf_checkpoint(model, arch, tmp_path, tokenizer=_word_tokenizer())
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, attn_implementation="eager").eval()
    assert (hf.config.model_type, hf.config.head_dim, hf.config.hidden_act) == (exported_type, arch.kv_channels,
                                                                                  "silu")
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (1, 2)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(tmp_path, local_files_only=True)
    assert tokenizer("to be or not").input_ids == [3, 4, 5, 6]
    tokens = torch.randint(0, arch.vocab_size, (2, 12))
    with torch.no_grad():
        expected = forward_logits(model, tokens)
        assert expected.std() > 0.1
        assert (hf(tokens).logits - expected).abs().max() < 1e-4
    loaded_arch, state = load_hf_checkpoint(tmp_path)
    assert loaded_arch == arch.replace(model_type=exported_type)
    _assert_same_tensors(state, gather_hf_state_dict(model, arch))


def test_pruned_qwen2_student_exports_as_qwen2_with_biases(single_process, tmp_path):
    """A Qwen2 teacher pruned to hidden 38 (not a multiple of its 4 heads), 4 heads in 2 groups, ffn 48 exports as
    Qwen2 with its q/k/v biases and the student's logits."""
    from transformers import AutoModelForCausalLM

    arch, model = _loaded(_miniature("qwen2"))
    g = torch.Generator().manual_seed(0)
    scores = ImportanceScores(hidden=torch.rand(64, generator=g), ffn=torch.rand(2, 96, generator=g),
                              heads=torch.rand(2, 8, generator=g), groups=torch.rand(2, 2, generator=g))
    plan = make_plan(arch, scores, PruneTarget(hidden_size=38, ffn_hidden_size=48, num_attention_heads=4))
    student = apply_plan(model, arch, plan)
    assert student.model_type == "qwen2" and student.hidden_size == 38
    save_hf_checkpoint(model, student, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True, attn_implementation="eager")
    assert hf.config.model_type == "qwen2"
    assert hf.state_dict()["model.layers.1.self_attn.k_proj.bias"].abs().min() > 0
    tokens = torch.randint(0, arch.vocab_size, (2, 12))
    with torch.no_grad():
        assert (hf(tokens).logits - forward_logits(model, tokens)).abs().max() < 1e-4


# Megatron-Core's Transformer Engine layer spec fuses each norm into the linear after it (TELayerNormColumnParallel-
# Linear) and has no input_layernorm / pre_mlp_layernorm parameters.
TE_NAMES = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _te_name(name):
    for local, te in TE_NAMES.items():
        if name.endswith("." + local):
            return name[:-len(local)] + te
    return name


class _TENamed:
    """What the converter reads of a GPTModel (decoder.layers[i].layer_number, named_parameters), with the
    parameter names of the Transformer Engine spec: zero tensors shaped like ``model``'s parameters."""

    def __init__(self, model):
        self.decoder = model.decoder
        self.params = {_te_name(name): torch.zeros_like(p) for name, p in model.named_parameters()}

    def named_parameters(self):
        return iter(self.params.items())


def test_transformer_engine_names_load_and_gather(single_process):
    """HF weights loaded under the TE spec's names, renamed to the local spec's: the local model's logits equal
    HF's; gathered from the TE names they are HF's tensors."""
    hf = _miniature("qwen2")
    arch = arch_from_hf_config(hf.config)
    model = build_gpt_model(arch)
    te = _TENamed(model)
    assert sum(name.endswith("layer_norm_weight") for name in te.params) == 2 * arch.num_layers
    assert not any("layernorm" in name for name in te.params if name.startswith("decoder.layers."))
    load_hf_state_dict(te, hf.state_dict(), arch)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(te.params[_te_name(name)])
    tokens = torch.randint(0, arch.vocab_size, (2, 12))
    with torch.no_grad():
        assert (forward_logits(model, tokens) - hf(tokens).logits).abs().max() < 1e-4
    _assert_same_tensors(gather_hf_state_dict(te, arch), _hf_tensors(hf))


@pytest.mark.skipif(not transformer_engine_available(), reason="needs Transformer Engine and a CUDA GPU")
def test_transformer_engine_model_loads_and_gathers_hf(single_process):
    hf = _miniature("qwen2").cuda()
    arch = arch_from_hf_config(hf.config)
    model = build_gpt_model(arch, transformer_impl="transformer_engine")
    assert any(name.endswith("linear_qkv.layer_norm_weight") for name, _ in model.named_parameters())
    load_hf_state_dict(model, hf.state_dict(), arch)
    tokens = torch.randint(0, arch.vocab_size, (2, 64), device="cuda")
    with torch.no_grad():
        assert (forward_logits(model, tokens) - hf(tokens).logits).abs().max() < 1e-2  # TE GEMMs may use TF32
    _assert_same_tensors(gather_hf_state_dict(model, arch), _hf_tensors(hf))


def test_sharded_checkpoint_loads_lazily(single_process, tmp_path):
    """A sharded HF save loads with HF's logits; opening it reads no tensor, and loading reads each tensor once."""
    hf = _miniature("mistral-nemo")
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("*.safetensors"))) > 2
    with _counting_reads() as reads:
        arch, state = load_hf_checkpoint(tmp_path)
        assert reads == [] and sorted(state) == sorted(hf.state_dict())
        model = build_gpt_model(arch)
        load_hf_state_dict(model, state, arch)
    assert sum(reads) == sum(p.numel() for p in model.parameters())
    tokens = torch.randint(0, arch.vocab_size, (2, 12))
    with torch.no_grad():
        assert (forward_logits(model, tokens) - hf(tokens).logits).abs().max() < 1e-4


def _distributed_checks(rank, world_size, sharded_dir):
    from transformers import AutoModelForCausalLM

    # TP=2: tied with 2 KV groups (one per rank), untied with 1 KV group (each rank holds half of its q heads), the
    # recipe models' miniatures, and the sharded checkpoint, of which each rank reads only its shard.
    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    tokens = torch.randint(0, 128, (2, 64), generator=torch.Generator().manual_seed(1))
    models = {"tied, 2 groups": _tiny_hf("llama", True, num_key_value_heads=2),
              "untied, 1 group": _tiny_hf("llama", False, num_key_value_heads=1),
              **{name: _miniature(name) for name in MINIATURES}}
    for name, hf in models.items():
        arch, model = _loaded(hf)
        with torch.no_grad():
            expected = hf(tokens).logits
        assert (_gathered_logits(model, tokens) - expected).abs().max() < 1e-4, name
        _assert_same_tensors(gather_hf_state_dict(model, arch), _hf_tensors(hf))
    hf = AutoModelForCausalLM.from_pretrained(sharded_dir, local_files_only=True, attn_implementation="eager")
    with _counting_reads() as reads:
        arch, model = _loaded(hf, state=load_hf_checkpoint(sharded_dir)[1])
    assert sum(reads) == sum(p.numel() for p in model.parameters()) < sum(t.numel() for t in hf.state_dict().values())
    with torch.no_grad():
        assert (_gathered_logits(model, tokens) - hf(tokens).logits).abs().max() < 1e-4
    # PP=2 (2 layers per stage; tied output layer copy on the last stage): loss and round trip.
    init_distributed(ParallelConfig(pipeline_model_parallel_size=2))
    sequences = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(2))
    for tied in (True, False):
        hf = _tiny_hf("llama", tied, num_layers=4)
        arch, model = _loaded(hf)
        with torch.no_grad():
            logits = hf(sequences[:, :-1]).logits
        expected = F.cross_entropy(logits.reshape(-1, 128), sequences[:, 1:].reshape(-1)).item()
        assert abs(validation_loss(model, sequences, micro_batch_size=1) - expected) < 1e-5, tied
        _assert_same_tensors(gather_hf_state_dict(model, arch), _hf_tensors(hf))


def test_tp2_logits_and_pp2_loss_match_hf(tmp_path):
    _miniature("mistral-nemo").save_pretrained(tmp_path, max_shard_size="100KB")
    run_distributed(_distributed_checks, 2, str(tmp_path))
