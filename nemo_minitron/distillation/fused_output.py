"""Logit distillation fused with the output projection: the student's and teacher's logits are never materialised.

From the final hidden states h (after the final norm) and the output weight shard W [V/TP, h] of each model, the
tokens are processed ``chunk_size`` at a time. Per chunk, z_S = h_S W_S^T and z_T = h_T W_T^T on the local
vocabulary shard, the loss terms and the closed-form gradient d loss / d z_S of ``losses.py`` (vocab-parallel
log-softmax: all-reduce of the max and the exp-sum over TP), and then, still in the forward,

    grad h_S[chunk] = g W_S,    grad W_S += g^T h_S[chunk],    g = d loss / d z_S [chunk, V/TP].

The result is a scalar sum, so the backward only multiplies the stored gradients by its incoming gradient
(Liger-kernel style). Only one chunk's [chunk, V/TP] logits and float32 probabilities exist at a time.

The hidden states enter as the output layer (Megatron's ColumnParallelLinear) receives them: replicated over TP,
or under sequence parallelism sharded along the sequence [s/TP, b, h]. Like that layer, the loss first applies
copy_to_tensor_model_parallel_region (identity; backward all-reduce over TP), or under sequence parallelism
gather_from_sequence_parallel_region (all-gather along s; backward reduce-scatter), because each rank's grad h is
the partial sum over its vocabulary shard.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from nemo_minitron.distillation.losses import VocabParallelKDLoss, _forward, _grad, _scaled, _softmax, _tp_group
from nemo_minitron.models.build import unwrap


class FinalHiddenStates(NamedTuple):
    """One model's input to its output layer."""

    hidden: torch.Tensor  # [s, b, h] after the final norm; [s/TP, b, h] under sequence parallelism
    output_weight: torch.Tensor  # [V/TP, h], this rank's vocabulary shard (the embedding weight when tied)
    sequence_parallel: bool = False


class FusedKDOutput(NamedTuple):
    """Sums over the valid tokens of this rank's micro-batch (replicated over TP)."""

    loss: torch.Tensor  # scalar, differentiable: sum of kd + lm_loss_weight * lm
    kd: torch.Tensor  # scalar, detached: sum of the per-token distillation loss
    lm: torch.Tensor | None  # scalar, detached: sum of the per-token cross-entropy (None without labels)
    count: torch.Tensor  # int scalar: number of valid tokens


def final_hidden_states(model, tokens: torch.Tensor, position_ids: torch.Tensor,
                        attention_mask: torch.Tensor) -> FinalHiddenStates:
    """Run a Megatron-Core GPTModel (the last pipeline stage; possibly wrapped in DDP / Float16Module) up to the
    input of its output layer, without computing logits.

    GPTModel.forward returns the decoder's output (which includes the final norm) when post_process is False, so
    post_process is switched off for this call only. The unwrapped model is called, so Float16Module does not cast
    the hidden states to float32. hidden @ output_weight^T (gathered along s under sequence parallelism) equals the
    model's logits, transposed to [s, b, V/TP]. The weight's module has its forward pre-hooks run
    (run_forward_pre_hooks), as if its forward had been called.
    """
    gpt = unwrap(model)
    if not gpt.post_process:
        raise ValueError("final_hidden_states needs the last pipeline stage (post_process=True)")
    if getattr(gpt, "mtp_process", False):
        raise ValueError("final_hidden_states does not support multi-token prediction (mtp_num_layers)")
    gpt.post_process = False
    try:
        hidden = gpt(tokens, position_ids, attention_mask)
    finally:
        gpt.post_process = True
    owner = gpt.embedding.word_embeddings if gpt.share_embeddings_and_output_weights and gpt.pre_process \
        else gpt.output_layer  # the module holding the weight that shared_embedding_or_output_weight() returns
    run_forward_pre_hooks(owner)
    return FinalHiddenStates(hidden, owner.weight, bool(gpt.config.sequence_parallel))


def run_forward_pre_hooks(module) -> None:
    """Run ``module``'s forward pre-hooks without its forward. Megatron DDP with overlap_param_gather waits for a
    module's all-gathered parameters in such a hook (and an unfinished gather fails the next step's start); the
    fused loss reads the output layer's weight without calling the layer, so it runs the hooks itself."""
    for key, hook in list(module._forward_pre_hooks.items()):
        if key in module._forward_pre_hooks_with_kwargs:
            hook(module, (), {})
        else:
            hook(module, ())


