"""Distillation under pipeline parallelism: PP=2 on 2 gloo ranks reproduces the PP=1 run (logits, fused output
layer, cached teacher)."""

import pytest
import torch

from nemo_minitron.distillation.forward_step import ForwardStep
from nemo_minitron.distillation.intermediate import IntermediateLoss
from nemo_minitron.distillation.losses import VocabParallelKDLoss
from nemo_minitron.distillation.teacher import CachedTeacher, Teacher, write_teacher_cache
from nemo_minitron.distillation.trainer import TrainConfig, train
from nemo_minitron.models.build import build_gpt_model
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed
from tests.test_trainer import _build_from_full, _global_name, _params, _sequences


def _global_params(model, pp_rank: int) -> dict:
    """This stage's parameters under their PP=1 names."""
    per_stage = len(model.decoder.layers)
    return {_global_name(name, pp_rank, per_stage): p for name, p in _params(model).items()}


def _variants(teacher, cache) -> dict:
    """The ForwardStep of each distillation variant: live teacher, fused output layer, cached teacher."""
    return {"live": ForwardStep(teacher, lm_loss_weight=0.5),
            "fused": ForwardStep(teacher, VocabParallelKDLoss(chunk_size=5), lm_loss_weight=0.5,
                                 fuse_output_layer=True),
            "cached": ForwardStep(CachedTeacher(cache))}


def _pp2_runs(rank, world_size, teacher_arch, student_arch, teacher_full, student_full, seqs, cfg, cache, out_dir):
    """KD from a live teacher (both models split over the 2 stages; logits, or fused with the output layer) and from
    the cached teacher, each from the same full initial student; then intermediate losses must be refused. Each
    rank saves its stage's results."""
    init_distributed(ParallelConfig(pipeline_model_parallel_size=2))
    teacher = Teacher(_build_from_full(teacher_arch, teacher_full, pp_rank=rank))
    results = {}
    for name, forward_step in _variants(teacher, cache).items():
        student = _build_from_full(student_arch, student_full, pp_rank=rank)
        student.config.deallocate_pipeline_outputs = True  # Megatron's memory saving: the sent outputs are freed
        history = train(student, seqs, cfg, forward_step, progress=False)
        results[name] = {"history": history, "params": _global_params(student, rank)}
    with pytest.raises(ValueError, match="pipeline_model_parallel_size=1"):
        train(student, seqs, cfg, ForwardStep(teacher, intermediate=IntermediateLoss([(0, 0)])), progress=False)
    torch.save(results, out_dir / f"rank{rank}.pt")


def test_pp2_distillation_equals_pp1(tiny_arch, single_process, tmp_path):
    teacher_arch = tiny_arch.replace(num_layers=4, tie_word_embeddings=False)
    student_arch = tiny_arch.replace(hidden_size=48, ffn_hidden_size=64, tie_word_embeddings=False)
    teacher_full, student_full = _params(build_gpt_model(teacher_arch)), _params(build_gpt_model(student_arch))
    seqs = _sequences(tiny_arch, 12)
    cfg = TrainConfig(steps=3, micro_batch_size=2, global_batch_size=6, lr=1e-2, min_lr=1e-3)
    teacher = Teacher(_build_from_full(teacher_arch, teacher_full))
    cache = write_teacher_cache(teacher, seqs, tmp_path / "teacher.safetensors", top_k=8)
    references = {}
    for name, forward_step in _variants(teacher, cache).items():
        student = _build_from_full(student_arch, student_full)
        references[name] = {"history": train(student, seqs, cfg, forward_step, progress=False),
                            "params": _params(student)}

    run_distributed(_pp2_runs, 2, teacher_arch, student_arch, teacher_full, student_full, seqs, cfg, cache, tmp_path)
    stages = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, reference in references.items():
        for stage in stages:  # every stage reports the last stage's losses
            assert [h.keys() for h in stage[name]["history"]] == [h.keys() for h in reference["history"]]
            for key in ("loss", "kd_loss", "lm_loss", "grad_norm"):
                expected = [h[key] for h in reference["history"] if key in h]
                assert [h[key] for h in stage[name]["history"] if key in h] == pytest.approx(expected, rel=1e-4)
        params = {**stages[0][name]["params"], **stages[1][name]["params"]}
        assert params.keys() == reference["params"].keys()
        for key, p in params.items():
            assert not torch.equal(p, student_full[key]), key  # every parameter trained, the first stage's too
            torch.testing.assert_close(p, reference["params"][key], atol=1e-5, rtol=0, msg=f"{name} {key}")
    assert "lm_loss" in references["live"]["history"][0] and "lm_loss" not in references["cached"]["history"][0]
    # Fusing the loss with the output layer changes nothing but memory: same losses and weights as from the logits.
    live, fused = references["live"], references["fused"]
    for key in ("loss", "kd_loss", "lm_loss", "grad_norm"):
        assert [h[key] for h in fused["history"]] == pytest.approx([h[key] for h in live["history"]], rel=1e-5)
    for key, p in fused["params"].items():
        torch.testing.assert_close(p, live["params"][key], atol=1e-5, rtol=0, msg=key)
