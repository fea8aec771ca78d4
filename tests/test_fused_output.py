"""The KD loss fused with the output projection equals VocabParallelKDLoss + vocab_parallel_cross_entropy on the
materialised logits (plain autograd): loss, reports and gradients, at TP=1, TP=2 and TP=2 with sequence
parallelism; only chunk-sized tensors are created."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from nemo_minitron.distillation.fused_output import FinalHiddenStates, FusedOutputKDLoss, final_hidden_states
from nemo_minitron.distillation.losses import KINDS, VocabParallelKDLoss
from nemo_minitron.models.build import build_gpt_model, causal_inputs
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed
from tests.test_trainer import _build_from_full, _params, _sequences, _shard

T, TOP_K, LM_WEIGHT, GRAD_OUT = 2.0, 5, 0.3, 0.7


def _kd_loss(kind, scale=False):
    return VocabParallelKDLoss(kind, temperature=T, scale_by_temperature_squared=scale,
                               top_k=TOP_K if kind == "topk_forward_kl" else None)


def _unfused(kd_loss, logits, teacher_logits, loss_mask, labels):
    """(objective, kd sum, lm sum) of materialised logits [b, s, V/TP]."""
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    kd = (kd_loss(logits, teacher_logits, loss_mask) * loss_mask).sum()
    lm = (vocab_parallel_cross_entropy(logits.float(), labels) * loss_mask).sum()
    return kd + LM_WEIGHT * lm, kd.detach(), lm.detach()


def _logits(hidden, weight):
    return (hidden @ weight.t()).transpose(0, 1).contiguous()  # [s, b, h] -> [b, s, V], as GPTModel returns


@pytest.mark.parametrize("kind, scale", [(kind, kind == "jsd") for kind in KINDS])
def test_equals_materialised_logits(kind, scale, single_process):
    g = torch.Generator().manual_seed(0)
    s, b, h, h_teacher, vocab = 7, 2, 16, 24, 64
    hidden = torch.randn(s, b, h, generator=g)
    weight = torch.randn(vocab, h, generator=g) / 2
    teacher_hidden = torch.randn(s, b, h_teacher, generator=g)
    teacher_weight = torch.randn(vocab, h_teacher, generator=g) / 2
    loss_mask = torch.rand(b, s, generator=g) > 0.25
    labels = torch.randint(0, vocab, (b, s), generator=g)
    kd_loss = _kd_loss(kind, scale)

    ref_hidden, ref_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_loss, ref_kd, ref_lm = _unfused(kd_loss, _logits(ref_hidden, ref_weight),
                                        _logits(teacher_hidden, teacher_weight), loss_mask, labels)
    (GRAD_OUT * ref_loss).backward()
    assert ref_kd > 0.1 and ref_lm > 1 and (ref_hidden.grad.transpose(0, 1)[~loss_mask] == 0).all()

    for chunk_size in (None, 1, 5, s * b):  # 5 does not divide the 14 tokens
        student = FinalHiddenStates(hidden.clone().requires_grad_(), weight.clone().requires_grad_())
        out = FusedOutputKDLoss(kd_loss, LM_WEIGHT, chunk_size)(
            student, FinalHiddenStates(teacher_hidden, teacher_weight), loss_mask.float(), labels)
        (GRAD_OUT * out.loss).backward()
        assert out.count == loss_mask.sum() and not out.kd.requires_grad and not out.lm.requires_grad
        for value, expected in ((out.loss, ref_loss), (out.kd, ref_kd), (out.lm, ref_lm),
                                (student.hidden.grad, ref_hidden.grad), (student.output_weight.grad, ref_weight.grad)):
            torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=f"chunk_size={chunk_size}")


def test_bfloat16_and_no_grad(single_process):
    # matmuls in the weights' dtype (the logits equal the output layer's bf16 logits), loss math in float32
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(6, 2, 16, generator=g).bfloat16(), torch.randn(64, 16, generator=g).bfloat16()
    teacher = FinalHiddenStates(*(torch.randn(shape, generator=g).bfloat16() for shape in ((6, 2, 8), (64, 8))))
    labels, loss_mask = torch.randint(0, 64, (2, 6), generator=g), torch.ones(2, 6)
    fused = FusedOutputKDLoss(_kd_loss("jsd"), LM_WEIGHT, chunk_size=5)
    ref_hidden, ref_weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_loss = _unfused(fused.kd_loss, _logits(ref_hidden, ref_weight), _logits(*teacher[:2]), loss_mask, labels)[0]
    ref_loss.backward()
    student = FinalHiddenStates(hidden.clone().requires_grad_(), weight.clone().requires_grad_())
    out = fused(student, teacher, loss_mask, labels)
    out.loss.backward()
    assert out.loss.dtype == torch.float32
    assert student.hidden.grad.dtype == student.output_weight.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(student.hidden.grad, ref_hidden.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(student.output_weight.grad, ref_weight.grad, rtol=1e-2, atol=1e-2)
    with torch.no_grad():
        evaluated = fused(student, teacher, loss_mask, labels)
    assert not evaluated.loss.requires_grad and torch.equal(evaluated.loss, out.loss)


def test_bad_input(single_process):
    kd_loss = _kd_loss("forward_kl")
    fused = FusedOutputKDLoss(kd_loss)
    hidden, weight = torch.randn(4, 2, 8), torch.randn(16, 8)
    student, teacher = FinalHiddenStates(hidden, weight), FinalHiddenStates(torch.randn(4, 2, 6), torch.randn(16, 6))
    with pytest.raises(ValueError, match="forward_kl"):
        FusedOutputKDLoss(VocabParallelKDLoss("kl"))
    with pytest.raises(ValueError, match="kd_loss must be a VocabParallelKDLoss"):
        FusedOutputKDLoss(torch.nn.KLDivLoss())
    for kwargs, match in (({"lm_loss_weight": -1}, "lm_loss_weight"), ({"chunk_size": 0}, "chunk_size")):
        with pytest.raises(ValueError, match=match):
            FusedOutputKDLoss(kd_loss, **kwargs)
    with pytest.raises(ValueError, match="vocab shard size 16 != teacher vocab shard size 12"):
        fused(student, FinalHiddenStates(teacher.hidden, torch.randn(12, 6)))
    with pytest.raises(ValueError, match="teacher hidden size 6"):
        fused(student, FinalHiddenStates(teacher.hidden, torch.randn(16, 5)))
    with pytest.raises(ValueError, match=r"teacher hidden \[s, b\]"):
        fused(student, FinalHiddenStates(torch.randn(3, 2, 6), teacher.output_weight))
    with pytest.raises(ValueError, match="loss_mask shape"):
        fused(student, teacher, loss_mask=torch.ones(4, 2))
    with pytest.raises(ValueError, match="labels are required"):
        FusedOutputKDLoss(kd_loss, lm_loss_weight=1.0)(student, teacher)
    with pytest.raises(ValueError, match=r"labels must be token ids in \[0, 16\)"):
        fused(student, teacher, labels=torch.full((2, 4), 16))
    with pytest.raises(ValueError, match="top_k 5 exceeds the vocabulary size 4"):
        FusedOutputKDLoss(_kd_loss("topk_forward_kl"))(FinalHiddenStates(hidden, weight[:4]),
                                                       FinalHiddenStates(teacher.hidden, teacher.output_weight[:4]))
    bad = hidden.clone()
    bad[1, 1, 0] = float("nan")
    with pytest.raises(ValueError, match="student_logits contain NaN"):
        fused(FinalHiddenStates(bad, weight), teacher)
    with pytest.raises(ValueError, match="teacher_logits contain NaN"):
        fused(teacher, FinalHiddenStates(bad, weight))


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor (bytes) any operator returns."""

    largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for x in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(x, torch.Tensor):
                self.largest = max(self.largest, x.numel() * x.element_size())
        return out


def test_only_chunk_sized_tensors_are_created(single_process):
    # the float32 logits of 16 tokens (16 x 512 x 4 bytes) are the largest tensors, 1/16 of the full logits
    s, b, h, vocab, chunk_size = 128, 2, 8, 512, 16
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(vocab, h, generator=g).requires_grad_()
    student, teacher = FinalHiddenStates(torch.randn(s, b, h, generator=g).requires_grad_(), weight), \
        FinalHiddenStates(torch.randn(s, b, h, generator=g), torch.randn(vocab, h, generator=g))
    labels = torch.randint(0, vocab, (b, s), generator=g)
    for kind in KINDS:
        fused = FusedOutputKDLoss(_kd_loss(kind), LM_WEIGHT, chunk_size)
        with _LargestTensor() as fused_mode:
            fused(student, teacher, labels=labels).loss.backward()
        assert fused_mode.largest == chunk_size * vocab * 4, kind
    with _LargestTensor() as unfused_mode:  # the measurement sees the materialised logits
        _unfused(_kd_loss("forward_kl"), _logits(*student[:2]), _logits(*teacher[:2]), torch.ones(b, s),
                 labels)[0].backward()
    assert unfused_mode.largest >= s * b * vocab * 4 == 16 * fused_mode.largest


def _models(arch, teacher_full, student_full, rank=0, tp=1, sequence_parallel=False):
    """(teacher, student) of this TP rank from the full weights."""
    if not sequence_parallel:
        return _build_from_full(arch, teacher_full, rank, tp), _build_from_full(arch, student_full, rank, tp)
    models = []
    for full in (teacher_full, student_full):
        model = build_gpt_model(arch, sequence_parallel=True)
        model.load_state_dict(_build_from_full(arch, full, rank, tp).state_dict())
        models.append(model)
    return models


def _fused_run(kind, teacher, student, tokens, loss_mask, labels):
    """(loss, kd, lm) of the fused loss on the models; student gradients accumulate in .grad."""
    position_ids, mask = causal_inputs(tokens)
    with torch.no_grad():
        teacher_states = final_hidden_states(teacher, tokens, position_ids, mask)
    out = FusedOutputKDLoss(_kd_loss(kind), LM_WEIGHT, chunk_size=7)(
        final_hidden_states(student, tokens, position_ids, mask), teacher_states, loss_mask, labels)
    (GRAD_OUT * out.loss).backward()
    return torch.stack([out.loss.detach(), out.kd, out.lm])


def _grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def _references(arch, teacher_full, student_full, tokens, loss_mask, labels):
    """Per kind: (loss, kd, lm) and the student's gradients from the materialised logits (TP=1)."""
    references = {}
    for kind in KINDS:
        teacher, student = _models(arch, teacher_full, student_full)
        position_ids, mask = causal_inputs(tokens)
        with torch.no_grad():
            teacher_logits = teacher(tokens, position_ids, mask)
        loss, kd, lm = _unfused(_kd_loss(kind), student(tokens, position_ids, mask), teacher_logits, loss_mask, labels)
        (GRAD_OUT * loss).backward()
        references[kind] = torch.stack([loss.detach(), kd, lm]), _grads(student)
    return references


def _setup(arch):
    arch = arch.replace(tie_word_embeddings=False)
    teacher_full, student_full = _params(build_gpt_model(arch)), _params(build_gpt_model(arch))
    for full in (teacher_full, student_full):  # a non-trivial final norm: applying it twice changes the logits
        full["decoder.final_layernorm.weight"].uniform_(0.5, 1.5)
    tokens = _sequences(arch, 2)[:, :-1]
    generator = torch.Generator().manual_seed(1)
    loss_mask = torch.rand(tokens.shape, generator=generator) > 0.2
    labels = torch.randint(0, arch.vocab_size, tokens.shape, generator=generator)
    return arch, teacher_full, student_full, tokens, loss_mask, labels


def _check_final_hidden_states(model, tokens, sequence_parallel=False):
    from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

    position_ids, mask = causal_inputs(tokens)
    with torch.no_grad():
        states = final_hidden_states(model, tokens, position_ids, mask)
        hidden = gather_from_sequence_parallel_region(states.hidden) if sequence_parallel else states.hidden
        logits = model(tokens, position_ids, mask)
    assert states.sequence_parallel == sequence_parallel and model.post_process
    torch.testing.assert_close(_logits(hidden, states.output_weight), logits, rtol=1e-5, atol=1e-6)


def test_gpt_model_fused_loss_equals_unfused(tiny_arch, single_process):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    arch, teacher_full, student_full, tokens, loss_mask, labels = _setup(tiny_arch)
    for tied in (False, True):
        model = _build_from_full(arch.replace(tie_word_embeddings=tied), student_full)
        _check_final_hidden_states(model, tokens)
        weight = final_hidden_states(model, tokens, *causal_inputs(tokens)).output_weight
        assert weight is (model.embedding.word_embeddings.weight if tied else model.output_layer.weight)
    references = _references(arch, teacher_full, student_full, tokens, loss_mask, labels)
    for kind in KINDS:
        teacher, student = _models(arch, teacher_full, student_full)
        ddp = DistributedDataParallel(student.config, DistributedDataParallelConfig(), student)
        torch.testing.assert_close(_fused_run(kind, teacher, ddp, tokens, loss_mask, labels), references[kind][0])
        for name, p in student.named_parameters():
            torch.testing.assert_close(p.main_grad, references[kind][1][name], rtol=1e-5, atol=1e-6, msg=name)


def _tp2_run(rank, world_size, arch, teacher_full, student_full, tokens, loss_mask, labels, references):
    import torch.distributed as dist

    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    for sequence_parallel in (False, True):
        _check_final_hidden_states(_models(arch, teacher_full, student_full, rank, 2, sequence_parallel)[1], tokens,
                                   sequence_parallel)
        for kind in KINDS:
            teacher, student = _models(arch, teacher_full, student_full, rank, 2, sequence_parallel)
            values = _fused_run(kind, teacher, student, tokens, loss_mask, labels)
            torch.testing.assert_close(values, references[kind][0], msg=f"{kind} sp={sequence_parallel}")
            for name, p in student.named_parameters():
                if getattr(p, "sequence_parallel", False):  # norms: partial sums over the sequence shards
                    dist.all_reduce(p.grad)
                torch.testing.assert_close(p.grad, _shard(name, references[kind][1][name], rank, 2), rtol=1e-5,
                                           atol=1e-6, msg=f"{name} {kind} sp={sequence_parallel}")


def test_tp2_and_sequence_parallel_equal_tp1(tiny_arch, single_process):
    arch, teacher_full, student_full, tokens, loss_mask, labels = _setup(tiny_arch)
    references = _references(arch, teacher_full, student_full, tokens, loss_mask, labels)
    run_distributed(_tp2_run, 2, arch, teacher_full, student_full, tokens, loss_mask, labels, references)
