"""Megatron-Core distributed checkpoints of a GPTModel plus its arch.json, loadable under any TP / PP layout."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import os
import pickle
import queue
import signal
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_minitron.models.arch import ModelArch
from nemo_minitron.models.build import build_gpt_model
from nemo_minitron.runtime.distributed import is_rank0

ARCH_FILE = "arch.json"
MANIFEST_FILE = "manifest.json"
REQUIRED_FILES = (".metadata",)  # of every dist checkpoint, beside metadata.json and arch.json
COMMON_FILE = "common.pt"  # the non-sharded state: written by Megatron-Core <= 0.18 always, by 0.19 only if any


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_checkpoint_file(path: Path) -> bool:
    """A file that dist_checkpointing or save_checkpoint writes (a run may keep others beside them: plan.json,
    history.json, subfolders such as train_state/ or hf/)."""
    return path.is_file() and (path.suffix == ".distcp" or path.name in (".metadata", "metadata.json", "common.pt",
                                                                         ARCH_FILE))


def _manifest(directory: Path) -> dict:
    """{"files": {name: {"size": bytes, "blake2b": hex}}} of the checkpoint's files."""
    return {"files": {p.name: {"size": p.stat().st_size, "blake2b": _file_digest(p)}
                      for p in sorted(directory.iterdir()) if _is_checkpoint_file(p)}}


def write_manifest(directory: Path) -> None:
    """manifest.json: every file's size and hash, written once the checkpoint is complete."""
    (directory / MANIFEST_FILE).write_text(json.dumps(_manifest(directory), indent=1) + "\n")


# torch.distributed.checkpoint's .metadata differs between two saves of the same tensors (it names the save)
_NOT_CONTENT = {".metadata"}


def fingerprint(directory: str | Path) -> str:
    """A hex digest naming the checkpoint's content: blake2b of its manifest.json entries (written at save time, so
    this reads no weights; the manifest is computed now for a checkpoint saved without one), leaving out the files
    that name a save rather than its content. Equal for the same weights saved under the same parallel layout."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    files = json.loads(path.read_text())["files"] if path.is_file() else _manifest(directory)["files"]
    content = {name: entry for name, entry in files.items() if name not in _NOT_CONTENT}
    return hashlib.blake2b(json.dumps(content, sort_keys=True).encode(), digest_size=16).hexdigest()


def _die_with_parent(write, parent: int):
    """``write`` (Megatron's per-bucket writer) preceded, in a forked writer process (Megatron-Core 0.16; from 0.17
    it writes in threads of the saving process), by PR_SET_PDEATHSIG: the kernel kills the writer when its parent
    dies, instead of leaving it blocked on a queue the parent held (Linux)."""

    def run(*args, **kwargs):
        if os.getpid() != parent:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG = 1
            if os.getppid() != parent:  # the parent died before prctl took effect
                os._exit(1)
        return write(*args, **kwargs)

    return run


@contextlib.contextmanager
def tied_checkpoint_writers():
    """While open, Megatron's checkpoint writing leaves no process behind a killed parent: its write results go
    through an in-process queue (it would otherwise start, once per process, a multiprocessing Manager server that
    outlives a kill -9; saves here are synchronous, so results never cross a process boundary), and on Linux its
    forked per-file writers die with their parent. Both are undone on exit."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    writer = filesystem_async.FileSystemWriterAsync
    saved_queue, saved_write = filesystem_async._results_queue, writer.__dict__["write_preloaded_data"]
    filesystem_async._results_queue = queue.Queue()
    if sys.platform == "linux":
        writer.write_preloaded_data = staticmethod(_die_with_parent(saved_write.__func__, os.getpid()))
    try:
        yield
    finally:
        filesystem_async._results_queue = saved_queue
        writer.write_preloaded_data = saved_write


