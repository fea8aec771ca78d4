"""Run a test function on N gloo processes (TP / PP / DP layouts on CPU)."""

from __future__ import annotations

import os
import traceback

import torch.multiprocessing as mp

from nemo_minitron.runtime.distributed import free_port


def _worker(rank, world_size, port, fn, args, errors):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), TORCHDYNAMO_DISABLE="1")
    try:
        fn(rank, world_size, *args)
    except BaseException:
        errors.put(f"rank {rank}:\n{traceback.format_exc()}")
        raise
    finally:
        from nemo_minitron.runtime.distributed import destroy_distributed

        destroy_distributed()


def run_distributed(fn, world_size: int, *args, timeout: float = 300) -> None:
    """Spawn ``fn(rank, world_size, *args)`` on ``world_size`` processes; re-raise the first rank's failure.

    ``fn`` must be a module-level function (it is pickled); it calls ``init_distributed`` itself.
    """
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, errors)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    if not errors.empty():
        raise AssertionError(errors.get())
    codes = [p.exitcode for p in procs]
    if any(code != 0 for code in codes):
        raise AssertionError(f"distributed workers exited with codes {codes}")
