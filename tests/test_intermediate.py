import json

import pytest
import torch

from nemo_minitron.config import DistillConfig, RecipeConfig, load_recipe
from nemo_minitron.distillation.forward_step import ForwardStep
from nemo_minitron.distillation.intermediate import IntermediateLoss
from nemo_minitron.distillation.teacher import CachedTeacher, Teacher, write_teacher_cache
from nemo_minitron.distillation.trainer import TrainConfig, train
from nemo_minitron.models.build import build_gpt_model, causal_inputs, forward_logits
from nemo_minitron.models.checkpoint import load_checkpoint, save_checkpoint
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed
from tests.test_trainer import _build_from_full, _params, _sequences


def _student_arch(teacher_arch):
    """One layer and half the teacher's hidden size: the intermediate loss needs a projection."""
    return teacher_arch.replace(num_layers=1, hidden_size=32, ffn_hidden_size=64)


def _layer_outputs(model, tokens):
    """Every decoder layer's output [s, b, h], running embedding and layers one by one (no hooks)."""
    position_ids, mask = causal_inputs(tokens)
    h = model.embedding(input_ids=tokens, position_ids=position_ids)
    rope = model.rotary_pos_emb(tokens.shape[1])
    outputs = []
    for layer in model.decoder.layers:
        h, _ = layer(hidden_states=h, attention_mask=mask, rotary_pos_emb=rope)
        outputs.append(h)
    return outputs


def _reference_loss(kind, h_s, h_t, projection):
    """Mean per-token loss of plain tensors [s, b, h]."""
    p = h_s @ projection.T
    if kind == "cosine":
        per_token = 1 - (p * h_t).sum(-1) / (p.norm(dim=-1) * h_t.norm(dim=-1))
    else:
        per_token = ((p - h_t) ** 2).sum(-1) / h_t.shape[-1]
    return per_token.mean()


def _kl(teacher, student, tokens):
    with torch.no_grad():
        log_p_t = forward_logits(teacher, tokens).log_softmax(-1)
        log_p_s = forward_logits(student, tokens).log_softmax(-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean().item()


@pytest.mark.parametrize("kind", ["cosine", "mse"])
def test_loss_and_gradients_equal_plain_pytorch(tiny_arch, single_process, kind):
    teacher, student = build_gpt_model(tiny_arch), build_gpt_model(_student_arch(tiny_arch))
    tokens = _sequences(tiny_arch, 3)[:, :-1]
    inter = IntermediateLoss([[0, 1]], kind=kind)
    inter.attach(student, teacher)
    with inter.capture(teacher, "teacher") as teacher_states, torch.no_grad():
        forward_logits(teacher, tokens)
    with inter.capture(student, "student") as student_states:
        forward_logits(student, tokens)
    per_token = inter.per_token(student, student_states, teacher_states)
    assert per_token.shape == (1, *tokens.shape)
    per_token.mean().backward()
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone()
             for name, p in student.named_parameters()}

    student.zero_grad(set_to_none=True)
    with torch.no_grad():
        h_t = _layer_outputs(teacher, tokens)[1]
    expected = _reference_loss(kind, _layer_outputs(student, tokens)[0], h_t, student.kd_projections[0].weight)
    expected.backward()
    torch.testing.assert_close(per_token.mean(), expected, atol=1e-6, rtol=1e-6)
    for name in ("kd_projections.0.weight", "decoder.layers.0.mlp.linear_fc2.weight"):
        assert grads[name].abs().max() > 0, name
    for name, p in student.named_parameters():  # output layer / final norm: no gradient from this loss
        torch.testing.assert_close(grads[name], p.grad if p.grad is not None else torch.zeros_like(p), atol=1e-6,
                                   rtol=1e-5, msg=name)