TRUST_ENV = "MINITRON_TRUST_CHECKPOINTS"
# what torch.distributed.checkpoint's .metadata pickle may name: its own metadata classes, and torch's Size / dtypes
_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                     "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint.storage", "collections")
_METADATA_GLOBALS = {("torch.serialization", "_get_layout")}  # maps a name such as "torch.strided" to the layout


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if module in _METADATA_MODULES or (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        value = super().find_class(module, name) if module == "torch" else None
        if value is torch.Size or isinstance(value, (torch.dtype, torch.memory_format)):
            return value
        raise pickle.UnpicklingError(
            f"checkpoint metadata names {module}.{name}, which a torch.distributed.checkpoint .metadata file never "
            f"holds; refusing to load it (it could run code). Set {TRUST_ENV}=1 only for a checkpoint you trust")


def check_metadata(directory: str | Path) -> None:
    """ValueError naming the file unless the checkpoint's .metadata (a pickle that torch.distributed.checkpoint
    loads) names only checkpoint-metadata classes and torch sizes / dtypes: read with a restricted unpickler, so a
    crafted checkpoint is refused before anything could run its code. MINITRON_TRUST_CHECKPOINTS=1 skips this."""
    path = Path(directory) / ".metadata"
    if os.environ.get(TRUST_ENV) == "1" or not path.is_file():
        return  # a missing .metadata is Megatron's "not a checkpoint" error, raised by the load itself
    try:
        with open(path, "rb") as f:
            _MetadataUnpickler(f).load()
    except pickle.UnpicklingError as err:
        raise ValueError(f"{path}: {err}") from None
    except (EOFError, ValueError, TypeError, AttributeError, ImportError) as err:
        raise ValueError(f"{path} is not a readable checkpoint metadata file ({type(err).__name__}: {err})") from None


def verify_manifest(directory: str | Path) -> None:
    """ValueError naming the file unless every file that manifest.json lists is present with its recorded size (a
    checkpoint cut short by a crash or a failed copy). A folder without a manifest passes (saved before manifests)."""
    directory = Path(directory)
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return
    for name, entry in json.loads(path.read_text())["files"].items():
        file = directory / name
        if not file.is_file():
            raise ValueError(f"checkpoint {directory} is incomplete: {name} is missing (see {path})")
        if file.stat().st_size != entry["size"]:
            raise ValueError(f"checkpoint {directory} is damaged: {name} has {file.stat().st_size} bytes, "
                             f"{entry['size']} when it was saved (see {path})")


def check_finite(model, directory: Path) -> None:
    """FloatingPointError naming the first weight (of any rank's shard) that holds NaN or inf, before anything is
    written to ``directory``. Collective."""
    local = next(((name, int((~torch.isfinite(p)).sum()), p.numel()) for name, p in model.named_parameters()
                  if not torch.isfinite(p).all()), None)
    found = [local]
    if dist.is_initialized() and dist.get_world_size() > 1:
        found = [None] * dist.get_world_size()
        dist.all_gather_object(found, local)
    bad = next((f for f in found if f is not None), None)
    if bad is not None:
        name, count, numel = bad
        raise FloatingPointError(f"not saving {directory}: weight {name} holds {count} non-finite values (of "
                                 f"{numel}); the model diverged or was loaded with NaN / inf. Nothing was written "
                                 "(an earlier checkpoint stays as it was)")


def save_checkpoint(model, arch: ModelArch, directory: str | Path) -> Path:
    """Save ``model.sharded_state_dict()`` with dist_checkpointing and ``arch`` as arch.json into ``directory``,
    then a manifest.json of every file's size and hash (``fingerprint``); refused (check_finite) when a weight is
    not finite.

    Collective: every rank of the model calls it (each writes its own shards; rank 0 the common files).
    """
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    check_finite(model, directory)
    if is_rank0():
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
    with tied_checkpoint_writers():
        dist_checkpointing.save(model.sharded_state_dict(), str(directory))
    if is_rank0():
        arch.save(directory / ARCH_FILE)
        write_manifest(directory)
    dist.barrier()
    return directory


def load_arch(directory: str | Path) -> ModelArch:
    """The ModelArch saved with a checkpoint (its arch.json)."""
    path = Path(directory) / ARCH_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a nemo-minitron checkpoint: {ARCH_FILE} is missing")
    return ModelArch.load(path)


def load_checkpoint(directory: str | Path, **build_kwargs):
    """(model, arch): build the model from ``directory``/arch.json under the current parallel state (TP / PP may
    differ from the saving run) and load its weights. ``build_kwargs`` go to build_gpt_model. ValueError naming the
    folder when it is incomplete, damaged or untrusted (verify_manifest, check_metadata)."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from torch.distributed.checkpoint.api import CheckpointException

    directory = Path(directory)
    arch = load_arch(directory)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        raise FileNotFoundError(f"{directory} is not a nemo-minitron checkpoint: it needs {ARCH_FILE} and a "
                                "Megatron-Core dist checkpoint (metadata.json), as written by save_checkpoint")
    verify_manifest(directory)
    for name in (*REQUIRED_FILES, COMMON_FILE):  # also where no manifest.json lists the files
        file = directory / name
        if (name in REQUIRED_FILES and not file.is_file()) or (file.is_file() and file.stat().st_size == 0):
            raise ValueError(f"checkpoint {directory} is incomplete: {name} is missing or empty; re-run the stage "
                             "that wrote it")
    check_metadata(directory)
    model = build_gpt_model(arch, **build_kwargs)
    try:
        state = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
    except (EOFError, CheckpointException, CheckpointingException) as err:  # a truncated or overwritten file
        cause = next(iter(err.failures.values()))[0] if isinstance(err, CheckpointException) else err
        raise ValueError(f"checkpoint {directory} is damaged ({traceback.format_exception_only(cause)[-1].strip()}); "
                         "re-run the stage that wrote it") from None
    model.load_state_dict(state)
    return model, arch
