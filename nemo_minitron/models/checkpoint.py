"""Megatron-Core distributed checkpoints of a GPTModel plus its arch.json, loadable under any TP / PP layout."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch.distributed as dist

from nemo_minitron.models.arch import ModelArch
from nemo_minitron.models.build import build_gpt_model
from nemo_minitron.runtime.distributed import is_rank0

ARCH_FILE = "arch.json"
MANIFEST_FILE = "manifest.json"


def _file_digest(path: Path) -> str:
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(directory: Path) -> dict:
    """{"files": {name: {"size": bytes, "blake2b": hex}}} of the checkpoint's files (the files directly in
    ``directory``: subfolders such as train_state/ or hf/ are other artefacts)."""
    return {"files": {p.name: {"size": p.stat().st_size, "blake2b": _file_digest(p)}
                      for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST_FILE}}


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


def save_checkpoint(model, arch: ModelArch, directory: str | Path) -> Path:
    """Save ``model.sharded_state_dict()`` with dist_checkpointing and ``arch`` as arch.json into ``directory``,
    then a manifest.json of every file's size and hash (``fingerprint``).

    Collective: every rank of the model calls it (each writes its own shards; rank 0 the common files).
    """
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    if is_rank0():
        directory.mkdir(parents=True, exist_ok=True)
    dist.barrier()
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
    differ from the saving run) and load its weights. ``build_kwargs`` go to build_gpt_model."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    arch = load_arch(directory)
    if not dist_checkpointing.check_is_distributed_checkpoint(str(directory)):
        raise FileNotFoundError(f"{directory} is not a nemo-minitron checkpoint: it needs {ARCH_FILE} and a "
                                "Megatron-Core dist checkpoint (metadata.json), as written by save_checkpoint")
    model = build_gpt_model(arch, **build_kwargs)
    state = dist_checkpointing.load(model.sharded_state_dict(), str(directory))
    model.load_state_dict(state)
    return model, arch
