"""Console hygiene for the command-line entry points (never applied by importing the package): known warnings
silenced, and expected errors reported as one line."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from datetime import timedelta

# What a bad input raises (our checks name the file or field): a wrong value or file content, a missing or unreadable
# file, a missing entry, a non-finite loss. safetensors / YAML / JSON errors are re-raised as ValueError where read.
EXPECTED_ERRORS = (ValueError, OSError, KeyError, FloatingPointError)
FAILURES_KEY = "minitron_failures"  # ranks that reported an error, counted in the process group's store


def quiet_known_warnings() -> None:
    """Ignore known noise: notices of absent Transformer Engine / Apex (expected on CPU), "full scope is deprecated"."""
    warnings.filterwarnings("ignore", message=r".*(Transformer Engine|Apex).* not installed.*")
    warnings.filterwarnings("ignore", message=r".*full scope is deprecated.*")


def error_message(err: BaseException) -> str:
    """The message of an expected error on one line (a KeyError's own text, not its repr)."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    return " ".join(str(text).split()) or type(err).__name__


def _count_failures(add: int) -> int:
    """The number of ranks that have reported an error, after adding ``add``. Without a process group (or with one
    rank) it is ``add`` on rank 0 (the launcher's RANK) and -1 elsewhere; -1 too when the group's store cannot be
    reached within seconds (its host, rank 0, has exited)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return add if os.environ.get("RANK", "0") == "0" else -1
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(timedelta(seconds=10))
    try:
        return store.add(FAILURES_KEY, add)
    except RuntimeError:  # torch's DistStoreError / DistNetworkError
        return -1


def run_command(prog: str, body: Callable[[], int], debug: bool = False) -> int:
    """``body()``'s exit code, then the process group torn down (if ``body`` made one).

    An expected error (EXPECTED_ERRORS) gives exit code 1 and one line ``prog: message`` on stderr, printed by the
    first rank that fails (a counter in the process group's store): a bad input found on every rank, or on some,
    is reported once. Any other error on a rank after another rank reported one (a collective it broke) exits 1
    quietly. ``debug``: errors are raised with their traceback.
    """
    import torch.distributed as dist

    try:
        return body()
    except EXPECTED_ERRORS as err:
        if debug:
            raise
        if _count_failures(1) == 1:
            print(f"{prog}: {error_message(err)}", file=sys.stderr, flush=True)
        return 1
    except Exception:
        if debug or _count_failures(0) < 1:
            raise
        return 1
    finally:
        if dist.is_initialized():
            from nemo_minitron.runtime.distributed import destroy_distributed

            destroy_distributed()
