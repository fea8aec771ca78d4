"""Intermediate-state distillation: cosine or MSE between the hidden states of chosen student and teacher layers.

A pair (i, j) compares the output hidden states [s, b, h] of student layer i and teacher layer j (0-based global
layer indices; the TransformerLayer's output, before the final norm), per token, in float32:
    cosine: 1 - cos(P h_S, h_T)
    mse:    mean_c (P h_S - h_T)_c^2
P is the identity when the hidden sizes are equal, else a learned nn.Linear(h_S, h_T, bias=False), one per pair
(layers at different depths carry different features). The projections are trained with the student: ``attach``
registers them as the student's submodule ``kd_projections`` before DDP wraps it, so DDP, the optimizer and the
trainer's resume checkpoints include them; ``detach`` removes them after training, so the final student has none.

Without sequence parallelism the hidden states are replicated over the tensor-parallel group: every rank computes
the same loss, and the projections are replicated (non-TP) parameters with the same gradient on every rank.
With sequence parallelism (student and teacher alike) the layer outputs are this rank's contiguous sequence slice
[s/TP, b, h]: each rank computes its tokens' losses and all-gathers them over the sequence, so ``per_token`` returns
the same full-sequence [num_pairs, b, s] as without it. Every TP rank back-propagates the same replicated total
loss, so the gather's backward keeps this rank's slice of the gradient (no sum over ranks). Each rank's projection
gradient then covers only its tokens: the projection weights are marked ``sequence_parallel`` like the norm weights
(models/norm.py), so Megatron's finalize_model_grads sums their gradients over the TP group.

Combination, per token: total = kd + sum_i w_i inter_i (+ the LM term), with w_i = ``weight``, or with ``balance``
w_i = detach(mean kd) / (n * detach(mean inter_i)) over the micro-batch's tokens (n = number of pairs), so each
weighted term is 1/n of the logit loss and the intermediate terms together equal it (ModelOpt's
LogitsAndIntermediatesLossBalancer scales the mean of the intermediate losses to the logit loss).
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from nemo_minitron.models.build import unwrap

KINDS = ("cosine", "mse")
PROJECTIONS = "kd_projections"


def hidden_state_loss(student: torch.Tensor, teacher: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token loss [...] of hidden states [..., h] of the same width (the student's already projected), float32:
    1 - cos(student, teacher) for "cosine", mean over channels of (student - teacher)^2 for "mse"."""
    s, t = student.float(), teacher.float()
    if kind == "cosine":
        return 1.0 - F.cosine_similarity(s, t, dim=-1)
    return (s - t).square().mean(dim=-1)


@contextmanager
def capture_layer_outputs(model, layers):
    """Yields {i: output hidden states [s, b, h] of model.decoder.layers[i]}, filled by forward hooks while open."""
    states, handles = {}, []
    decoder_layers = unwrap(model).decoder.layers
    for i in sorted(set(layers)):
        def hook(module, args, output, i=i):
            states[i] = output[0] if isinstance(output, tuple) else output

        handles.append(decoder_layers[i].register_forward_hook(hook))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


