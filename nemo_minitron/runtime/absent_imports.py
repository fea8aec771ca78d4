"""Serve placeholder modules for GPU-only packages to the few third-party modules that import them unconditionally.

Megatron-Bridge imports Transformer Engine at module level in its LoRA layers (reached from ``import
megatron.bridge``) and NVIDIA's resiliency extension in its training entry point, and Megatron-Core imports triton at
module level in a few inference kernels (reached from Bridge's Mamba provider). None is used on a CPU run.
``absent_imports()`` replaces ``builtins.__import__`` while it is open so that exactly the importers named in
``IMPORTERS`` receive a placeholder; every other module still gets ImportError (Megatron-Core's own ``try: import
transformer_engine`` probes keep HAVE_TE = False), nothing is put in ``sys.modules``, and the original
``__import__`` is back when the block ends.

A placeholder answers any attribute: a capitalised name is a class that cannot be instantiated (so ``class
X(te.Linear)`` and ``isinstance(y, te.Linear)`` work), a lower-case name another placeholder (``triton.jit`` as a
decorator, ``tl.constexpr`` as an annotation). Calling anything else, or creating an instance, raises RuntimeError
naming the package.
"""

from __future__ import annotations

import builtins
import contextlib
import importlib.util

# importer module -> top-level packages it imports unconditionally at module level
IMPORTERS = {
    "megatron.bridge.peft.lora_layers": ("transformer_engine",),
    "megatron.bridge.peft.lora": ("transformer_engine",),
    "megatron.bridge.models.gpt_full_te_layer_autocast_spec": ("transformer_engine",),
    # in-process restart (off unless configured); nvidia-resiliency-ext >= 0.6, which Megatron-Core >= 0.17 requires
    # once it is installed, is not on PyPI: the Python 3.12 stack runs without it
    "megatron.bridge.training.pretrain": ("nvidia_resiliency_ext",),
    "megatron.bridge.training.inprocess_restart": ("nvidia_resiliency_ext",),
    "megatron.core.inference.contexts.attention_context.triton.tensor_ops": ("triton",),
    "megatron.core.inference.contexts.fused_kv_append_kernel": ("triton",),
    "megatron.core.transformer.custom_layers.batch_invariant_kernels": ("triton",),
}


class Placeholder:
    """Stands for ``path`` of a package that is not installed (see the module docstring)."""

    def __init__(self, path: str):
        self._path = path

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        path = f"{self._path}.{name}"
        if name[:1].isupper():
            def refuse(*args, **kwargs):
                raise RuntimeError(f"{path} needs {path.split('.')[0]}, which is not installed")

            value = type(name, (), {"__init__": refuse, "__module__": self._path})
        else:
            value = Placeholder(path)
        object.__setattr__(self, name, value)
        return value

    def __call__(self, *args, **kwargs):
        if (len(args) == 1 and callable(args[0]) and not kwargs) or not args:  # used as a decorator (factory)
            return Placeholder(self._path)
        raise RuntimeError(f"{self._path} needs {self._path.split('.')[0]}, which is not installed")

    def __getitem__(self, key):  # kernel[grid]
        return self


@contextlib.contextmanager
def absent_imports():
    """While open, the importers in IMPORTERS get a Placeholder for their packages that are not installed."""
    real_import = builtins.__import__
    missing = {pkg for pkgs in IMPORTERS.values() for pkg in pkgs if importlib.util.find_spec(pkg) is None}
    roots = {pkg: Placeholder(pkg) for pkg in missing}

    def import_(name, globals=None, locals=None, fromlist=(), level=0):
        top = name.partition(".")[0]
        if level == 0 and top in roots and top in IMPORTERS.get((globals or {}).get("__name__"), ()):
            module = roots[top]
            if not fromlist:  # `import a.b` binds a; `import a.b as c` then reads a.b
                return module
            for part in name.split(".")[1:]:
                module = getattr(module, part)
            return module
        return real_import(name, globals, locals, fromlist, level)

    builtins.__import__ = import_
    try:
        yield
    finally:
        builtins.__import__ = real_import
