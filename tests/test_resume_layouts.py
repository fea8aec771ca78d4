"""Exact resume under every parallel layout and loss: a run interrupted after step 2 of 4 and resumed from its
step-2 checkpoint (fresh model and optimizer) ends with the loss history and the weights of the uninterrupted run,
bitwise; and a phase change (another global batch size on resume) continues the training stream where it stopped."""

import json
import math
import shutil

import torch
import torch.distributed as dist

from nemo_minitron.distillation.forward_step import ForwardStep
from nemo_minitron.distillation.intermediate import IntermediateLoss
from nemo_minitron.distillation.losses import VocabParallelKDLoss
from nemo_minitron.distillation.teacher import Teacher
from nemo_minitron.distillation.trainer import TrainConfig, train
from nemo_minitron.evaluation.loss import validation_loss
from nemo_minitron.data.order import stream_batch
from nemo_minitron.models.build import build_gpt_model
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed
from tests.test_trainer import _copy, _params, _sequences

# name: (parallel layout on 2 ranks, the trainer's settings, the distillation variant)
LAYOUTS = {
    "tp2_sp": (ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True), {}, "logits"),
    "tp2_intermediate": (ParallelConfig(tensor_model_parallel_size=2), {}, "intermediate"),
    "pp2": (ParallelConfig(pipeline_model_parallel_size=2), {}, "logits"),
    "dp2_distributed_optimizer": (ParallelConfig(), {"use_distributed_optimizer": True}, "logits"),
    "dp2_fused": (ParallelConfig(), {}, "fused"),
}


def _forward_step(variant: str, teacher: Teacher) -> ForwardStep:
    if variant == "fused":
        return ForwardStep(teacher, VocabParallelKDLoss(chunk_size=5), lm_loss_weight=0.5, fuse_output_layer=True)
    if variant == "intermediate":
        return ForwardStep(teacher, intermediate=IntermediateLoss([[0, 1]]))
    return ForwardStep(teacher, lm_loss_weight=0.5)


def _without_time(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


def _resume_runs(rank, world_size, arch, seqs, out_dir):
    for name, (parallel, settings, variant) in LAYOUTS.items():
        init_distributed(parallel, seed=7)
        teacher = Teacher(build_gpt_model(arch))  # of the student's shape: under PP it shares the student's stages
        init = {k: v.clone() for k, v in build_gpt_model(arch).state_dict().items() if torch.is_tensor(v)}
        cfg = TrainConfig(steps=4, micro_batch_size=1, global_batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1,
                          save_interval=2, seed=5, **settings)
        straight_dir, resumed_dir = out_dir / name / "straight", out_dir / name / "resumed"
        straight = _copy(arch, init)
        full = train(straight, seqs, cfg, _forward_step(variant, teacher), checkpoint_dir=straight_dir, arch=arch,
                     progress=False)
        if rank == 0:  # interrupted after step 2: only its checkpoint is there
            shutil.copytree(straight_dir / "iter_0000002", resumed_dir / "iter_0000002")
            (resumed_dir / "latest").write_text("iter_0000002\n")
        dist.barrier()
        resumed = _copy(arch, init)
        history = train(resumed, seqs, cfg, _forward_step(variant, teacher), checkpoint_dir=resumed_dir, arch=arch,
                        progress=False)
        assert _without_time(history) == _without_time(full), name
        assert all(math.isfinite(e["loss"]) for e in full) and full[-1]["loss"] != full[0]["loss"], name
        expected = _params(straight)
        for param, value in _params(resumed).items():
            assert torch.equal(value, expected[param]), f"{name}: {param}"
        if rank == 0:
            (out_dir / f"{name}.ok").write_text(json.dumps(len(full)))


def test_exact_resume_at_tp2_sp_pp2_dp2_fused_and_intermediate(tiny_arch, single_process, tmp_path):
    arch = tiny_arch.replace(tie_word_embeddings=False)
    run_distributed(_resume_runs, 2, arch, _sequences(arch, 12), tmp_path, timeout=600)
    assert sorted(p.stem for p in tmp_path.glob("*.ok")) == sorted(LAYOUTS)


def test_phase_change_of_global_batch_size_continues_the_stream(tiny_arch, single_process, tmp_path, capsys):
    """Phase 1 trains 2 steps of 4 sequences; resumed with global_batch_size=8 to step 4, phase 2 reads positions
    8-15 and 16-23 of the training stream: its first loss is the phase-1 model's loss on those 8 sequences, and a
    phase 2 interrupted and resumed again ends bitwise where the uninterrupted one does."""
    seqs = _sequences(tiny_arch, 20)
    init = build_gpt_model(tiny_arch).state_dict()
    phase1 = TrainConfig(steps=2, micro_batch_size=2, global_batch_size=4, lr=1e-2, min_lr=1e-2, save_interval=1)
    phase2 = TrainConfig(steps=4, micro_batch_size=2, global_batch_size=8, lr=1e-2, min_lr=1e-2, save_interval=1)
    model = _copy(tiny_arch, init)
    train(model, seqs, phase1, checkpoint_dir=tmp_path / "a", arch=tiny_arch, progress=False)
    expected_first = validation_loss(model, stream_batch(seqs, 8, 8, phase2.seed), micro_batch_size=2)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    history = train(_copy(tiny_arch, init), seqs, phase2, checkpoint_dir=tmp_path / "a", arch=tiny_arch,
                    progress=False)
    assert "[resume] global_batch_size: 4 in iter_0000002 -> 8 (a new phase: step 3 on reads the training stream " \
           "from its sequence 8" in capsys.readouterr().out
    assert [e["step"] for e in history] == [1, 2, 3, 4]
    assert abs(history[2]["loss"] - expected_first) < 1e-5
    state = json.loads((tmp_path / "a" / "iter_0000004" / "trainer_state.json").read_text())
    assert state["consumed_samples"] == 2 * 4 + 2 * 8 and state["global_batch_size"] == 8

    # phase 2 on a copy, stopped after its first step and resumed: the same end, bitwise
    train(_copy(tiny_arch, init), seqs, TrainConfig(**{**vars(phase2), "steps": 3}), checkpoint_dir=tmp_path / "b",
          arch=tiny_arch, progress=False)
    again = _copy(tiny_arch, init)
    history_b = train(again, seqs, phase2, checkpoint_dir=tmp_path / "b", arch=tiny_arch, progress=False)
    assert _without_time(history_b) == _without_time(history)
    final = _copy(tiny_arch, init)
    train(final, seqs, phase2, checkpoint_dir=tmp_path / "a", arch=tiny_arch, progress=False)  # resumes at step 4
    expected = _params(final)
    assert all(torch.equal(p, expected[name]) for name, p in _params(again).items())
