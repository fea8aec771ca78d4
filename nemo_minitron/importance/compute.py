"""Importance scoring entry point: one forward-only calibration pass (width + Block Influence), then the
optional loss-based depth metrics on validation sequences."""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
from tqdm import tqdm

from nemo_minitron.evaluation.loss import validation_loss
from nemo_minitron.importance.depth import BlockInfluence, block_losses, cached_block_losses
from nemo_minitron.importance.scores import ImportanceScores
from nemo_minitron.importance.width import BATCH_AGGS, SEQ_AGGS, WidthCollector
from nemo_minitron.models.arch import ModelArch
from nemo_minitron.models.build import unwrap
from nemo_minitron.runtime.distributed import device

DEPTH_METRICS = ("block_influence", "lm_loss_drop")


def _check_sequences(name: str, sequences, seq_length: int, micro_batch_size: int, sequence_shards: int) -> None:
    if not isinstance(sequences, torch.Tensor) or sequences.dim() != 2 or sequences.dtype.is_floating_point:
        raise ValueError(f"importance.{name} must be an integer token tensor [n, seq_length + 1]")
    n, length = sequences.shape
    if length != seq_length + 1:
        raise ValueError(
            f"importance.{name} rows have {length} tokens, but windows of seq_length={seq_length} have "
            f"{seq_length + 1}: the last token of a window is only the label of the one before and is never fed "
            f"to the model; pass windows [n, seq_length + 1] as the data stage writes them (rows of plain tokens "
            f"[n, s] are windows of seq_length=s-1, whose last token is then only a label)")
    if n == 0 or n % micro_batch_size:
        raise ValueError(f"importance.{name}: need a positive multiple of micro_batch_size={micro_batch_size} "
                         f"sequences, got {n}")
    if seq_length % sequence_shards:
        raise ValueError(f"importance.{name}: seq_length={seq_length} must be a multiple of "
                         f"tensor_model_parallel_size={sequence_shards} under sequence parallelism")


def validate_options(model, arch: ModelArch, micro_batch_size, seq_agg, batch_agg, depth_metrics,
                     block_sizes, screen_tokens=None, screen_keep=3) -> None:
    """ValueError naming the field unless the scoring options are valid for ``model`` of ``arch``."""
    if seq_agg not in SEQ_AGGS:
        raise ValueError(f"importance.seq_agg must be one of {SEQ_AGGS}, got {seq_agg!r}")
    if batch_agg not in BATCH_AGGS:
        raise ValueError(f"importance.batch_agg must be one of {BATCH_AGGS}, got {batch_agg!r}")
    unknown = [m for m in depth_metrics if m not in DEPTH_METRICS]
    if unknown:
        raise ValueError(f"importance.depth_metrics: unknown {unknown}; allowed: {DEPTH_METRICS}")
    bad = [k for k in block_sizes if not isinstance(k, int) or not 1 <= k <= arch.num_layers]
    if bad:
        raise ValueError(f"importance.block_sizes must be integers in 1..num_layers={arch.num_layers}, got {bad}")
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"importance.micro_batch_size must be a positive integer, got {micro_batch_size!r}")
    config = unwrap(model).config
    shards = config.tensor_model_parallel_size if config.sequence_parallel else 1
    if screen_tokens is not None and (not isinstance(screen_tokens, int) or screen_tokens < 1
                                      or screen_tokens % shards):
        raise ValueError(f"importance.screen_tokens must be a positive integer (a multiple of "
                         f"tensor_model_parallel_size={shards} under sequence parallelism) or null, got "
                         f"{screen_tokens!r}")
    if not isinstance(screen_keep, int) or screen_keep < 1:
        raise ValueError(f"importance.screen_keep must be a positive integer, got {screen_keep!r}")
    for field in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                  "kv_channels"):
        if getattr(config, field) != getattr(arch, field):
            raise ValueError(f"importance: arch.{field}={getattr(arch, field)} but the model has "
                             f"{getattr(config, field)}")


