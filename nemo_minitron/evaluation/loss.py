"""Validation LM loss (mean next-token cross-entropy over valid tokens) through Megatron-Core's pipeline schedules."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from nemo_minitron.runtime.distributed import device


def micro_batches(sequences: torch.Tensor, micro_batch_size: int):
    """Yield dicts {tokens, labels} of [micro_batch_size, s] from packed sequences [n, s + 1]."""
    for start in range(0, sequences.shape[0], micro_batch_size):
        chunk = sequences[start:start + micro_batch_size].to(device())
        yield {"tokens": chunk[:, :-1], "labels": chunk[:, 1:]}


@torch.no_grad()
def validation_loss(model, sequences: torch.Tensor, micro_batch_size: int = 4) -> float:
    """Mean cross-entropy (nats/token) of ``model`` on packed ``sequences`` [n, s + 1], equal on every rank.

    Works for any TP/PP layout; data-parallel ranks each pass their own ``sequences`` and the result is the
    token-weighted mean over all of them.
    """
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from nemo_minitron.distillation.forward_step import ForwardStep

    was_training = model.training
    model.eval()
    n = sequences.shape[0]
    num_microbatches = math.ceil(n / micro_batch_size)
    if n % micro_batch_size:
        raise ValueError(f"eval: {n} sequences are not a multiple of micro_batch_size={micro_batch_size}")
    outputs = get_forward_backward_func()(
        forward_step_func=ForwardStep(),
        data_iterator=micro_batches(sequences, micro_batch_size),
        model=[model],
        num_microbatches=num_microbatches,
        seq_length=sequences.shape[1] - 1,
        micro_batch_size=micro_batch_size,
        forward_only=True,
    )
    model.train(was_training)
    return token_weighted_means(outputs, ["lm loss"])["lm_loss"]


def token_weighted_means(outputs: list[dict], names: list[str]) -> dict[str, float]:
    """{name (spaces -> _): sum / count} of the [sum, count] reports ``names`` that forward_backward_func returned,
    over micro-batches, pipeline stages (only the last holds them) and data-parallel ranks; equal on every rank.
    Names with no tokens anywhere are left out."""
    from megatron.core import parallel_state

    sums = torch.zeros(len(names), 2, dtype=torch.float64, device=device())
    if parallel_state.is_pipeline_last_stage():
        for out in outputs:
            for i, name in enumerate(names):
                if name in out:
                    sums[i] += out[name].double()
    dist.all_reduce(sums, group=parallel_state.get_pipeline_model_parallel_group())
    dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
    return {name.replace(" ", "_"): (sums[i, 0] / sums[i, 1]).item() for i, name in enumerate(names)
            if sums[i, 1] > 0}
