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


def block_losses(model, sequences: torch.Tensor, k: int, micro_batch_size: int = 4) -> torch.Tensor:
    """[num_layers - k + 1] float32: validation loss of ``sequences`` with layers start..start+k-1 skipped.

    Lower = safer to drop. With k=1 minus the unpruned loss this is the per-layer LM-loss drop.
    """
    num_layers = unwrap(model).config.num_layers
    if not 1 <= k <= num_layers:
        raise ValueError(f"importance.block_sizes: block size must be in 1..{num_layers}, got {k}")
    losses = []
    for start in tqdm(range(num_layers - k + 1), desc=f"loss without {k} layer(s)", disable=dist.get_rank() != 0):
        with skip_layers(model, range(start, start + k)):
            losses.append(validation_loss(model, sequences, micro_batch_size))
    return torch.tensor(losses, dtype=torch.float32)


def best_block(scores, k: int) -> tuple[int, float]:
    """(start, loss) of the contiguous block of ``k`` layers whose removal costs the least validation loss."""
    if k not in scores.blocks:
        raise ValueError(f"best_block: no block search for k={k}; searched block sizes: {sorted(scores.blocks)}")
    losses = scores.blocks[k]
    start = int(torch.argmin(losses))
    return start, float(losses[start])