def _validate_sequences(model, calibration, validation, seq_length, micro_batch_size, depth_metrics,
                        block_sizes) -> None:
    if not isinstance(seq_length, int) or isinstance(seq_length, bool) or seq_length < 1:
        raise ValueError(f"importance.seq_length must be a positive integer, got {seq_length!r}")
    config = unwrap(model).config
    sequence_shards = config.tensor_model_parallel_size if config.sequence_parallel else 1
    _check_sequences("calibration", calibration, seq_length, micro_batch_size, sequence_shards)
    if "lm_loss_drop" in depth_metrics or block_sizes:
        if validation is None:
            raise ValueError("importance.validation sequences are needed for depth_metrics 'lm_loss_drop' and "
                             "block_sizes")
        _check_sequences("validation", validation, seq_length, micro_batch_size, sequence_shards)


@contextlib.contextmanager
def _progress(model, total: int, desc: str):
    """A rank-0 tqdm bar advanced by every forward call of ``model`` (one per micro-batch)."""
    with tqdm(total=total, desc=desc, unit="batch", disable=dist.get_rank() != 0) as bar:

        def advance(module, args):
            bar.update(1)  # a pre-hook's non-None return value would replace the forward's arguments

        handle = model.register_forward_pre_hook(advance)
        try:
            yield
        finally:
            handle.remove()


class CalibrationHooks(contextlib.ExitStack):
    """While open, the width statistics and (if asked) Block Influence of ``model`` are collected from whatever
    forward passes run (this project's calibration pass, or Megatron-Bridge's evaluation loop)."""

    def __init__(self, model, seq_agg: str = "mean", depth_metrics=("block_influence",)):
        super().__init__()
        self.width = self.enter_context(WidthCollector(model, seq_agg))
        self.influence = self.enter_context(BlockInfluence(model)) if "block_influence" in depth_metrics else None

    def scores(self, batch_agg: str = "l2") -> ImportanceScores:
        """Width scores and Block Influence of the passes so far (collective; equal on every rank)."""
        scores = ImportanceScores(**self.width.scores(batch_agg))
        if self.influence is not None:
            scores.layers["block_influence"] = self.influence.scores()
        return scores


def add_loss_metrics(scores: ImportanceScores, model, validation: torch.Tensor, depth_metrics, block_sizes,
                     micro_batch_size: int, screen_tokens: int | None = None, screen_keep: int = 3) -> None:
    """Add the loss-based depth scores: validation loss of ``model`` (meta["validation_loss"]), and with layers
    skipped: layers["lm_loss_drop"][l] (layer l skipped, minus the baseline) and blocks[k] (the block search).

    At pipeline_model_parallel_size=1 every block's loss comes from cached layer inputs (``cached_block_losses``).
    screen_tokens < seq_length screens: lm_loss_drop and blocks[k] are measured on the first screen_tokens positions
    of every window (causal, so exact for those positions), then the ``screen_keep`` lowest blocks of each searched
    size are measured again on all tokens (meta["block_confirmed"][k] = {start: loss}) and
    ``ImportanceScores.best_block`` picks among those.
    """
    from megatron.core import parallel_state

    if "lm_loss_drop" not in depth_metrics and not block_sizes:
        return
    seq_length = validation.shape[1] - 1
    screening = screen_tokens is not None and screen_tokens < seq_length
    screen = validation[:, :screen_tokens + 1] if screening else validation
    # lm_loss_drop is the k=1 block search minus the baseline: one pass serves both.
    sizes = sorted(set(block_sizes) | ({1} if "lm_loss_drop" in depth_metrics else set()))
    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        baseline, losses = cached_block_losses(model, screen, sizes, micro_batch_size)
    else:
        baseline = validation_loss(model, screen, micro_batch_size)
        losses = {k: block_losses(model, screen, k, micro_batch_size) for k in sizes}
    scores.meta["validation_loss"] = validation_loss(model, validation, micro_batch_size) if screening else baseline
    scores.meta["screen_tokens"] = screen_tokens if screening else None
    if "lm_loss_drop" in depth_metrics:
        scores.layers["lm_loss_drop"] = losses[1] - baseline
    for k in block_sizes:
        scores.blocks[k] = losses[k]
        if screening:
            starts = torch.argsort(losses[k], stable=True)[:screen_keep].tolist()
            confirmed = block_losses(model, validation, k, micro_batch_size, starts=starts)
            scores.meta.setdefault("block_confirmed", {})[str(k)] = {
                str(start): float(loss) for start, loss in zip(starts, confirmed)}


def compute_importance(model, arch: ModelArch, calibration: torch.Tensor, validation: torch.Tensor | None = None,
                       *, seq_length: int, micro_batch_size: int = 4, seq_agg: str = "mean", batch_agg: str = "l2",
                       depth_metrics=("block_influence",), block_sizes=(), screen_tokens: int | None = None,
                       screen_keep: int = 3) -> ImportanceScores:
    """Importance scores of ``model`` (this rank's TP shard / PP stage) from forward passes only.

    calibration / validation: token windows [n, seq_length + 1] of this data-parallel rank (each DP rank passes its
    own share; statistics are summed over DP ranks): the model reads window[:-1] and predicts window[1:], as in
    training, so the statistics cover the seq_length input tokens of each window. ``seq_length`` is required so
    that plain token rows [n, seq_length] (whose last token would silently be dropped) are rejected. Width scores and Block Influence come from one
    forward pass over ``calibration`` through Megatron's pipeline schedule, which also gives the calibration loss.
    depth_metrics: "block_influence" (calibration pass) and/or "lm_loss_drop" (validation loss with layer l
    skipped minus the unpruned validation loss). block_sizes: for each k, blocks[k][start] is the validation loss
    with layers start..start+k-1 skipped; screen_tokens / screen_keep: see ``add_loss_metrics``. Aggregations: see nemo_minitron.importance.width. Collective: every
    rank calls it; every rank returns the same full-size scores. Runs with or without sequence parallelism (then
    seq_length must be a multiple of the TP size) and gives the same scores.
    """
    from megatron.core import parallel_state

    depth_metrics, block_sizes = tuple(depth_metrics), tuple(block_sizes)
    validate_options(model, arch, micro_batch_size, seq_agg, batch_agg, depth_metrics, block_sizes, screen_tokens,
                     screen_keep)
    _validate_sequences(model, calibration, validation, seq_length, micro_batch_size, depth_metrics, block_sizes)
    with CalibrationHooks(model, seq_agg, depth_metrics) as hooks:
        with _progress(model, calibration.shape[0] // micro_batch_size, "importance calibration"):
            calibration_loss = validation_loss(model, calibration, micro_batch_size)
        scores = hooks.scores(batch_agg)
    sequences = torch.tensor([calibration.shape[0]], device=device())
    dist.all_reduce(sequences, group=parallel_state.get_data_parallel_group())
    scores.meta = score_meta(seq_agg, batch_agg, depth_metrics, block_sizes, micro_batch_size,
                             int(sequences.item()), calibration.shape[1] - 1, calibration_loss)
    add_loss_metrics(scores, model, validation, depth_metrics, block_sizes, micro_batch_size, screen_tokens,
                     screen_keep)
    return scores


def score_meta(seq_agg, batch_agg, depth_metrics, block_sizes, micro_batch_size, calibration_sequences,
               calibration_seq_length, calibration_loss) -> dict:
    """The settings and calibration facts saved with the scores."""
    return {"seq_agg": seq_agg, "batch_agg": batch_agg, "depth_metrics": list(depth_metrics),
            "block_sizes": list(block_sizes), "micro_batch_size": micro_batch_size,
            "calibration_sequences": calibration_sequences, "calibration_seq_length": calibration_seq_length,
            "calibration_loss": calibration_loss}