def _cross_entropy(z: torch.Tensor, labels: torch.Tensor, group) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token -log p(label) [n] of the float32 vocab shard z [n, V/TP] (as vocab_parallel_cross_entropy:
    log Z - (z_label - m)) and its gradient p - onehot(label) [n, V/TP]."""
    p, m, log_z = _softmax(z, group, "student_logits")
    shard = z.shape[-1]
    local = labels - (dist.get_rank(group) * shard if group is not None else 0)
    owned = (local >= 0) & (local < shard)
    local = local.clamp(0, shard - 1).unsqueeze(-1)
    picked = torch.where(owned, (z.gather(-1, local) - m).squeeze(-1), 0.0)
    if group is not None:
        dist.all_reduce(picked, group=group)
    return log_z.squeeze(-1) - picked, p.scatter_add_(-1, local, -owned.to(p.dtype).unsqueeze(-1))


def _chunk_loss(loss: FusedOutputKDLoss, z_s, z_t, valid, labels, group, needs_grad):
    """Per-token kd and lm [n] (0 where not valid) of the logit shards z_S, z_T [n, V/TP] and, if needs_grad,
    g = d (sum kd + lm_loss_weight * sum lm) / d z_S [n, V/TP] (float32)."""
    kd_loss = loss.kd_loss
    s, t = _scaled(z_s, kd_loss.temperature), _scaled(z_t, kd_loss.temperature)
    sums, saved, probs = _forward(kd_loss.kind, s, t, kd_loss.top_k, group)
    if group is not None:
        dist.all_reduce(sums, group=group)
    kd_scale = kd_loss.temperature**2 if kd_loss.scale_by_temperature_squared else 1.0
    kd = torch.where(valid, sums[:, 0], 0.0) * kd_scale
    g = None
    if needs_grad:  # d s / d z_S = 1 / T
        g = _grad(kd_loss.kind, s, t, *probs, sums, saved).mul_((valid * (kd_scale / kd_loss.temperature))[:, None])
    if labels is None:
        return kd, None, g
    lm, grad_lm = _cross_entropy(z_s.to(s.dtype), labels, group)
    if needs_grad:
        g.add_(grad_lm.mul_((valid * loss.lm_loss_weight)[:, None]))
    return kd, torch.where(valid, lm, 0.0), g


class _FusedLoss(torch.autograd.Function):
    """(loss, kd, lm) sums of ``_chunk_loss`` over the tokens of hidden [n, h] (replicated over TP), chunk by chunk;
    the gradients w.r.t. hidden (this shard's partial sum) and weight are computed in the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, teacher_hidden, teacher_weight, valid, labels, loss, group, needs_grad):
        kd_sum = hidden.new_zeros((), dtype=torch.float32)
        lm_sum = kd_sum.clone()
        grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None
        grad_weight = torch.zeros_like(weight) if needs_grad[1] else None
        chunk_size = loss.chunk_size or max(hidden.shape[0], 1)
        for start in range(0, hidden.shape[0], chunk_size):
            rows = slice(start, start + chunk_size)
            h = hidden[rows]
            z_s, z_t = h @ weight.t(), teacher_hidden[rows] @ teacher_weight.t()
            kd, lm, g = _chunk_loss(loss, z_s, z_t, valid[rows], None if labels is None else labels[rows], group,
                                    any(needs_grad))
            kd_sum += kd.sum()
            if lm is not None:
                lm_sum += lm.sum()
            if grad_hidden is not None:
                grad_hidden[rows] = g.to(weight.dtype) @ weight
            if grad_weight is not None:
                grad_weight.addmm_(g.t().to(h.dtype), h)
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(kd_sum, lm_sum)
        return kd_sum + loss.lm_loss_weight * lm_sum, kd_sum, lm_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_lm):
        grads = [None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in ctx.saved_tensors]
        return *grads, None, None, None, None, None, None, None


