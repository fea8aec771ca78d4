"""One writer per folder: a lock file naming the writing process, taken over only from a dead process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import psutil
import torch.distributed as dist

from nemo_minitron.runtime.distributed import is_rank0

LOCK_FILE = "writer.lock"


def _holder_alive(holder: dict) -> bool | None:
    """True / False whether the lock's process runs (this host), None when it is on another host."""
    if holder.get("host") != socket.gethostname():
        return None
    try:
        return psutil.Process(holder["pid"]).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _acquire(folder: Path) -> str | None:
    """Create folder/writer.lock for this process; the reason it cannot, or None."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text())
            except (OSError, ValueError):
                holder = {}
            alive = _holder_alive(holder) if holder else False
            if alive:
                return (f"{folder} is being written by another run (pid {holder['pid']}): two runs cannot share a "
                        f"folder; wait for it, stop it, or give this run another run_dir")
            if alive is None:
                return (f"{folder} is locked by a run on host {holder.get('host')} (pid {holder.get('pid')}), which "
                        f"this host cannot check: if that run is gone, delete {path}")
            print(f"[lock] {path}: its writer (pid {holder.get('pid')}) is gone; taking the folder over", flush=True)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return None
    return f"could not lock {path}"


def acquire(folder: str | Path) -> None:
    """Lock ``folder`` for this run (collective: global rank 0 holds the lock; every rank raises ValueError with
    the same message when it is held by a live process)."""
    reason = _acquire(Path(folder)) if is_rank0() else None
    if dist.is_initialized():
        box = [reason]
        dist.broadcast_object_list(box, src=0)
        reason = box[0]
    if reason:
        raise ValueError(reason)


def release(folder: str | Path) -> None:
    """Remove this process's lock on ``folder`` (rank 0)."""
    path = Path(folder) / LOCK_FILE
    if is_rank0() and path.is_file():
        try:
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass
