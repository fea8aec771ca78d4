import math
from unittest import mock

import pytest
import torch
import torch.nn.functional as F

from nemo_minitron.distillation.losses import KINDS, VocabParallelKDLoss, masked_mean
from tests.distributed import run_distributed

VOCAB, TOP_K, T = 64, 5, 2.0


def _kwargs(kind):
    return {"top_k": TOP_K} if kind == "topk_forward_kl" else {}


def reference(kind, student, teacher, temperature=T):
    """Per-token loss on the full vocabulary in float64, written with torch.nn.functional."""
    s, t = student.double() / temperature, teacher.double() / temperature
    log_ps, log_pt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    if kind == "forward_kl":
        return F.kl_div(log_ps, log_pt, log_target=True, reduction="none").sum(-1)
    if kind == "reverse_kl":
        return F.kl_div(log_pt, log_ps, log_target=True, reduction="none").sum(-1)
    if kind == "jsd":
        p_t, p_s = log_pt.exp(), log_ps.exp()
        log_m = ((p_t + p_s) / 2).log()
        kl_tm, kl_sm = (F.kl_div(log_m, p, reduction="none").sum(-1) for p in (p_t, p_s))
        return 0.5 * kl_tm + 0.5 * kl_sm
    values, index = t.topk(TOP_K, dim=-1)
    q = F.softmax(values, -1)
    return (q * (q.log() - log_ps.gather(-1, index))).sum(-1)


def _inputs(seed=0, shape=(2, 5), dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    student = (2 * torch.randn(*shape, VOCAB, generator=g)).to(dtype)
    teacher = (2 * torch.randn(*shape, VOCAB, generator=g)).to(dtype)
    mask = torch.ones(shape)
    mask[0, 1] = mask[1, 3] = mask[1, 4] = 0
    weight = torch.rand(shape, generator=g, dtype=torch.float64)  # upstream gradient per token
    return student, teacher, mask, weight


def _reference_loss_and_grad(kind, student, teacher, mask, weight, scale=1.0):
    s = student.double().requires_grad_()
    loss = scale * reference(kind, s, teacher) * mask
    (loss * weight).sum().backward()
    return loss.detach(), s.grad


def _loss_and_grad(module, student, teacher, mask, weight):
    s = student.detach().requires_grad_()
    loss = module(s, teacher, mask)
    (loss * weight.to(loss.dtype)).sum().backward()
    return loss.detach(), s.grad


@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_full_vocab_reference(kind, scale):
    student, teacher, mask, weight = _inputs()
    module = VocabParallelKDLoss(kind, temperature=T, scale_by_temperature_squared=scale, **_kwargs(kind))
    loss, grad = _loss_and_grad(module, student, teacher, mask, weight)
    ref_loss, ref_grad = _reference_loss_and_grad(kind, student, teacher, mask, weight, T**2 if scale else 1.0)
    assert loss.dtype == torch.float32 and (loss[mask == 0] == 0).all()
    assert (ref_loss[mask == 1] > 1e-3).all()
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
    assert (grad[mask == 0] == 0).all()


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_float32_precision_on_large_shifted_logits(kind):
    # LM-like logits (large, offset, teacher shifted from the student): float32 must stay near float64.
    g = torch.Generator().manual_seed(1)
    student = 4 * torch.randn(16, 4096, generator=g) + 10
    teacher = student + 1.5 * torch.randn(16, 4096, generator=g) + 3
    s = student.clone().requires_grad_()
    loss = VocabParallelKDLoss(kind)(s, teacher)
    loss.sum().backward()
    s64 = student.double().requires_grad_()
    ref = reference(kind, s64, teacher, temperature=1.0)
    ref.sum().backward()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(s.grad.double(), s64.grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("kind", KINDS)
def test_bf16_logits_give_float32_loss(kind):
    student, teacher, mask, weight = _inputs(dtype=torch.bfloat16)
    loss, grad = _loss_and_grad(VocabParallelKDLoss(kind, temperature=T, **_kwargs(kind)), student, teacher, mask,
                                weight)
    ref_loss, ref_grad = _reference_loss_and_grad(kind, student, teacher, mask, weight)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)  # float32 math on bf16 values
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=1e-4)  # grad rounded to bf16


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_bf16_with_temperature_matches_reference(kind):
    # The chunked backward recomputes p_S (and p_T) from the saved log-normalisers of the scaled bf16 logits.
    student, teacher, mask, weight = _inputs(dtype=torch.bfloat16)
    module = VocabParallelKDLoss(kind, temperature=T, scale_by_temperature_squared=True, chunk_size=3,
                                 **_kwargs(kind))
    loss, grad = _loss_and_grad(module, student, teacher, mask, weight)
    ref_loss, ref_grad = _reference_loss_and_grad(kind, student, teacher, mask, weight, T**2)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=2e-2, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind):
    student, teacher, mask, weight = _inputs(shape=(2, 7))
    mask = torch.ones(2, 7)
    full = _loss_and_grad(VocabParallelKDLoss(kind, **_kwargs(kind)), student, teacher, mask, weight)
    chunked = _loss_and_grad(VocabParallelKDLoss(kind, chunk_size=4, **_kwargs(kind)), student, teacher, mask, weight)
    torch.testing.assert_close(chunked[0], full[0], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(chunked[1], full[1], rtol=1e-6, atol=1e-8)


def test_logits_changed_in_place_after_the_loss():
    # Megatron's vocab_parallel_cross_entropy subtracts the max from the logits in place. The unchunked loss keeps
    # only its gradient, so it is unaffected; the chunked one recomputes from the logits, and autograd refuses.
    student, teacher, mask, weight = _inputs()
    _, ref_grad = _reference_loss_and_grad("forward_kl", student, teacher, mask, weight)
    for chunk_size in (None, 4):
        leaf = student.clone().requires_grad_()
        logits = leaf * 1.0
        loss = VocabParallelKDLoss(temperature=T, chunk_size=chunk_size)(logits, teacher, mask)
        with torch.no_grad():
            logits.sub_(logits.amax(dim=-1, keepdim=True))
        if chunk_size is None:
            (loss * weight.float()).sum().backward()
            torch.testing.assert_close(leaf.grad.double(), ref_grad, rtol=1e-4, atol=1e-7)
        else:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                (loss * weight.float()).sum().backward()


def test_masked_tokens_change_nothing():
    student, teacher, mask, weight = _inputs()
    module = VocabParallelKDLoss("forward_kl", chunk_size=3)

    def mean_and_grad(s, t):
        s = s.detach().requires_grad_()
        loss = masked_mean(module(s, t, mask), mask)
        loss.backward()
        return loss.detach(), s.grad

    loss, grad = mean_and_grad(student, teacher)
    changed = mask == 0
    other_student, other_teacher = student.clone(), teacher.clone()
    other_student[changed] = 100 * torch.randn(int(changed.sum()), VOCAB)
    other_teacher[changed] = -100 * torch.randn(int(changed.sum()), VOCAB)
    other_loss, other_grad = mean_and_grad(other_student, other_teacher)
    assert torch.equal(loss, other_loss) and torch.equal(grad, other_grad)
    ref = reference("forward_kl", student, teacher, temperature=1.0)[mask == 1].mean()
    assert abs(loss.item() - ref.item()) < 1e-5
    assert masked_mean(torch.zeros(2, 5), torch.zeros(2, 5)).item() == 0.0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_logits_raise(kind, where, bad):
    student, teacher, _, _ = _inputs()
    (student if where == "student" else teacher)[1, 2, 7] = bad
    with pytest.raises(ValueError, match=f"{where}_logits contain NaN or inf"):
        VocabParallelKDLoss(kind, chunk_size=4, **_kwargs(kind))(student, teacher)


def test_bad_arguments_raise():
    student, teacher, _, _ = _inputs()
    with pytest.raises(ValueError, match="vocab size 64 != teacher_logits vocab size 48"):
        VocabParallelKDLoss()(student, teacher[..., :48])
    with pytest.raises(ValueError, match="loss_mask shape"):
        VocabParallelKDLoss()(student, teacher, torch.ones(5, 2))
    with pytest.raises(ValueError, match="forward_kl.*reverse_kl.*jsd.*topk_forward_kl"):
        VocabParallelKDLoss("kl")
    for temperature in (0.0, -1.0, math.nan, "2"):
        with pytest.raises(ValueError, match="temperature"):
            VocabParallelKDLoss(temperature=temperature)
    with pytest.raises(ValueError, match="top_k"):
        VocabParallelKDLoss("topk_forward_kl")
    with pytest.raises(ValueError, match="top_k"):
        VocabParallelKDLoss("forward_kl", top_k=4)
    with pytest.raises(ValueError, match="top_k 65 exceeds the vocabulary size 64"):
        VocabParallelKDLoss("topk_forward_kl", top_k=65)(student, teacher)


def _no_collective(*args, **kwargs):
    raise AssertionError("collective called in the loss backward")


def _tp2_and_dp2_worker(rank, world_size):
    from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed

    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    student, teacher, mask, weight = _inputs()
    teacher[..., 3] += 6.0  # the teacher's top-k spans both vocabulary shards
    teacher[..., 40] += 6.0
    shard = slice(rank * VOCAB // 2, (rank + 1) * VOCAB // 2)
    for kind in KINDS:
        ref_loss, ref_grad = _reference_loss_and_grad(kind, student, teacher, mask, weight, T**2)
        for chunk_size in (None, 3):
            module = VocabParallelKDLoss(kind, temperature=T, scale_by_temperature_squared=True,
                                         chunk_size=chunk_size, **_kwargs(kind))
            s = student[..., shard].requires_grad_()
            loss = module(s, teacher[..., shard], mask)
            with mock.patch.multiple("torch.distributed", all_reduce=_no_collective, all_gather=_no_collective):
                (loss * weight.to(loss.dtype)).sum().backward()  # the backward is local to the vocab shard
            loss, grad = loss.detach(), s.grad
            torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6, msg=f"{kind} {chunk_size}")
            torch.testing.assert_close(grad.double(), ref_grad[..., shard], rtol=1e-4, atol=1e-7,
                                       msg=f"{kind} {chunk_size}")

    # Data parallel (TP=1, DP=2): each rank holds different tokens; the mean runs over both ranks' valid tokens.
    init_distributed(ParallelConfig(tensor_model_parallel_size=1))
    per_token = torch.arange(10.0).view(2, 5).requires_grad_()
    masks = [mask, torch.tensor([[1.0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])]
    loss = masked_mean(per_token * (rank + 1), masks[rank])
    loss.backward()
    valid = sum(m.sum() for m in masks)
    expected = sum(((torch.arange(10.0).view(2, 5) * (r + 1)) * masks[r]).sum() for r in range(2)) / valid
    assert abs(loss.item() - expected.item()) < 1e-6
    torch.testing.assert_close(per_token.grad, masks[rank] * (rank + 1) / valid)
    assert masked_mean(per_token.detach(), masks[rank], data_parallel=False).item() == pytest.approx(
        (per_token.detach() * masks[rank]).sum().item() / max(masks[rank].sum().item(), 1))


def test_tp2_equals_full_vocab_and_dp2_mean():
    run_distributed(_tp2_and_dp2_worker, 2)
