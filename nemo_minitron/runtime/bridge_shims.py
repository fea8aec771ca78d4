"""Run Megatron-Bridge's training loop on a machine without CUDA, with every patch undone when the run ends.

``bridge_cpu()`` is a context manager: on a GPU it only serves the import placeholders (absent_imports) and patches
nothing else; on a CPU it also applies Megatron-Core's CPU shims (cpu_shims) and these Bridge patches, each one
line of the one place Bridge assumes CUDA:
1. ``initialize_megatron`` runs with ``allow_no_cuda=True`` (it asserts CUDA otherwise);
2. Bridge modules that create tensors with ``device="cuda"`` (setup's start-time all-reduce, the data loaders'
   flags, the training loop's loss reports, the evaluator, checkpointing) see a ``torch`` whose factories create
   them on the CPU;
3. ``torch.cuda`` calls the loop makes for memory reports and streams are harmless (``memory_allocated`` and
   ``max_memory_allocated`` return 0, ``reset_peak_memory_stats`` / ``empty_cache`` do nothing, ``Stream()`` is a
   stream whose waits do nothing (as cpu_shims makes ``current_stream()``), ``stream(s)`` is a null context, the
   CUDA RNG state that checkpoints save is empty and restoring it does nothing);
4. ``torch.distributed.barrier(device_ids=...)`` drops the NCCL-only ``device_ids`` argument under gloo;
5. ``compile_helpers`` (``make`` in Megatron-Core's source tree, absent from its wheel) is skipped: the wheel ships
   the compiled dataset helpers;
6. ``set_jit_fusion_options`` (which warms up fused kernels on a CUDA device) is skipped;
7. the model is built with ``use_cpu_initialization=True`` (Bridge's ``get_model`` otherwise moves it to CUDA);
8. ``Tensor.cuda()`` returns the tensor itself (the evaluator's loss accumulators);
9. ``Tensor.type()`` names CPU tensors as CUDA ones (cpu_shims.cuda_type_names), so bf16 / fp16 runs get
   Megatron's mixed-precision optimizer with float32 master weights.
"""

from __future__ import annotations

import contextlib
import functools
import importlib

import torch

from nemo_minitron.runtime.absent_imports import absent_imports
from nemo_minitron.runtime.cpu_shims import NoStream, _TorchOnCpu, apply_cpu_shims, cuda_type_names

# Bridge modules that create tensors on device="cuda" on the training / evaluation path.
_CUDA_FACTORY_MODULES = (
    "megatron.bridge.training.setup",
    "megatron.bridge.training.train",
    "megatron.bridge.training.eval",
    "megatron.bridge.training.utils.train_utils",
    "megatron.bridge.training.checkpointing",
    "megatron.bridge.data.loaders",
)


@contextlib.contextmanager
def patched(target, name: str, value):
    """Set ``target.name = value`` while open; restore the previous value (or its absence) afterwards."""
    missing = object()
    old = target.__dict__.get(name, missing) if isinstance(target, type) else getattr(target, name, missing)
    setattr(target, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(target, name)
        else:
            setattr(target, name, old)


def _barrier_without_device_ids(barrier):
    @functools.wraps(barrier)
    def wrapper(*args, device_ids=None, **kwargs):
        return barrier(*args, **kwargs)

    return wrapper


@contextlib.contextmanager
def bridge_cpu():
    """Import and run Megatron-Bridge here (see the module docstring); patches are undone on exit."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(absent_imports())
        if torch.cuda.is_available():
            yield
            return
        apply_cpu_shims()
        setup = importlib.import_module("megatron.bridge.training.setup")
        stack.enter_context(patched(setup, "initialize_megatron",
                                    functools.partial(setup.initialize_megatron, allow_no_cuda=True)))
        stack.enter_context(patched(setup, "set_jit_fusion_options", lambda *args, **kwargs: None))
        initialize = importlib.import_module("megatron.bridge.training.initialize")
        stack.enter_context(patched(initialize, "compile_helpers", lambda: None))
        model_provider = importlib.import_module("megatron.bridge.models.model_provider")
        get_model = model_provider.get_model
        stack.enter_context(patched(model_provider, "get_model", lambda *args, **kwargs: get_model(
            *args, **{**kwargs, "use_cpu_initialization": True})))
        cpu_torch = _TorchOnCpu()
        for module_name in _CUDA_FACTORY_MODULES:
            stack.enter_context(patched(importlib.import_module(module_name), "torch", cpu_torch))
        for name, value in (("memory_allocated", lambda *a, **k: 0), ("max_memory_allocated", lambda *a, **k: 0),
                            ("reset_peak_memory_stats", lambda *a, **k: None),
                            ("empty_cache", lambda *a, **k: None), ("Stream", lambda *a, **k: NoStream()),
                            ("stream", lambda *a, **k: contextlib.nullcontext()),
                            ("get_rng_state", lambda *a, **k: torch.empty(0, dtype=torch.uint8)),
                            ("set_rng_state", lambda *a, **k: None)):
            stack.enter_context(patched(torch.cuda, name, value))
        stack.enter_context(patched(torch.Tensor, "cuda", lambda self, *args, **kwargs: self))
        stack.enter_context(cuda_type_names())
        stack.enter_context(patched(torch.distributed, "barrier",
                                    _barrier_without_device_ids(torch.distributed.barrier)))
        yield
