"""Make Megatron-Core run on a machine without CUDA (gloo, fp32, local layer spec).

Every patch here is applied only when ``torch.cuda.is_available()`` is False, once per process (by
``init_distributed``), and stays for the life of that process: unlike the Bridge patches of bridge_shims.py, which
are undone when a Bridge run ends, these are what every Megatron-Core model of a CPU process runs on (the stages,
the project trainer and Bridge alike; models and optimizers built under them keep using them after any one run),
so undoing them midway would break the objects still alive. A process with CUDA is never patched:
1. the CUDA RNG-states tracker becomes one that forks the CPU generator (attention always forks it);
2. ``torch.cuda.current_device()`` used as a device becomes "cpu" (memory buffer, RoPE, TP gather);
3. ``torch.cuda.synchronize`` / ``torch.cuda.manual_seed`` become no-ops (checkpointing, seeding);
4. tensors that the schedules, DDP buffers and optimizer create with ``device="cuda"`` are created on the CPU
   (those modules see a ``torch`` whose factory functions map a CUDA device to "cpu");
5. the optimizer's gradient clipping (which asserts CUDA grads) scales CPU grads by max_norm / (total_norm + 1e-6);
6. ``Tensor.cuda()`` is the identity while a tied model (PP > 1) syncs its output-layer copy of the embedding;
7. activation recompute's save / restore of the CUDA generator state does nothing (the CPU state is kept);
8. ``torch.cuda.current_stream()`` is a stream whose waits do nothing (Megatron-Core >= 0.17's gradient sync asks
   for it unconditionally; CPU work is already ordered).
Explicit attention masks are passed by our callers, so Megatron's default CUDA causal mask is never built.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import os
import types

import torch

_APPLIED = False


class CpuRNGStatesTracker:
    """Drop-in for Megatron's CudaRNGStatesTracker that keeps named CPU generator states."""

    def __init__(self, *args, **kwargs):
        self.reset()

    def reset(self):
        self.states_ = {}
        self.seeds_ = set()
        self._is_initialized = False

    def is_initialized(self):
        return self._is_initialized

    def get_states(self):
        return dict(self.states_)

    def set_states(self, states):
        self._is_initialized = True
        self.states_ = states

    def add(self, name, seed):
        self._is_initialized = True
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists")
        self.seeds_.add(seed)
        generator = torch.Generator().manual_seed(seed)
        self.states_[name] = generator.get_state()

    @contextlib.contextmanager
    def fork(self, name="model-parallel-rng"):
        if name not in self.states_:
            # Megatron forks before seeding in some code paths (e.g. initialisation outside training).
            # Seeded from the name by a fixed hash (str hash() is salted per process): the same on every run.
            seed = int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest(), "little") & 0x7FFFFFFF
            self.add(name, seed)
        outer = torch.get_rng_state()
        torch.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)


# Megatron-Core modules that create tensors on device="cuda" on the training / evaluation path.
_CUDA_FACTORY_MODULES = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",  # fp16's loss scale
    "megatron.core.utils",
)
_FACTORIES = ("zeros", "ones", "empty", "full", "tensor", "arange", "zeros_like", "ones_like", "empty_like")


class NoStream:
    """A CUDA stream stand-in: CPU work is already ordered."""

    def wait_stream(self, other) -> None:
        pass

    def wait_event(self, event) -> None:
        pass


def _cuda_to_cpu(factory, *args, **kwargs):
    dev = kwargs.get("device")
    if dev is not None and torch.device(dev).type == "cuda":
        kwargs["device"] = "cpu"
    kwargs.pop("pin_memory", None)
    return factory(*args, **kwargs)


class _TorchOnCpu(types.ModuleType):
    """``torch`` as seen by a Megatron module: the same, except factories never target CUDA."""

    def __init__(self):
        super().__init__("torch")

    def __getattr__(self, name):
        attr = getattr(torch, name)
        if name in _FACTORIES:
            return functools.partial(_cuda_to_cpu, attr)
        return attr


def _clip_grad_by_total_norm_cpu(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's clip_grad_by_total_norm_fp32 without its CUDA-tensor assertion."""
    attr = "decoupled_grad" if use_decoupled_grad else "grad"
    grads = [getattr(p, attr) for p in parameters if getattr(p, attr, None) is not None]
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff < 1.0 and grads:
        torch._foreach_mul_(grads, clip_coeff)


def _keep_on_cpu(method):
    """``method`` with ``Tensor.cuda()`` returning the tensor itself while it runs."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda self, *a, **k: self
        try:
            return method(*args, **kwargs)
        finally:
            torch.Tensor.cuda = cuda

    return wrapper


def apply_cpu_shims() -> bool:
    """Patch torch / Megatron-Core for CPU execution; returns True if patches are (now) active."""
    global _APPLIED
    if torch.cuda.is_available():
        return False
    if _APPLIED:
        return True
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

    from megatron.core.tensor_parallel import random as mcore_random

    mcore_random._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mcore_random._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    mcore_random.CudaRNGStatesTracker = CpuRNGStatesTracker
    # Activation recompute saves and restores the CUDA generator's state with the CPU one's: there is none here.
    mcore_random._get_cuda_rng_state = lambda *a, **k: torch.empty(0, dtype=torch.uint8)
    mcore_random._set_cuda_rng_state = lambda *a, **k: None

    cpu_torch = _TorchOnCpu()
    for module_name in _CUDA_FACTORY_MODULES:
        importlib.import_module(module_name).torch = cpu_torch
    importlib.import_module("megatron.core.optimizer.optimizer").clip_grad_by_total_norm_fp32 = (
        _clip_grad_by_total_norm_cpu)

    # Without TE / apex, Megatron falls back to torch's AdamW, whose default on CPU is the per-tensor loop.
    megatron_optimizer = importlib.import_module("megatron.core.optimizer")
    if megatron_optimizer.USING_PYTORCH_OPTIMIZER:
        megatron_optimizer.Adam = functools.partial(torch.optim.AdamW, foreach=True)

    # Tied embeddings under PP > 1: the last stage's copy is moved with .cuda() before its first all-reduce.
    language_module = importlib.import_module("megatron.core.models.common.language_module.language_module")
    language_module.LanguageModule.setup_embeddings_and_output_layer = _keep_on_cpu(
        language_module.LanguageModule.setup_embeddings_and_output_layer)

    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.current_stream = lambda *a, **k: NoStream()
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.manual_seed = lambda *a, **k: None
    torch.cuda.manual_seed_all = lambda *a, **k: None
    _APPLIED = True
    return True


@contextlib.contextmanager
def cuda_type_names():
    """While open on a machine without CUDA, ``Tensor.type()`` (no arguments) names a CPU tensor's type as its CUDA
    twin ("torch.BFloat16Tensor" -> "torch.cuda.BFloat16Tensor"): Megatron's mixed-precision optimizers sort
    parameters into 16-bit (given float32 master copies) and float32 ones by that string, and reject any other."""
    if torch.cuda.is_available():
        yield
        return
    original = torch.Tensor.type

    def type_name(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if args or kwargs or self.device.type != "cpu":
            return result
        return result.replace("torch.", "torch.cuda.", 1)

    torch.Tensor.type = type_name
    try:
        yield
    finally:
        torch.Tensor.type = original
