"""Intermediate hidden-state losses and KD training under sequence parallelism (TP=2, SP) equal TP=1."""

import pytest
import torch

from nemo_minitron.distillation.forward_step import ForwardStep
from nemo_minitron.distillation.intermediate import IntermediateLoss
from nemo_minitron.distillation.teacher import Teacher
from nemo_minitron.distillation.trainer import TrainConfig, train
from nemo_minitron.models.build import build_gpt_model, forward_logits
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed
from tests.test_intermediate import _student_arch
from tests.test_trainer import _build_from_full, _params, _sequences, _shard

PAIRS = [[0, 1], [0, 0]]  # the student's one layer against both teacher layers: two projections (64 <- 32)


def _build_sp(arch, full, rank):
    """This TP=2 rank's sequence-parallel model with the full (TP=1) weights."""
    model = build_gpt_model(arch, sequence_parallel=True)
    model.load_state_dict(_build_from_full(arch, full, rank, 2).state_dict())
    return model


def _per_token_and_grads(student, teacher, tokens, loss_mask, coeffs):
    """Per-token cosine losses of PAIRS and their backward of sum(coeffs * losses) (student possibly DDP)."""
    inter = IntermediateLoss(PAIRS, kind="cosine")
    with inter.capture(teacher, "teacher") as teacher_states, torch.no_grad():
        forward_logits(teacher, tokens)
    with inter.capture(student, "student") as student_states:
        forward_logits(student, tokens)
    per_token = inter.per_token(student, student_states, teacher_states, loss_mask)
    (coeffs * per_token).sum().backward()
    return per_token.detach()


def _per_token_sp_run(rank, world_size, teacher_arch, student_arch, teacher_full, student_full, tokens, loss_mask,
                      coeffs, expected, expected_grads):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads

    init_distributed(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    teacher, student = _build_sp(teacher_arch, teacher_full, rank), _build_sp(student_arch, student_full, rank)
    with pytest.raises(ValueError, match="sequence_parallel"):
        IntermediateLoss(PAIRS).attach(student, _build_from_full(teacher_arch, teacher_full, rank, 2))
    IntermediateLoss(PAIRS).attach(student, teacher)
    assert all(p.sequence_parallel for p in student.kd_projections.parameters())
    ddp = DistributedDataParallel(student.config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), student)
    per_token = _per_token_and_grads(ddp, teacher, tokens, loss_mask, coeffs)
    torch.testing.assert_close(per_token, expected, atol=1e-6, rtol=1e-5)
    finalize_model_grads([ddp])  # sums the sequence-parallel (norm, projection) gradients over TP
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.main_grad, _shard(name, expected_grads[name], rank, 2), atol=1e-6, rtol=1e-5,
                                   msg=name)


def test_sp_per_token_losses_and_gradients_equal_tp1(tiny_arch, single_process):
    teacher_arch = tiny_arch.replace(tie_word_embeddings=False)
    student_arch = _student_arch(teacher_arch)
    teacher_full, student_full = _params(build_gpt_model(teacher_arch)), _params(build_gpt_model(student_arch))
    tokens = _sequences(teacher_arch, 2)[:, :-1]
    generator = torch.Generator().manual_seed(3)
    loss_mask = torch.rand(tokens.shape, generator=generator) > 0.2
    coeffs = torch.rand(len(PAIRS), *tokens.shape, generator=generator)  # exposes a wrong slice in the backward
    teacher, student = _build_from_full(teacher_arch, teacher_full), _build_from_full(student_arch, student_full)
    IntermediateLoss(PAIRS).attach(student, teacher)
    assert not any(p.sequence_parallel for p in student.kd_projections.parameters())
    expected = _per_token_and_grads(student, teacher, tokens, loss_mask, coeffs)
    assert expected.shape == (len(PAIRS), *tokens.shape) and (expected[:, ~loss_mask] == 0).all()
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad for name, p in student.named_parameters()}
    for name in ("kd_projections.1.weight", "decoder.layers.0.input_layernorm.weight",
                 "embedding.word_embeddings.weight"):
        assert grads[name].abs().max() > 0, name
    run_distributed(_per_token_sp_run, 2, teacher_arch, student_arch, teacher_full, student_full, tokens, loss_mask,
                    coeffs, expected, grads)


class _KeepProjections(IntermediateLoss):
    """Keeps the trained projections that ``train`` detaches from the student at the end."""

    def detach(self, student):
        self.projections = _params(student.kd_projections)
        super().detach(student)


def _train(student, teacher, seqs):
    """3 KD steps: forward KL + MSE intermediate losses (with projections) + 0.5 LM loss; (history, weights)."""
    inter = _KeepProjections(PAIRS, kind="mse")
    cfg = TrainConfig(steps=3, micro_batch_size=2, global_batch_size=4, lr=1e-2, min_lr=1e-3)
    history = train(student, seqs, cfg, ForwardStep(Teacher(teacher), lm_loss_weight=0.5, intermediate=inter),
                    progress=False)
    weights = _params(student)
    weights.update({f"kd_projections.{name}": p for name, p in inter.projections.items()})
    return history, weights


def _train_sp_run(rank, world_size, teacher_arch, student_arch, teacher_full, student_full, seqs, reference,
                  expected_weights):
    init_distributed(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    history, weights = _train(_build_sp(student_arch, student_full, rank), _build_sp(teacher_arch, teacher_full, rank),
                              seqs)
    for key in ("loss", "kd_loss", "inter_loss", "lm_loss", "grad_norm"):  # steps 2, 3 follow the updates
        assert [h[key] for h in history] == pytest.approx([h[key] for h in reference], rel=1e-4, abs=1e-6), key
    assert weights.keys() == expected_weights.keys()
    for name, p in weights.items():
        torch.testing.assert_close(p, _shard(name, expected_weights[name], rank, 2), rtol=1e-4, atol=1e-5, msg=name)


def test_sp_kd_training_equals_tp1(tiny_arch, single_process):
    teacher_arch = tiny_arch.replace(tie_word_embeddings=False)
    student_arch = _student_arch(teacher_arch)
    teacher_full, student_full = _params(build_gpt_model(teacher_arch)), _params(build_gpt_model(student_arch))
    seqs = _sequences(teacher_arch, 8)
    teacher = _build_from_full(teacher_arch, teacher_full)
    initial = _build_from_full(student_arch, student_full)
    IntermediateLoss(PAIRS).attach(initial, teacher)  # the projections train() starts from (the same seed)
    reference, weights = _train(_build_from_full(student_arch, student_full), teacher, seqs)
    for name, p in _params(initial).items():  # the compared weights moved
        if "layernorm" in name or name.startswith("kd_projections"):
            assert (weights[name] - p).abs().max() > 1e-3, name
    run_distributed(_train_sp_run, 2, teacher_arch, student_arch, teacher_full, student_full, seqs, reference, weights)