class IntermediateLoss:
    """Hidden-state losses of ``pairs`` [(student_layer, teacher_layer), ...] (see the module docstring).

    Args:
        pairs: 0-based global layer indices, checked against the models by ``attach``.
        kind: one of KINDS.
        weight: the fixed weight w of every pair (ignored when balance).
        balance: rescale the terms to the logit loss per micro-batch.
    """

    def __init__(self, pairs, kind: str = "cosine", weight: float = 1.0, balance: bool = False):
        if not pairs or any(len(pair) != 2 or any(not isinstance(x, int) or x < 0 for x in pair) for pair in pairs):
            raise ValueError(f"distill.intermediate_pairs must be a non-empty list of [student_layer, teacher_layer] "
                             f"pairs of integers >= 0, got {pairs!r}")
        if kind not in KINDS:
            raise ValueError(f"distill.intermediate_loss must be one of {KINDS}, got {kind!r}")
        if not (isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0):
            raise ValueError(f"distill.intermediate_weight must be a finite number >= 0, got {weight!r}")
        self.pairs = [(int(i), int(j)) for i, j in pairs]
        self.kind, self.weight, self.balance = kind, float(weight), bool(balance)

    def attach(self, student, teacher, seed: int = 1234) -> None:
        """Check the pairs against the student and teacher (single-stage GPTModels) and, when their hidden sizes
        differ, register one projection per pair as ``student.kd_projections``, initialised like nn.Linear
        (uniform in +-1/sqrt(h_S)) from ``seed``, so every rank starts from the same weights; under sequence
        parallelism their weights are marked ``sequence_parallel`` (gradients summed over TP)."""
        sequence_parallel = student.config.sequence_parallel
        if teacher.config.sequence_parallel != sequence_parallel:
            raise ValueError(f"intermediate losses need the student and the teacher both with or both without "
                             f"sequence_parallel, got student {sequence_parallel}, teacher "
                             f"{teacher.config.sequence_parallel}")
        for name, model, side in (("student", student, 0), ("teacher", teacher, 1)):
            num_layers = len(model.decoder.layers)
            bad = [pair for pair in self.pairs if pair[side] >= num_layers]
            if bad:
                raise ValueError(f"distill.intermediate_pairs: {name} layer index out of range in {bad}; the "
                                 f"{name} has {num_layers} layers (0-based indices)")
        h_s, h_t = student.config.hidden_size, teacher.config.hidden_size
        if h_s == h_t:
            return
        param = next(student.parameters())
        generator = torch.Generator().manual_seed(seed)
        projections = torch.nn.ModuleList()
        for _ in self.pairs:
            weight = (torch.rand(h_t, h_s, generator=generator, dtype=torch.float64) * 2 - 1) / math.sqrt(h_s)
            linear = torch.nn.Linear(h_s, h_t, bias=False, device=param.device, dtype=param.dtype)
            with torch.no_grad():
                linear.weight.copy_(weight)
            setattr(linear.weight, "sequence_parallel", sequence_parallel)
            projections.append(linear)
        setattr(student, PROJECTIONS, projections)

    @staticmethod
    def detach(student) -> None:
        """Remove the projections ``attach`` registered (if any) from the student."""
        if hasattr(student, PROJECTIONS):
            delattr(student, PROJECTIONS)

    def capture(self, model, side: str):
        """capture_layer_outputs of the student's ("student") or teacher's ("teacher") layers of the pairs."""
        return capture_layer_outputs(model, [pair[side == "teacher"] for pair in self.pairs])

    def per_token(self, student, student_states: dict, teacher_states: dict,
                  loss_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Per-token losses [num_pairs, b, s] (float32; 0 where loss_mask [b, s] is 0) of the captured states;
        ``student`` (possibly DDP-wrapped) holds the projections. Under sequence parallelism the states are this
        rank's slice [s/TP, b, h]; the losses are all-gathered over the sequence (backward: this rank's slice)."""
        model = unwrap(student)
        projections = getattr(model, PROJECTIONS, None)
        losses = []
        for k, (i, j) in enumerate(self.pairs):
            h_s, h_t = student_states[i], teacher_states[j]
            if projections is not None:
                h_s = projections[k](h_s)
            if h_s.shape != h_t.shape:
                raise ValueError(f"pair ({i}, {j}): student hidden states {tuple(h_s.shape)} != teacher hidden "
                                 f"states {tuple(h_t.shape)}")
            losses.append(hidden_state_loss(h_s, h_t.detach(), self.kind))
        losses = torch.stack(losses, dim=1)  # [s (/TP), num_pairs, b]
        if model.config.sequence_parallel:
            from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

            losses = gather_from_sequence_parallel_region(losses, tensor_parallel_output_grad=False)
        losses = losses.permute(1, 2, 0)
        return losses if loss_mask is None else torch.where(loss_mask.bool(), losses, 0.0)

    def weights(self, kd: torch.Tensor, inter: torch.Tensor) -> torch.Tensor:
        """Weights [num_pairs] (no gradient) of the per-token losses inter [num_pairs, b, s] given the logit loss
        kd (per token [b, s], or its sum; masked tokens 0 in both): ``weight``, or with balance
        mean(kd) / (num_pairs * mean(inter_i))
        (0 for a pair whose loss is 0)."""
        n = inter.shape[0]
        if not self.balance:
            return torch.full((n,), self.weight, device=inter.device)
        kd_sum, inter_sums = kd.detach().sum(), inter.detach().sum(dim=(1, 2))
        return torch.where(inter_sums > 0, kd_sum / (n * inter_sums), 0.0)
