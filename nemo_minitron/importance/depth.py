"""Depth importance: Block Influence, layer skipping, and the LM loss with a contiguous block of layers removed.

Layers are named by their 0-based global index l (Megatron's ``layer_number - 1``), the index of
ImportanceScores.layers[metric][l].

Sequence parallelism: Block Influence counts each TP rank's own sequence slice of the sequence-sharded layer
inputs / outputs; the loss-based metrics go through validation_loss, whose logits are full-sequence under it.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from torch.linalg import vecdot
from tqdm import tqdm

from nemo_minitron.evaluation.loss import validation_loss
from nemo_minitron.importance.width import HookCollector, gather_layers, layer_index, local_layers, tp_share
from nemo_minitron.models.build import unwrap


class BlockInfluence(HookCollector):
    """BI_l = 1 - mean over tokens of cos(h_in, h_out), h_in / h_out the hidden states entering / leaving layer l.

    Collected (float32 cosines, float64 sums) during any forward passes run inside ``with``; the (token count,
    cos sum) pairs are summed over TP ranks, so each token must be counted on one rank. Without sequence
    parallelism the hidden states are replicated over TP ranks and TP rank r takes the r-th of TP slices of the
    sequence; under sequence parallelism they are sequence-sharded [s / TP, b, h] and each rank takes all of them.
    """

    def __init__(self, model):
        super().__init__()
        layers = local_layers(model)
        config = unwrap(model).config
        self.num_layers = config.num_layers
        self.sequence_parallel = config.sequence_parallel
        self.indices = [layer_index(layer) for layer in layers]
        self.tokens = [0] * len(layers)  # python ints: no tensor op on the hot path
        self.cos_sum = torch.zeros(len(layers), dtype=torch.float64, device=next(model.parameters()).device)
        for i, layer in enumerate(layers):
            self.handles.append(layer.register_forward_hook(self._hook(i), with_kwargs=True))

    def _hook(self, site: int):
        def hook(module, args, kwargs, output):
            h_in = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            rows = slice(None) if self.sequence_parallel else tp_share(h_in.shape[0])
            a, b = (h.detach()[rows].float() for h in (h_in, output[0]))
            # cos(a, b) per token; ~1.5x faster on CPU than F.cosine_similarity
            cos = vecdot(a, b) * vecdot(a, a).clamp_min(1e-16).rsqrt() * vecdot(b, b).clamp_min(1e-16).rsqrt()
            self.tokens[site] += cos.numel()
            self.cos_sum[site] += cos.sum()
        return hook

    def scores(self) -> torch.Tensor:
        """BI [num_layers] float32 on every rank (collective over the data-parallel, tensor-parallel and pipeline
        groups)."""
        from megatron.core import parallel_state

        sums = torch.stack([torch.tensor(self.tokens, dtype=torch.float64, device=self.cos_sum.device),
                            self.cos_sum])
        dist.all_reduce(sums, group=parallel_state.get_data_parallel_group())
        dist.all_reduce(sums, group=parallel_state.get_tensor_model_parallel_group())
        local = 1 - sums[1] / sums[0]
        return gather_layers(local, self.indices, self.num_layers).float()


@contextlib.contextmanager
def skip_layers(model, layer_indices):
    """Run ``model`` without the layers whose global index is in ``layer_indices``; restored on exit.

    Only this pipeline stage's layers are touched (a layer lives on one stage): decoder.layers becomes a ModuleList
    of the kept layers, and num_layers_per_pipeline_rank (used by activation recomputation) follows it. Embedding,
    final_layernorm and output layer are unchanged, so skipping every layer runs embedding -> final norm -> output.
    """
    decoder = unwrap(model).decoder
    skip = set(layer_indices)
    num_layers = decoder.config.num_layers
    bad = sorted(i for i in skip if not 0 <= i < num_layers)
    if bad:
        raise ValueError(f"skip_layers: layer indices {bad} are outside 0..{num_layers - 1}")
    original = decoder.layers
    decoder.layers = torch.nn.ModuleList([layer for layer in original if layer_index(layer) not in skip])
    decoder.num_layers_per_pipeline_rank = len(decoder.layers)
    try:
        yield model
    finally:
        decoder.layers = original
        decoder.num_layers_per_pipeline_rank = len(original)


def block_losses(model, sequences: torch.Tensor, k: int, micro_batch_size: int = 4, starts=None) -> torch.Tensor:
    """[len(starts)] float32: validation loss of ``sequences`` with layers start..start+k-1 skipped, for every start
    in ``starts`` (default: all, 0..num_layers - k). Each is a forward of the whole model minus the block.

    Lower = safer to drop. With k=1 minus the unpruned loss this is the per-layer LM-loss drop.
    """
    num_layers = unwrap(model).config.num_layers
    if not 1 <= k <= num_layers:
        raise ValueError(f"importance.block_sizes: block size must be in 1..{num_layers}, got {k}")
    starts = range(num_layers - k + 1) if starts is None else starts
    losses = []
    for start in tqdm(starts, desc=f"loss without {k} layer(s)", disable=dist.get_rank() != 0):
        with skip_layers(model, range(start, start + k)):
            losses.append(validation_loss(model, sequences, micro_batch_size))
    return torch.tensor(losses, dtype=torch.float32)


class LayerInputs(HookCollector):
    """While open, ``inputs[l]`` is the hidden state that entered layer l (global index) in the last forward."""

    def __init__(self, model):
        super().__init__()
        self.inputs = {}
        for layer in local_layers(model):
            self.handles.append(layer.register_forward_pre_hook(self._hook(layer_index(layer)), with_kwargs=True))

    def _hook(self, index: int):
        def hook(module, args, kwargs):
            h = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[index] = h.detach().clone()
        return hook


@contextlib.contextmanager
def _embedding_returns(model, hidden: torch.Tensor):
    """The model's embedding outputs ``hidden`` (the decoder then starts from it) until exit."""
    handle = unwrap(model).embedding.register_forward_hook(lambda module, args, output: hidden)
    try:
        yield
    finally:
        handle.remove()


