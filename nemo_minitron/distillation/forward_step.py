"""The one forward step of every training loop: Megatron's ``forward_step_func(data_iterator, model)``.

The project's trainer (distillation/trainer.py) and Megatron-Bridge's ``pretrain()`` (bridge/) both call a
``ForwardStep``. Per micro-batch {tokens, labels[, loss_mask]} it returns (output, loss_func), with loss_func
returning Megatron's per-token contract ``(loss_sum, num_tokens, {name: [sum, count]})``:

    no teacher (teacher correction):  loss = sum_t CE_t
    teacher:                          loss = sum_t KD_t + lm_loss_weight * CE_t + sum_i w_i inter_{i,t}

over the valid tokens t of the micro-batch; Megatron's finalize_model_grads divides the gradients by the global
token count, so the update is that of the mean per-token loss. Reported: "lm loss", "kd loss", "inter loss" (mean
over the pairs) and "objective" (the minimised total).
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch

from nemo_minitron.distillation.fused_output import FusedOutputKDLoss, final_hidden_states
from nemo_minitron.distillation.intermediate import IntermediateLoss
from nemo_minitron.distillation.losses import VocabParallelKDLoss
from nemo_minitron.distillation.teacher import CachedTeacher, CachedTopKKLLoss, Teacher
from nemo_minitron.models.build import causal_inputs
from nemo_minitron.runtime.distributed import device

REPORTED_LOSSES = ["kd loss", "lm loss", "inter loss", "objective"]


def _report(value: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    return torch.stack([value.detach().float(), count.float()])


class ForwardStep:
    """Forward step for LM training (``teacher=None``) or distillation from a live or cached teacher.

    Args:
        teacher: None, a Teacher (frozen model, same parallel layout as the student) or a CachedTeacher.
        kd_loss: VocabParallelKDLoss (default forward KL) for a Teacher, CachedTopKKLLoss for a CachedTeacher.
        lm_loss_weight: weight of the student's own next-token cross-entropy, >= 0.
        intermediate: hidden-state losses (live Teacher only; pipeline_model_parallel_size=1).
        fuse_output_layer: both models stop at their final hidden states and the loss makes the logits chunk by
            chunk (FusedOutputKDLoss), so the [tokens, vocabulary] logits never exist; same loss and gradients.

    Under pipeline parallelism a non-last stage returns the student's hidden states, concatenated with a live
    teacher's along the channels ([s, b, h_S + h_T], see ``pipeline``); only the last stage computes the loss.
    """

    def __init__(self, teacher=None, kd_loss=None, lm_loss_weight: float = 0.0,
                 intermediate: IntermediateLoss | None = None, fuse_output_layer: bool = False):
        if lm_loss_weight < 0:
            raise ValueError(f"distill.lm_loss_weight must be >= 0, got {lm_loss_weight}")
        if teacher is None:
            if kd_loss is not None or intermediate is not None or fuse_output_layer:
                raise ValueError("kd_loss, intermediate and fuse_output_layer need a teacher")
        elif kd_loss is None:
            kd_loss = CachedTopKKLLoss() if isinstance(teacher, CachedTeacher) else VocabParallelKDLoss()
        if intermediate is not None and not isinstance(teacher, Teacher):
            raise ValueError("intermediate losses need a live Teacher (a CachedTeacher has no hidden states)")
        self.fused = None
        if fuse_output_layer:
            if not isinstance(teacher, Teacher) or not isinstance(kd_loss, VocabParallelKDLoss):
                raise ValueError("fuse_output_layer needs a live Teacher and a VocabParallelKDLoss (it computes "
                                 "the logits of both models from their final hidden states)")
            self.fused = FusedOutputKDLoss(kd_loss, lm_loss_weight)
        self.teacher, self.kd_loss, self.lm_loss_weight = teacher, kd_loss, lm_loss_weight
        self.intermediate = intermediate

    def check_layout(self, pipeline_model_parallel_size: int) -> None:
        """ValueError unless this step runs under the layout: intermediate losses need PP=1."""
        if self.intermediate is not None and pipeline_model_parallel_size > 1:
            raise ValueError(f"intermediate losses need pipeline_model_parallel_size=1, got "
                             f"{pipeline_model_parallel_size}")

    def __call__(self, data_iterator, model):
        from megatron.core import parallel_state

        batch = next(data_iterator)
        tokens, labels = batch["tokens"].to(device()), batch["labels"].to(device())
        loss_mask = batch.get("loss_mask")
        loss_mask = (torch.ones_like(labels, dtype=torch.bool) if loss_mask is None
                     else loss_mask.to(device()).bool())
        position_ids, mask = causal_inputs(tokens)
        if self.teacher is None:
            return model(tokens, position_ids, mask, labels=labels), self._lm_loss(loss_mask)
        if not parallel_state.is_pipeline_last_stage():
            hidden = model(tokens, position_ids, mask)
            if isinstance(self.teacher, Teacher):
                with torch.no_grad():
                    teacher_hidden = self.teacher.model(tokens, position_ids, mask)
                hidden = torch.cat([hidden, teacher_hidden], dim=-1)  # backward routes the student part only
            return hidden, None  # the schedule calls loss_func on the last stage only
        intermediate = self.intermediate
        with intermediate.capture(self.teacher.model, "teacher") if intermediate else nullcontext() as t_states:
            if self.fused is None:
                targets = self.teacher.targets(tokens)
            else:
                with torch.no_grad():
                    targets = final_hidden_states(self.teacher.model, tokens, position_ids, mask)
        with intermediate.capture(model, "student") if intermediate else nullcontext() as s_states:
            if self.fused is None:
                return model(tokens, position_ids, mask), self._kd_loss(targets, labels, loss_mask, model,
                                                                          s_states, t_states)
            student_final = final_hidden_states(model, tokens, position_ids, mask)
        return student_final.hidden, self._kd_loss(targets, labels, loss_mask, model, s_states, t_states,
                                                   student_final)

    @staticmethod
    def _lm_loss(loss_mask: torch.Tensor):
        def loss_func(per_token_loss: torch.Tensor):
            total = (per_token_loss.float() * loss_mask).sum()
            count = loss_mask.sum().to(torch.int)
            return total, count, {"lm loss": _report(total, count)}

        return loss_func

    def _kd_loss(self, targets, labels, loss_mask, model, student_states, teacher_states, student_final=None):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        lm_loss_weight, intermediate = self.lm_loss_weight, self.intermediate
        report_lm = lm_loss_weight > 0 or not torch.is_grad_enabled()  # evaluation reports the LM loss too

        def loss_func(output: torch.Tensor):
            count = loss_mask.sum().to(torch.int)
            lm_sum = None
            if self.fused is not None:
                out = self.fused(student_final._replace(hidden=output), targets, loss_mask,
                                 labels if report_lm else None)
                total, kd_sum, lm_sum = out.loss, out.kd, out.lm
            else:
                kd_sum = total = self.kd_loss(output, targets, loss_mask).float().sum()
                if report_lm:
                    # Megatron's cross-entropy works in place on its input: a copy, never the logits the KD loss
                    # saved for its backward.
                    logits = output.to(torch.float32, copy=True)
                    lm_sum = (vocab_parallel_cross_entropy(logits, labels) * loss_mask).sum()
                    total = total + lm_loss_weight * lm_sum
            report = {"kd loss": _report(kd_sum, count)}
            if lm_sum is not None:
                report["lm loss"] = _report(lm_sum, count)
            if intermediate is not None:
                inter = intermediate.per_token(model, student_states, teacher_states, loss_mask)
                report["inter loss"] = _report(inter.sum() / inter.shape[0], count)
                total = total + (intermediate.weights(kd_sum, inter)[:, None, None] * inter).sum()
            report["objective"] = _report(total, count)
            return total, count, report

        return loss_func

    @contextmanager
    def pipeline(self, model):
        """While open, a live teacher's pipeline stages run alongside the student's ``model`` (unwrapped GPTModel):
        the stages exchange [s, b, h_S + h_T] tensors (the sequence dim is whatever Megatron computed, s / TP under
        sequence parallelism) and the schedule's ``set_input_tensor`` gives the first h_S channels to the student,
        the rest to the teacher. Yields the ``adjust_tensor_shapes_fn`` of Megatron's pipeline schedule, or None
        when no teacher stages travel with the student's (PP=1, no teacher, or a CachedTeacher).

        The received tensor requires grad: the student's slice carries the gradient back to the previous stage,
        the teacher's (run under no_grad) gets zeros, which that stage's backward through torch.cat discards.
        """
        from megatron.core import parallel_state

        if parallel_state.get_pipeline_model_parallel_world_size() == 1 or not isinstance(self.teacher, Teacher):
            yield None
            return
        teacher = self.teacher.model
        h_student = model.config.hidden_size
        h_total = h_student + teacher.config.hidden_size

        def set_input_tensor(input_tensor):
            hidden = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
            student_part, teacher_part = (None, None) if hidden is None else (hidden[..., :h_student],
                                                                              hidden[..., h_student:])
            type(model).set_input_tensor(model, student_part)  # None on the first stage
            teacher.set_input_tensor(teacher_part)

        def adjust_tensor_shapes(recv_shapes, send_shapes):
            return ([(*shape[:-1], h_total) for shape in recv_shapes],
                    [(*shape[:-1], h_total) for shape in send_shapes])

        model.set_input_tensor = set_input_tensor  # an instance attribute shadows GPTModel.set_input_tensor
        try:
            yield adjust_tensor_shapes
        finally:
            del model.set_input_tensor
