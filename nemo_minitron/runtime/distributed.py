"""Process groups and Megatron-Core parallel state for world size 1 or N.

Reads the torchrun / srun environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); with none set it
runs as a single process. Uses NCCL on GPU and gloo on CPU, where the CPU shims are applied first.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

import torch
import torch.distributed as dist

from nemo_minitron.runtime.cpu_shims import apply_cpu_shims


@dataclass
class ParallelConfig:
    """Model-parallel layout; data parallelism is whatever remains of the world size."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False  # shard norms, residuals and dropout over the TP group along the sequence
    use_distributed_optimizer: bool = False  # shard float32 master weights and Adam states over data-parallel ranks

    def validate(self, world_size: int) -> None:
        tp, pp = self.tensor_model_parallel_size, self.pipeline_model_parallel_size
        if tp < 1 or pp < 1:
            raise ValueError(f"parallel: tensor_model_parallel_size and pipeline_model_parallel_size must be >= 1, "
                             f"got {tp}, {pp}")
        if self.sequence_parallel and tp == 1:
            raise ValueError("parallel.sequence_parallel=true needs tensor_model_parallel_size > 1")
        if world_size % (tp * pp):
            raise ValueError(
                f"parallel: world size {world_size} is not divisible by tensor_model_parallel_size * "
                f"pipeline_model_parallel_size = {tp} * {pp}"
            )


def device() -> torch.device:
    """The device this rank computes on: its local GPU, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_rank0() -> bool:
    """True on global rank 0, and in a process with no process group."""
    return not dist.is_initialized() or dist.get_rank() == 0


def on_rank0(fn):
    """``fn()`` run on global rank 0 alone; every rank returns its result. An error it raises is raised on every
    rank (rank 0's own; elsewhere its message, as ValueError if rank 0's is an expected error, else RuntimeError),
    so that no rank waits for a rank that failed."""
    from nemo_minitron.runtime.console import EXPECTED_ERRORS, error_message

    result, error = None, None
    if is_rank0():
        try:
            result = fn()
        except Exception as err:
            error = err
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [result, None if error is None else (isinstance(error, EXPECTED_ERRORS), error_message(error))]
        dist.broadcast_object_list(box, src=0)
        result, failed = box
        if failed is not None and error is None:
            expected, message = failed
            raise (ValueError if expected else RuntimeError)(message if expected else f"on rank 0: {message}")
    if error is not None:
        raise error
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """The ranks' tensors ``x`` of ``group`` concatenated along the last dimension, in group-rank order (the same
    shape on every rank, e.g. tensor-parallel shards of the vocabulary or of channels). No autograd."""
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def init_process_group() -> None:
    """Create the default process group unless it exists: NCCL on GPU, gloo on CPU."""
    if dist.is_initialized():
        return
    on_gpu = torch.cuda.is_available()
    backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if "RANK" in os.environ:  # launched by torchrun / srun wrappers: env:// rendezvous
        dist.init_process_group(backend)
    else:  # a lone process: a private rendezvous, leaving the environment (and child processes) untouched
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)


def init_distributed(parallel: ParallelConfig = ParallelConfig(), seed: int = 1234) -> None:
    """Create the default process group (if needed), Megatron-Core's parallel groups and its RNG states."""
    if not torch.cuda.is_available():
        apply_cpu_shims()  # before importing Megatron-Core: its import-time torch.compile must see TORCHDYNAMO_DISABLE
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    init_process_group()
    parallel.validate(dist.get_world_size())
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
    )
    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)


def destroy_distributed() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
