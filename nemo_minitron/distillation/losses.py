"""Vocab-parallel logit distillation losses: forward KL, reverse KL, Jensen-Shannon and top-K forward KL.

Under tensor parallelism (TP) each rank holds a vocabulary shard of the logits ([b, s, V/TP], as GPTModel returns
them); the vocabulary is never gathered. Each rank computes the full-vocabulary log-softmax of its shard z from
two per-token reductions over the TP group,

    m = all-reduce MAX of max_v z_v,    Z = all-reduce SUM of sum_v exp(z_v - m),    log p(v) = z_v - m - log Z,

sums the loss terms of its own vocabulary slice, and the slices are summed over the TP group. The gradient with
respect to each logit has a closed form in p_S, p_T and per-token sums (``_grad``), so the backward is local to
each vocabulary shard: no communication. All math runs in float32 (float64 stays float64), whatever the logits'
dtype. Only the student receives gradients.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from nemo_minitron.runtime.distributed import all_gather_last_dim

KINDS = ("forward_kl", "reverse_kl", "jsd", "topk_forward_kl")


def _tp_group():
    """The tensor-parallel process group, or None for TP=1 (or when Megatron's parallel state is not set up)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return None
    group = parallel_state.get_tensor_model_parallel_group()
    return group if dist.get_world_size(group) > 1 else None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ``group``. Backward sums the gradients over the group too when ``sum_grad`` (the result is then
    used by every rank's own rank-local terms, so its gradient is the sum of theirs), else passes them through
    (the result is the final, replicated loss: each rank back-propagates it once)."""

    @staticmethod
    def forward(ctx, x, group, sum_grad):
        ctx.group, ctx.sum_grad = group, sum_grad
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        if ctx.sum_grad:
            grad = grad.clone()
            dist.all_reduce(grad, group=ctx.group)
        return grad, None, None


def _check_finite(max_logit: torch.Tensor, name: str) -> None:
    """Fail on NaN / +inf logits, checked on the (reduced) per-token maximum only, which propagates both."""
    if not bool(torch.isfinite(max_logit).all()):
        raise ValueError(f"{name} contain NaN or inf")


def _reduce_max(local_max: torch.Tensor, group, name: str) -> torch.Tensor:
    """The full-vocabulary maximum [n, 1] from this shard's (all-reduce MAX), checked finite."""
    m = local_max.detach().clone()
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    _check_finite(m, name)
    return m


def _log_softmax(z: torch.Tensor, group, name: str) -> torch.Tensor:
    """Full-vocabulary log-softmax of the vocab shard z [n, V/TP] (differentiable through Z's all-reduce)."""
    z = z - _reduce_max(z.detach().amax(dim=-1, keepdim=True), group, name)
    sum_exp = z.exp().sum(dim=-1, keepdim=True)
    if group is not None:
        sum_exp = _AllReduceSum.apply(sum_exp, group, True)
    return z - sum_exp.log()


def _softmax(z: torch.Tensor, group, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full-vocabulary softmax of the vocab shard z [n, V/TP] (no autograd): p = exp(z - m) / Z [n, V/TP], m and
    log Z [n, 1], with m = all-reduce MAX of the shards' maxima and Z = all-reduce SUM of sum_v exp(z_v - m).
    (torch.exp, not the fused softmax, whose fast CPU exponential has ~1e-5 relative error.)"""
    m = _reduce_max(z.amax(dim=-1, keepdim=True), group, name)
    p = torch.sub(z, m).exp_()
    local_sum = p.sum(dim=-1, keepdim=True)
    if group is not None:
        dist.all_reduce(local_sum, group=group)
    return p.div_(local_sum), m, local_sum.log()


def vocab_parallel_top_k(values: torch.Tensor, k: int, group) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries per row over the whole vocabulary of the vocab shards ``values`` [..., V/TP] (rank r
    of ``group`` holding vocabulary entries [r V/TP, (r + 1) V/TP)), in descending order, and their global
    vocabulary indices, [..., k] each, equal on every rank: each rank takes its shard's top min(k, V/TP), the
    ranks' candidates with their global indices are all-gathered (at most k per rank, never the vocabulary) and
    the best k kept. ``group`` None (TP=1): the shard is the whole vocabulary, a plain top-k."""
    shard = values.shape[-1]
    values, index = values.topk(min(k, shard), dim=-1)
    if group is not None:
        values = all_gather_last_dim(values, group)
        index = all_gather_last_dim(index + dist.get_rank(group) * shard, group)
        values, pos = values.topk(k, dim=-1)
        index = index.gather(-1, pos)
    return values, index


def _teacher_top_k(t: torch.Tensor, k: int, group) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's top-k tokens K over the whole vocabulary (``vocab_parallel_top_k``): log q = log_softmax(t[K])
    [n, k], the positions of K in this shard (clamped into range) and whether this shard owns them."""
    shard = t.shape[-1]
    values, index = vocab_parallel_top_k(t, k, group)
    _check_finite(values[:, :1], "teacher_logits")
    local = index - (dist.get_rank(group) * shard if group is not None else 0)
    owned = (local >= 0) & (local < shard)
    return values.log_softmax(dim=-1), local.clamp(0, shard - 1), owned


def _jsd_log_probs(s, t, lse_s, lse_t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log p_S, log p_T and log M = log((p_S + p_T) / 2), each [n, V/TP]."""
    log_p_s, log_p_t = torch.sub(s, lse_s), torch.sub(t, lse_t)
    return log_p_s, log_p_t, torch.logaddexp(log_p_s, log_p_t).sub_(math.log(2.0))


def _forward(kind: str, s: torch.Tensor, t: torch.Tensor, top_k: int | None, group):
    """The loss terms of this vocabulary shard for the scaled logits s = z_S / T, t = z_T / T [n, V/TP].

    Returns (sums, saved, probs): sums [n, c] are to be summed over the TP group (column 0 is the loss; jsd adds
    0.5 KL(S || M)); saved are the per-token tensors the backward needs (log-normalisers, top-k targets); probs
    = (p_S, p_T or None) are the [n, V/TP] probabilities the backward needs, which it may also recompute.
    """
    p_s, m_s, log_z_s = _softmax(s, group, "student_logits")
    lse_s = m_s + log_z_s
    if kind == "topk_forward_kl":
        log_q, local, owned = _teacher_top_k(t, top_k, group)
        q = torch.where(owned, log_q.exp(), 0.0)
        return (q * (log_q - s.gather(-1, local) + lse_s)).sum(-1, keepdim=True), (lse_s, q, local), (p_s, None)
    p_t, m_t, log_z_t = _softmax(t, group, "teacher_logits")
    # lse_S - lse_T with m and log Z apart: lse = m + log Z rounds at the scale of the logits, its difference too.
    saved = (lse_s, m_t + log_z_t, (m_s - m_t) + (log_z_s - log_z_t))
    if kind == "jsd":
        log_p_s, log_p_t, log_m = _jsd_log_probs(s, t, *saved[:2])
        kl_sm = log_p_s.sub_(log_m).mul_(p_s).sum(-1, keepdim=True)
        kl_tm = log_p_t.sub_(log_m).mul_(p_t).sum(-1, keepdim=True)
        return torch.cat([0.5 * (kl_tm + kl_sm), 0.5 * kl_sm], dim=-1), saved, (p_s, None)
    # KL(A || B) = sum_v p_A (log p_A - log p_B), with log p_S - log p_T = (s - t) - (lse_S - lse_T)
    if kind == "forward_kl":
        return torch.sub(t, s).add_(saved[2]).mul_(p_t).sum(-1, keepdim=True), saved, (p_s, p_t)
    return torch.sub(s, t).sub_(saved[2]).mul_(p_s).sum(-1, keepdim=True), saved, (p_s, None)


def _grad(kind: str, s, t, p_s, p_t, sums, saved) -> torch.Tensor:
    """d loss / d s [n, V/TP] of this shard (purely local), written into p_S:
      forward_kl: p_S - p_T
      reverse_kl: p_S (log p_S - log p_T - KL(S || T))
      jsd:        p_S (0.5 log(p_S / M) - 0.5 KL(S || M))
      topk:       p_S - q (q on K, 0 elsewhere)
    """
    if kind == "forward_kl":
        return p_s.sub_(p_t)
    if kind == "topk_forward_kl":
        return p_s.scatter_add_(-1, saved[2], -saved[1])
    lse_s, lse_t, lse_diff = saved
    if kind == "reverse_kl":
        return p_s.mul_(torch.sub(s, t).sub_(lse_diff + sums[:, :1]))
    log_p_s, _, log_m = _jsd_log_probs(s, t, lse_s, lse_t)
    return p_s.mul_(log_p_s.sub_(log_m).mul_(0.5).sub_(sums[:, 1:]))


def _scaled(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """z / T in float32 (float64 stays float64); z itself when that changes nothing."""
    s = z.to(torch.promote_types(z.dtype, torch.float32))
    if temperature == 1.0:
        return s
    return s / temperature if s is z else s.div_(temperature)


class _TokenLoss(torch.autograd.Function):
    """Per-token loss [n] of the logit shards [n, V/TP], ``chunk_size`` tokens at a time, with the closed-form
    gradient of ``_grad``, which needs no communication. With one chunk the forward computes the gradient from
    its own probabilities and keeps only that (not the logits, which a later in-place loss may change); with
    several it keeps the logits and per-token values, and the backward recomputes p_S = exp(s - lse_S) (and p_T)
    chunk by chunk, so only one chunk's float32 [tokens, V/TP] tensors exist at once."""

    @staticmethod
    def forward(ctx, student, teacher, kind, temperature, top_k, chunk_size, group, needs_grad):
        sums, saved = [], []
        for z_s, z_t in zip(student.split(chunk_size), teacher.split(chunk_size)):
            s, t = _scaled(z_s, temperature), _scaled(z_t, temperature)
            chunk_sums, chunk_saved, probs = _forward(kind, s, t, top_k, group)
            sums.append(chunk_sums)
            saved.append(chunk_saved)
        sums = torch.cat(sums)
        if group is not None:
            dist.all_reduce(sums, group=group)
        saved = [torch.cat(x) for x in zip(*saved)]
        ctx.kind, ctx.temperature, ctx.chunk_size, ctx.student_dtype = kind, temperature, chunk_size, student.dtype
        ctx.one_chunk = chunk_size >= student.shape[0]
        if needs_grad and ctx.one_chunk:
            ctx.save_for_backward(_grad(kind, s, t, *probs, sums, saved))
        elif needs_grad:
            ctx.save_for_backward(student, teacher, sums, *saved)
        return sums[:, 0]

    @staticmethod
    def backward(ctx, grad_loss):
        scale = grad_loss.unsqueeze(-1) / ctx.temperature  # d s / d z_S = 1 / T
        if ctx.one_chunk:
            (grad,) = ctx.saved_tensors
            return grad.mul_(scale).to(ctx.student_dtype), None, None, None, None, None, None, None
        student, teacher, sums, *saved = ctx.saved_tensors
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            s, t = _scaled(student[rows], ctx.temperature), _scaled(teacher[rows], ctx.temperature)
            chunk_saved = [x[rows] for x in saved]
            p_s = torch.sub(s, chunk_saved[0]).exp_()
            p_t = torch.sub(t, chunk_saved[1]).exp_() if ctx.kind == "forward_kl" else None
            grad[rows] = _grad(ctx.kind, s, t, p_s, p_t, sums[rows], chunk_saved).mul_(scale[rows])
        return grad, None, None, None, None, None, None, None


class VocabParallelKDLoss(torch.nn.Module):
    """Per-token distillation loss between vocab-sharded student and teacher logits.

    With p_S = softmax(student / T), p_T = softmax(teacher / T) over the full vocabulary:
      forward_kl:      KL(T || S) = sum_v p_T (log p_T - log p_S)   (the true KL, teacher entropy included)
      reverse_kl:      KL(S || T) = sum_v p_S (log p_S - log p_T)
      jsd:             0.5 KL(T || M) + 0.5 KL(S || M),  M = (p_T + p_S) / 2
      topk_forward_kl: sum_{v in K} q(v) (log q(v) - log p_S(v)), K = the teacher's top_k tokens over the whole
                       vocabulary, q = softmax(teacher[K] / T) (the teacher renormalised over K), log p_S the
                       full-vocabulary log-softmax of the student at K.
    The loss is multiplied by T^2 when ``scale_by_temperature_squared``.

    Args:
        kind: one of KINDS.
        temperature: T > 0.
        top_k: size of K, required by (and only used by) "topk_forward_kl".
        chunk_size: if set, tokens are processed this many at a time, in the backward too (recomputed from the
            logits and per-token log-normalisers), so the float32 probabilities of only one chunk exist at once;
            loss and gradients equal the unchunked ones. The logits must then stay unchanged until the backward
            (autograd raises if they are changed in place); without chunking only the gradient is kept.
    """

    def __init__(self, kind: str = "forward_kl", temperature: float = 1.0, scale_by_temperature_squared: bool = False,
                 top_k: int | None = None, chunk_size: int | None = None):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        if (kind == "topk_forward_kl") != (top_k is not None):
            raise ValueError(f"top_k is required by, and only used by, kind='topk_forward_kl' (kind={kind!r}, "
                             f"top_k={top_k!r})")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}")
        self.kind, self.temperature, self.top_k, self.chunk_size = kind, float(temperature), top_k, chunk_size
        self.scale_by_temperature_squared = scale_by_temperature_squared

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token loss, float32.

        Args:
            student_logits, teacher_logits: [b, s, V/TP] vocab shards (any leading shape, the same for both).
            loss_mask: [b, s] (the leading shape), 1 = the token counts; masked tokens get loss 0 and no gradient.
        Returns:
            [b, s] per-token loss; average it with ``masked_mean``.
        """
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ValueError(f"student_logits vocab size {student_logits.shape[-1]} != teacher_logits vocab size "
                             f"{teacher_logits.shape[-1]}")
        if student_logits.shape != teacher_logits.shape:
            raise ValueError(f"student_logits shape {tuple(student_logits.shape)} != teacher_logits shape "
                             f"{tuple(teacher_logits.shape)}")
        tokens_shape = student_logits.shape[:-1]
        if loss_mask is not None and loss_mask.shape != tokens_shape:
            raise ValueError(f"loss_mask shape {tuple(loss_mask.shape)} != logits token shape {tuple(tokens_shape)}")
        group = _tp_group()
        vocab_size = student_logits.shape[-1] * (dist.get_world_size(group) if group is not None else 1)
        if self.top_k is not None and self.top_k > vocab_size:
            raise ValueError(f"top_k {self.top_k} exceeds the vocabulary size {vocab_size}")

        student = student_logits.reshape(-1, student_logits.shape[-1])
        teacher = teacher_logits.detach().reshape(-1, teacher_logits.shape[-1])
        needs_grad = torch.is_grad_enabled() and student.requires_grad
        loss = _TokenLoss.apply(student, teacher, self.kind, self.temperature, self.top_k,
                                self.chunk_size or max(student.shape[0], 1), group, needs_grad).view(tokens_shape)
        if self.scale_by_temperature_squared:
            loss = loss * self.temperature**2
        return loss if loss_mask is None else torch.where(loss_mask.bool(), loss, 0.0)


def masked_mean(per_token: torch.Tensor, loss_mask: torch.Tensor | None = None,
                data_parallel: bool = True) -> torch.Tensor:
    """sum(per_token * loss_mask) / sum(loss_mask) (0 when no token counts).

    With ``data_parallel`` and Megatron's parallel state initialised, the sum and the count run over all
    data-parallel ranks' tokens. The gradient reaching this rank's tokens is that of the global mean,
    loss_mask / global count, so the data-parallel gradients must be summed (not averaged) to give the gradient
    of the global mean.
    """
    mask = torch.ones_like(per_token) if loss_mask is None else loss_mask.to(per_token.dtype)
    if mask.shape != per_token.shape:
        raise ValueError(f"loss_mask shape {tuple(mask.shape)} != per_token shape {tuple(per_token.shape)}")
    total, count = (per_token * mask).sum(), mask.sum()
    from megatron.core import parallel_state

    if data_parallel and parallel_state.model_parallel_is_initialized():
        group = parallel_state.get_data_parallel_group()
        if dist.get_world_size(group) > 1:
            total = _AllReduceSum.apply(total, group, False)
            count = count.clone()
            dist.all_reduce(count, group=group)
    return total / count.clamp(min=1)