def cached_block_losses(model, sequences: torch.Tensor, block_sizes, micro_batch_size: int = 4):
    """(baseline, {k: [num_layers - k + 1]}): the validation loss of ``sequences``, and the loss with every
    contiguous block start..start+k-1 skipped, equal to ``block_losses`` at a fraction of its cost.

    Per micro-batch, one full forward keeps the hidden state h_l entering every layer; skipping block [a, a+k)
    then only runs layers a+k..L-1 from h_a (plus final norm, output layer and loss), instead of the whole model
    minus the block. Pipeline parallelism (layers on other stages) is not supported: use ``block_losses``.
    Every micro-batch has the same token count, so the mean over micro-batches is the token-weighted mean.
    """
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        raise ValueError("cached_block_losses needs pipeline_model_parallel_size=1; use block_losses")
    num_layers = unwrap(model).config.num_layers
    chunks = [sequences[i:i + micro_batch_size] for i in range(0, sequences.shape[0], micro_batch_size)]
    baseline = 0.0
    sums = {k: torch.zeros(num_layers - k + 1, dtype=torch.float64) for k in block_sizes}
    total = len(chunks) * sum(num_layers - k + 1 for k in block_sizes)
    with tqdm(total=total, desc="block search (cached layer inputs)", disable=dist.get_rank() != 0) as bar:
        for chunk in chunks:
            with LayerInputs(model) as cache:
                baseline += validation_loss(model, chunk, micro_batch_size)
            for k in block_sizes:
                for start in range(num_layers - k + 1):
                    with skip_layers(model, range(start + k)), _embedding_returns(model, cache.inputs[start]):
                        sums[k][start] += validation_loss(model, chunk, micro_batch_size)
                    bar.update(1)
    return baseline / len(chunks), {k: (v / len(chunks)).float() for k, v in sums.items()}


def block_task_metrics(model, tokenizer, k: int, starts, task: str, metric: str = "acc", **task_options
                       ) -> dict[int, float]:
    """{start: ``metric`` of lm_eval ``task`` for the model with layers start..start+k-1 skipped} (higher = safer
    to drop), through ``evaluation.lm_eval_adapter.evaluate_tasks`` (``task_options``: its keyword arguments)."""
    from nemo_minitron.evaluation.lm_eval_adapter import evaluate_tasks

    values = {}
    for start in starts:
        with skip_layers(model, range(start, start + k)):
            results = evaluate_tasks(model, tokenizer, [task], **task_options)[task]
        if metric not in results:
            raise ValueError(f"score.block_task_metric: task {task!r} reports {sorted(results)}, not {metric!r}")
        values[int(start)] = results[metric]
    return values
