"""Megatron-Core distributed checkpoints of a GPTModel plus its arch.json, loadable under any TP / PP layout."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from nemo_minitron.models.arch import ModelArch
from nemo_minitron.models.build import build_gpt_model
from nemo_minitron.runtime.distributed import is_rank0

ARCH_FILE = "arch.json"


def save_checkpoint(model, arch: ModelArch, directory: str | Path) -> Path:
    """Save ``model.sharded_state_dict()`` with dist_checkpointing and ``arch`` as arch.json into ``directory``.

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