def test_training_learns_projection_and_saves_plain_student(tiny_arch, single_process, tmp_path):
    from megatron.core import dist_checkpointing

    teacher_model, student_arch = build_gpt_model(tiny_arch), _student_arch(tiny_arch)
    student = build_gpt_model(student_arch)
    seqs = _sequences(tiny_arch, 4)
    tokens = seqs[:, :-1]
    cfg = TrainConfig(steps=6, micro_batch_size=2, global_batch_size=4, lr=1e-2, min_lr=1e-3, seed=7)
    # The first step's objective: KL + inter, with the projection attach() initialises from cfg.seed.
    initial = build_gpt_model(student_arch)
    initial.load_state_dict(student.state_dict())
    IntermediateLoss([[0, 1]]).attach(initial, teacher_model, seed=cfg.seed)
    projection = initial.kd_projections[0].weight.detach().clone()
    with torch.no_grad():
        inter = _reference_loss("cosine", _layer_outputs(student, tokens)[0], _layer_outputs(teacher_model, tokens)[1],
                                projection).item()
    kl = _kl(teacher_model, student, tokens)
    teacher_before = _params(teacher_model)

    history = train(student, seqs, cfg, ForwardStep(Teacher(teacher_model), intermediate=IntermediateLoss([[0, 1]])),
                    checkpoint_dir=tmp_path / "state", arch=student_arch, progress=False)
    assert abs(history[0]["inter_loss"] - inter) < 1e-5 and abs(history[0]["kd_loss"] - kl) < 1e-5
    assert abs(history[0]["loss"] - (kl + inter)) < 1e-5
    assert history[-1]["inter_loss"] < 0.7 * history[0]["inter_loss"]
    assert all(torch.equal(p, teacher_before[k]) for k, p in _params(teacher_model).items())
    assert not hasattr(student, "kd_projections")

    # The resume checkpoint holds the trained projection (changed from its initial value) with the student.
    state_dir = tmp_path / "state" / "iter_0000006"
    initial.load_state_dict(dist_checkpointing.load(initial.sharded_state_dict(), str(state_dir)))
    assert (initial.kd_projections[0].weight - projection).abs().max() > 1e-3
    trained = _params(student)
    assert all(torch.equal(p, trained[k]) for k, p in _params(initial).items() if not k.startswith("kd_"))

    save_checkpoint(student, student_arch, tmp_path / "student")
    keys = dist_checkpointing.load_tensors_metadata(str(tmp_path / "student")).keys()
    assert not any(k.startswith("kd_projections") for k in keys)
    assert any(k.startswith("kd_projections") for k in dist_checkpointing.load_tensors_metadata(str(state_dir)))
    loaded, _ = load_checkpoint(tmp_path / "student")
    torch.testing.assert_close(forward_logits(loaded, tokens), forward_logits(student, tokens))


def test_balancer_matches_logit_loss(tiny_arch, single_process):
    kd = torch.rand(2, 5)
    inter = torch.rand(3, 2, 5, requires_grad=True)
    weights = IntermediateLoss([[0, 0]] * 3, balance=True).weights(kd, inter)
    assert not weights.requires_grad
    torch.testing.assert_close(weights * inter.detach().mean(dim=(1, 2)), kd.mean().expand(3) / 3)
    fixed = IntermediateLoss([[0, 0]] * 3, weight=0.3).weights(kd, inter)
    assert fixed.tolist() == pytest.approx([0.3] * 3)

    # In training: at every micro-batch the intermediate terms sum to the KD loss, so objective = 2 kd + 0.5 lm.
    teacher, student = Teacher(build_gpt_model(tiny_arch)), build_gpt_model(_student_arch(tiny_arch))
    cfg = TrainConfig(steps=1, micro_batch_size=2, global_batch_size=4)
    forward_step = ForwardStep(teacher, lm_loss_weight=0.5, intermediate=IntermediateLoss(
        [[0, 0], [0, 1]], kind="mse", weight=100.0, balance=True))
    history = train(student, _sequences(tiny_arch, 4), cfg, forward_step, progress=False)
    h = history[0]
    assert h["inter_loss"] > 0 and abs(h["loss"] - (2 * h["kd_loss"] + 0.5 * h["lm_loss"])) < 1e-5