class FusedOutputKDLoss(torch.nn.Module):
    """``kd_loss`` (+ lm_loss_weight * next-token cross-entropy) of the logits h @ W^T of the student and the
    teacher, computed from their final hidden states without materialising the logits.

    Loss and gradients (w.r.t. the student's hidden states and output weight) equal those of
    sum_tokens mask * (kd_loss(student_logits, teacher_logits) + lm_loss_weight * vocab_parallel_cross_entropy)
    on the materialised logits. Only the student receives gradients.

    Args:
        kd_loss: the VocabParallelKDLoss giving kind, temperature, T^2 scaling, top_k (and chunk_size by default).
        lm_loss_weight: weight (>= 0) of the cross-entropy in ``loss``; the cross-entropy is computed (and
            reported) whenever labels are given.
        chunk_size: tokens per chunk (default kd_loss.chunk_size, else all tokens at once).
    The matmuls run in the weights' dtype (as the output layer's); the loss math in float32; grad W accumulates
    over chunks in the weights' dtype.
    """

    def __init__(self, kd_loss: VocabParallelKDLoss, lm_loss_weight: float = 0.0, chunk_size: int | None = None):
        super().__init__()
        if not isinstance(kd_loss, VocabParallelKDLoss):
            raise ValueError(f"kd_loss must be a VocabParallelKDLoss, got {type(kd_loss).__name__}")
        if not lm_loss_weight >= 0:
            raise ValueError(f"lm_loss_weight must be >= 0, got {lm_loss_weight}")
        if chunk_size is not None and chunk_size < 1:
            raise ValueError(f"chunk_size must be None or >= 1, got {chunk_size}")
        self.kd_loss, self.lm_loss_weight = kd_loss, float(lm_loss_weight)
        self.chunk_size = chunk_size or kd_loss.chunk_size  # None: all tokens at once

    def forward(self, student: FinalHiddenStates, teacher: FinalHiddenStates, loss_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> FusedKDOutput:
        """Sums over the valid tokens (loss_mask [b, s], 1 = counts; labels [b, s] global token ids)."""
        group = _tp_group()
        student_hidden = _full_sequence(student.hidden, student.sequence_parallel, group)
        teacher_hidden = _full_sequence(teacher.hidden.detach(), teacher.sequence_parallel, group)
        s, b = student_hidden.shape[:2]
        if teacher_hidden.shape[:2] != (s, b):
            raise ValueError(f"teacher hidden [s, b] {tuple(teacher_hidden.shape[:2])} != student hidden [s, b] "
                             f"{(s, b)}")
        for name, (hidden, weight) in {"student": student[:2], "teacher": teacher[:2]}.items():
            if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
                raise ValueError(f"{name} hidden size {hidden.shape[-1]} != {name} output_weight shape "
                                 f"{tuple(weight.shape)}[1]")
        if student.output_weight.shape[0] != teacher.output_weight.shape[0]:
            raise ValueError(f"student vocab shard size {student.output_weight.shape[0]} != teacher vocab shard size "
                             f"{teacher.output_weight.shape[0]}")
        vocab_size = student.output_weight.shape[0] * (dist.get_world_size(group) if group is not None else 1)
        if self.kd_loss.top_k is not None and self.kd_loss.top_k > vocab_size:
            raise ValueError(f"top_k {self.kd_loss.top_k} exceeds the vocabulary size {vocab_size}")
        for name, x in {"loss_mask": loss_mask, "labels": labels}.items():
            if x is not None and x.shape != (b, s):
                raise ValueError(f"{name} shape {tuple(x.shape)} != [b, s] {(b, s)}")
        if labels is None and self.lm_loss_weight > 0:
            raise ValueError(f"labels are required when lm_loss_weight > 0 (lm_loss_weight={self.lm_loss_weight})")
        if labels is not None and labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < vocab_size):
            raise ValueError(f"labels must be token ids in [0, {vocab_size})")

        # tokens in the hidden states' order: [s, b] flattened
        valid = torch.ones(s * b, dtype=torch.bool, device=student_hidden.device) if loss_mask is None \
            else loss_mask.t().reshape(-1).bool()
        flat_labels = None if labels is None else labels.t().reshape(-1)
        needs_grad = tuple(torch.is_grad_enabled() and x.requires_grad for x in (student_hidden, student.output_weight))
        loss, kd, lm = _FusedLoss.apply(
            student_hidden.reshape(s * b, -1), student.output_weight, teacher_hidden.reshape(s * b, -1),
            teacher.output_weight.detach(), valid, flat_labels, self, group, needs_grad)
        return FusedKDOutput(loss, kd, None if labels is None else lm, valid.sum().to(torch.int))


def _full_sequence(hidden: torch.Tensor, sequence_parallel: bool, group) -> torch.Tensor:
    """The hidden states [s, b, h] as the output layer's matmul sees them (see the module docstring)."""
    from megatron.core.tensor_parallel import copy_to_tensor_model_parallel_region, gather_from_sequence_parallel_region

    if group is None:
        return hidden
    if sequence_parallel:
        return gather_from_sequence_parallel_region(hidden, group=group)
    return copy_to_tensor_model_parallel_region(hidden, group=group)
