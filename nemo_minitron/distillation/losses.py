"""Vocab-parallel logit distillation losses: forward KL, reverse KL, Jensen-Shannon and top-K forward KL.

Under tensor parallelism (TP) each rank holds a vocabulary shard of the logits ([b, s, V/TP], as GPTModel returns
them); the vocabulary is never gathered. Each rank computes the full-vocabulary log-softmax of its shard z from
two per-token reductions over the TP group,

    m = all-reduce MAX of max_v z_v,    Z = all-reduce SUM of sum_v exp(z_v - m),    log p(v) = z_v - m - log Z,

sums the loss terms of its own vocabulary slice, and the slices are summed over the TP group. All math runs in
float32 (float64 stays float64), whatever the logits' dtype. Only the student receives gradients.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.distributed as dist

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


def _log_softmax(z: torch.Tensor, group, name: str) -> torch.Tensor:
    """Full-vocabulary log-softmax of the vocab shard z [n, V/TP] (differentiable through Z's all-reduce)."""
    m = z.detach().amax(dim=-1, keepdim=True)
    if group is not None:
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
    _check_finite(m, name)
    z = z - m
    sum_exp = z.exp().sum(dim=-1, keepdim=True)
    if group is not None:
        sum_exp = _AllReduceSum.apply(sum_exp, group, True)
    return z - sum_exp.log()


def _all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)


def _topk_partial_kl(t: torch.Tensor, logp_s: torch.Tensor, k: int, group) -> torch.Tensor:
    """This shard's terms of sum_{v in K} q(v) (log q(v) - log p_S(v)), where K is the teacher's top-k over the
    whole vocabulary (a top-k of the ranks' local top-ks: only k values and indices per token are gathered)."""
    shard = t.shape[-1]
    values, index = t.topk(min(k, shard), dim=-1)
    start = 0
    if group is not None:
        start = dist.get_rank(group) * shard
        values = _all_gather_last_dim(values, group)
        index = _all_gather_last_dim(index + start, group)
        values, pos = values.topk(k, dim=-1)
        index = index.gather(-1, pos)
    _check_finite(values[:, :1], "teacher_logits")
    log_q = values.log_softmax(dim=-1)
    local = index - start
    owned = (local >= 0) & (local < shard)
    logp_s_at = logp_s.gather(-1, local.clamp(0, shard - 1))
    return torch.where(owned, log_q.exp() * (log_q - logp_s_at), 0.0).sum(dim=-1)


class _ChunkedLoss(torch.autograd.Function):
    """``loss_fn`` applied ``chunk_size`` tokens at a time. Saves only the input logits; backward recomputes each
    chunk and writes its gradient into one buffer, so only one chunk's float32 intermediates exist at once."""

    @staticmethod
    def forward(ctx, loss_fn, chunk_size, student, teacher):
        ctx.loss_fn, ctx.chunk_size = loss_fn, chunk_size
        ctx.save_for_backward(student, teacher)
        return torch.cat([loss_fn(s, t) for s, t in zip(student.split(chunk_size), teacher.split(chunk_size))])

    @staticmethod
    def backward(ctx, grad_loss):
        student, teacher = ctx.saved_tensors
        grad = torch.empty_like(student)
        for start in range(0, student.shape[0], ctx.chunk_size):
            rows = slice(start, start + ctx.chunk_size)
            with torch.enable_grad():
                s = student[rows].detach().requires_grad_()
                loss = ctx.loss_fn(s, teacher[rows])
            (grad[rows],) = torch.autograd.grad(loss, s, grad_loss[rows])
        return None, None, grad, None


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
        chunk_size: if set, tokens are processed this many at a time, in the backward too (recomputed), so the
            float32 probabilities of only one chunk exist at once; loss and gradients equal the unchunked ones.
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
        loss_fn = functools.partial(self._token_loss, group=group)
        if self.chunk_size is not None and student.shape[0] > self.chunk_size:
            loss = _ChunkedLoss.apply(loss_fn, self.chunk_size, student, teacher)
        else:
            loss = loss_fn(student, teacher)
        loss = loss.view(tokens_shape)
        return loss if loss_mask is None else torch.where(loss_mask.bool(), loss, 0.0)

    def _token_loss(self, student: torch.Tensor, teacher: torch.Tensor, group) -> torch.Tensor:
        """Loss [n] of the logit shards [n, V/TP]."""
        dtype = torch.promote_types(student.dtype, torch.float32)
        s = student.to(dtype) / self.temperature
        t = teacher.to(dtype) / self.temperature
        logp_s = _log_softmax(s, group, "student_logits")
        if self.kind == "topk_forward_kl":
            partial = _topk_partial_kl(t, logp_s, self.top_k, group)
        else:
            logp_t = _log_softmax(t, group, "teacher_logits")
            if self.kind == "forward_kl":
                partial = (logp_t.exp() * (logp_t - logp_s)).sum(dim=-1)
            elif self.kind == "reverse_kl":
                partial = (logp_s.exp() * (logp_s - logp_t)).sum(dim=-1)
            else:
                logp_m = torch.logaddexp(logp_t, logp_s) - math.log(2.0)
                partial = 0.5 * (logp_t.exp() * (logp_t - logp_m) + logp_s.exp() * (logp_s - logp_m)).sum(dim=-1)
        loss = partial if group is None else _AllReduceSum.apply(partial, group, False)
        return loss * self.temperature**2 if self.scale_by_temperature_squared else loss


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