def _tp2_run(rank, world_size, teacher_arch, student_arch, teacher_full, student_full, seqs, cfg, out_dir):
    init_distributed(ParallelConfig(tensor_model_parallel_size=2))
    teacher = Teacher(_build_from_full(teacher_arch, teacher_full, rank, 2))
    student = _build_from_full(student_arch, student_full, rank, 2)
    history = train(student, seqs, cfg, ForwardStep(teacher, intermediate=IntermediateLoss([[0, 1]], kind="mse")),
                    progress=False)
    if rank == 0:
        (out_dir / "tp2.json").write_text(json.dumps(history))


def test_tp2_equals_tp1(tiny_arch, single_process, tmp_path):
    teacher_arch = tiny_arch.replace(tie_word_embeddings=False)
    student_arch = _student_arch(teacher_arch)
    teacher_full, student_full = _params(build_gpt_model(teacher_arch)), _params(build_gpt_model(student_arch))
    seqs = _sequences(teacher_arch, 4)
    cfg = TrainConfig(steps=2, micro_batch_size=2, global_batch_size=4, lr=1e-2, min_lr=1e-3)
    reference = train(_build_from_full(student_arch, student_full), seqs, cfg,
                      ForwardStep(Teacher(_build_from_full(teacher_arch, teacher_full)),
                                  intermediate=IntermediateLoss([[0, 1]], kind="mse")), progress=False)
    run_distributed(_tp2_run, 2, teacher_arch, student_arch, teacher_full, student_full, seqs, cfg, tmp_path)
    history = json.loads((tmp_path / "tp2.json").read_text())
    for key in ("loss", "inter_loss", "kd_loss", "grad_norm"):  # step 2's losses follow step 1's update
        assert [h[key] for h in history] == pytest.approx([h[key] for h in reference], abs=1e-5), key


def test_bad_values_raise(tiny_arch, single_process, tmp_path):
    for field, value in (("intermediate_loss", "l1"), ("intermediate_pairs", [[0]]),
                         ("intermediate_pairs", [[0, -1]]), ("intermediate_weight", -1.0)):
        with pytest.raises(ValueError, match=f"distill.{field}"):
            RecipeConfig(distill=DistillConfig(**{field: value})).validate()
    with pytest.raises(ValueError, match="distill.balance_losses"):
        RecipeConfig(distill=DistillConfig(balance_losses=True)).validate()
    recipe = load_recipe(overrides=["distill.intermediate_pairs=[[0,1],[1,3]]", "distill.intermediate_loss=mse"])
    assert recipe.distill.intermediate_pairs == [[0, 1], [1, 3]]

    with pytest.raises(ValueError, match="distill.intermediate_loss"):
        IntermediateLoss([[0, 1]], kind="kl")
    with pytest.raises(ValueError, match="distill.intermediate_pairs"):
        IntermediateLoss([])
    teacher, student = build_gpt_model(tiny_arch), build_gpt_model(_student_arch(tiny_arch))
    with pytest.raises(ValueError, match="distill.intermediate_pairs: student layer index out of range"):
        IntermediateLoss([[1, 1]]).attach(student, teacher)
    with pytest.raises(ValueError, match="distill.intermediate_pairs: teacher layer index out of range"):
        IntermediateLoss([[0, 2]]).attach(student, teacher)
    seqs = _sequences(tiny_arch, 2)
    cached = CachedTeacher(write_teacher_cache(Teacher(teacher), seqs, tmp_path / "c.safetensors", top_k=4))
    with pytest.raises(ValueError, match="intermediate losses need a live Teacher"):
        ForwardStep(cached, intermediate=IntermediateLoss([[0, 1]]))
