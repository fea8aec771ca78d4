import json
import math

import pytest
import torch
import torch.nn.functional as F

from nemo_minitron.distillation.forward_step import ForwardStep
from nemo_minitron.distillation.losses import VocabParallelKDLoss
from nemo_minitron.distillation.teacher import CachedTeacher, CachedTopKKLLoss, Teacher, write_teacher_cache
from nemo_minitron.data.order import global_batch
from nemo_minitron.distillation.trainer import TrainConfig, train
from nemo_minitron.models.build import build_gpt_model, forward_logits
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed


def _copy(arch, state):
    model = build_gpt_model(arch)
    model.load_state_dict(state, strict=False)
    return model


def _params(model):
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def _sequences(arch, n, s=16, seed=0):
    return torch.randint(0, arch.vocab_size, (n, s + 1), generator=torch.Generator().manual_seed(seed))


def test_config_validation():
    with pytest.raises(ValueError, match="global_batch_size"):
        TrainConfig(steps=1, micro_batch_size=3, global_batch_size=4)
    with pytest.raises(ValueError, match="min_lr"):
        TrainConfig(steps=1, lr=1e-4, min_lr=1e-3)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="data-parallel"):
        TrainConfig(steps=1, micro_batch_size=2, global_batch_size=2).num_microbatches(2)


def test_epoch_shuffle_covers_every_sequence_once_per_epoch():
    seqs = torch.arange(6).unsqueeze(1)
    epoch0 = torch.cat([global_batch(seqs, k, 2, seed=3) for k in range(3)]).flatten()
    assert sorted(epoch0.tolist()) == list(range(6)) and epoch0.tolist() != list(range(6))
    assert torch.equal(global_batch(seqs, 1, 4, seed=3)[:2].flatten(), epoch0[4:])  # crosses into epoch 1


def test_lm_step_equals_adamw_reference_and_training_lowers_loss(tiny_arch, single_process):
    model = build_gpt_model(tiny_arch)
    reference = _copy(tiny_arch, model.state_dict())
    seqs = _sequences(tiny_arch, 4)  # one global batch = all sequences, so the shuffle order does not matter
    cfg = TrainConfig(steps=1, micro_batch_size=2, global_batch_size=4, lr=1e-2, min_lr=1e-3, clip_grad=0.5,
                      adam_beta1=0.8, adam_beta2=0.9, adam_eps=1e-6)
    history = train(model, seqs, cfg, progress=False)

    logits = forward_logits(reference, seqs[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, tiny_arch.vocab_size), seqs[:, 1:].reshape(-1))
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    assert history[0]["lr"] == pytest.approx(1e-2)  # no warmup: the first step runs at the peak
    lr = history[0]["lr"]
    torch.optim.AdamW(reference.parameters(), lr=lr, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.0).step()
    assert abs(history[0]["loss"] - loss.item()) < 1e-5
    assert abs(history[0]["grad_norm"] - grad_norm.item()) < 1e-5 and grad_norm > 0.5  # clipping was active
    expected = _params(reference)
    for name, p in _params(model).items():
        torch.testing.assert_close(p, expected[name], atol=1e-5, rtol=0, msg=name)

    # Several steps on a small set lower the loss; the learning rate follows warmup + cosine.
    cfg = TrainConfig(steps=6, micro_batch_size=2, global_batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1)
    history = train(model, _sequences(tiny_arch, 8), cfg, progress=False)
    assert history[-1]["loss"] < history[0]["loss"] - 0.2
    cosine = [1e-3 + (1e-2 - 1e-3) * 0.5 * (1 + math.cos(math.pi * k / 5)) for k in range(1, 5)]
    assert [h["lr"] for h in history] == pytest.approx([0.0, 1e-2] + cosine)


def test_kd_loss_value_and_training(tiny_arch, single_process):
    teacher_model = build_gpt_model(tiny_arch)
    student = build_gpt_model(tiny_arch)
    seqs = _sequences(tiny_arch, 4)
    with torch.no_grad():
        log_p_t = forward_logits(teacher_model, seqs[:, :-1]).log_softmax(-1)
        log_p_s = forward_logits(student, seqs[:, :-1]).log_softmax(-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1).mean().item()
    ce = F.cross_entropy(log_p_s.reshape(-1, tiny_arch.vocab_size), seqs[:, 1:].reshape(-1)).item()

    teacher = Teacher(teacher_model)
    teacher_before = _params(teacher_model)
    cfg = TrainConfig(steps=1, micro_batch_size=2, global_batch_size=4, lr=1e-3, min_lr=1e-3)
    history = train(student, seqs, cfg, ForwardStep(teacher, lm_loss_weight=0.5), progress=False)
    assert abs(history[0]["kd_loss"] - kl) < 1e-5 and abs(history[0]["lm_loss"] - ce) < 1e-5
    assert abs(history[0]["loss"] - (kl + 0.5 * ce)) < 1e-5

    cfg = TrainConfig(steps=6, micro_batch_size=2, global_batch_size=4, lr=5e-3, min_lr=1e-3)
    history = train(student, seqs, cfg, ForwardStep(teacher), progress=False)
    assert "lm_loss" not in history[0] and history[0]["loss"] == history[0]["kd_loss"]
    assert history[-1]["kd_loss"] < 0.5 * history[0]["kd_loss"]
    after = _params(teacher_model)
    assert all(torch.equal(after[k], v) for k, v in teacher_before.items())  # the teacher never moves

    clone = _copy(tiny_arch, teacher_model.state_dict())
    history = train(clone, seqs, TrainConfig(steps=1, micro_batch_size=2, global_batch_size=4), ForwardStep(teacher),
                    progress=False)
    assert abs(history[0]["kd_loss"]) < 1e-6 and history[0]["grad_norm"] < 1e-5


def test_chunked_kd_loss_with_lm_loss_equals_unchunked(tiny_arch, single_process):
    """The LM term's cross-entropy must not touch the fp32 logits the chunked KD loss saved for backward."""
    teacher = Teacher(build_gpt_model(tiny_arch))
    chunked = build_gpt_model(tiny_arch)
    whole = _copy(tiny_arch, chunked.state_dict())
    seqs = _sequences(tiny_arch, 4)
    cfg = TrainConfig(steps=2, micro_batch_size=2, global_batch_size=4, lr=1e-3, min_lr=1e-3)
    history = train(chunked, seqs, cfg, ForwardStep(teacher, VocabParallelKDLoss(chunk_size=5), lm_loss_weight=0.5),
                    progress=False)
    expected = train(whole, seqs, cfg, ForwardStep(teacher, lm_loss_weight=0.5), progress=False)
    for got, want in zip(history, expected):
        for key in ("loss", "kd_loss", "lm_loss", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), key
    reference = _params(whole)
    for name, p in _params(chunked).items():
        # Adam turns float noise in near-zero gradients into ~1e-6 of an lr=1e-3 step
        torch.testing.assert_close(p, reference[name], rtol=0, atol=1e-5, msg=name)


def test_non_finite_loss_stops_before_the_update_and_keeps_the_last_good_checkpoint(tiny_arch, single_process,
                                                                                    tmp_path):
    model = build_gpt_model(tiny_arch)
    seqs = _sequences(tiny_arch, 8)
    cfg = TrainConfig(steps=4, micro_batch_size=2, global_batch_size=4, lr=1e-3, min_lr=1e-3, save_interval=2)
    train(model, seqs, TrainConfig(steps=2, micro_batch_size=2, global_batch_size=4, lr=1e-3, min_lr=1e-3),
          checkpoint_dir=tmp_path, arch=tiny_arch, progress=False)
    with torch.no_grad():
        model.decoder.layers[1].mlp.linear_fc2.weight[0, 0] = float("nan")  # e.g. a diverged or corrupt weight
    before = _params(model)
    with pytest.raises(FloatingPointError, match=r"training step 1: lm loss is nan .*latest still names "
                                                 r"iter_0000002"):
        train(model, seqs, cfg, checkpoint_dir=tmp_path, arch=tiny_arch, resume=False, progress=False)
    assert (tmp_path / "latest").read_text().strip() == "iter_0000002"
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002"]
    after = _params(model)  # no update was applied: the NaN did not spread into the other weights
    assert all(torch.equal(after[k], v) for k, v in before.items() if torch.isfinite(v).all())


class _PoisonedStep(ForwardStep):
    """LM fine-tuning whose loss is NaN on the given micro-batch calls (1-based)."""

    def __init__(self, bad_calls):
        super().__init__()
        self.calls, self.bad_calls = 0, set(bad_calls)

    def __call__(self, data_iterator, model):
        output, loss_func = super().__call__(data_iterator, model)
        self.calls += 1
        return (output * float("nan") if self.calls in self.bad_calls else output), loss_func


def test_skip_nonfinite_steps_skips_without_an_update_then_stops(tiny_arch, single_process):
    """skip_nonfinite_steps=1: the step whose loss is NaN changes no weight (equal to a run that stopped before
    it), is kept in the history as skipped, and the run goes on; a second bad step stops it."""
    seqs = _sequences(tiny_arch, 16)
    base = build_gpt_model(tiny_arch)

    def cfg(steps, skip=1):
        return TrainConfig(steps=steps, micro_batch_size=2, global_batch_size=4, lr=1e-3, min_lr=1e-3,
                           skip_nonfinite_steps=skip)

    skipping = _copy(tiny_arch, base.state_dict())
    history = train(skipping, seqs, cfg(2), _PoisonedStep({4}), progress=False)  # step 2's second micro-batch
    assert history[1]["nonfinite_skipped"] and math.isnan(history[1]["loss"]) and history[1]["grad_norm"] is None
    one_step = _copy(tiny_arch, base.state_dict())
    train(one_step, seqs, cfg(1, skip=0), progress=False)
    reference = _params(one_step)
    assert all(torch.equal(p, reference[name]) for name, p in _params(skipping).items())

    history = train(_copy(tiny_arch, base.state_dict()), seqs, cfg(4), _PoisonedStep({4}), progress=False)
    assert [bool(e.get("nonfinite_skipped")) for e in history] == [False, True, False, False]
    assert all(math.isfinite(e["loss"]) and e["grad_norm"] > 0 for e in history[2:])
    with pytest.raises(FloatingPointError, match="training step 3: lm loss is nan"):
        train(_copy(tiny_arch, base.state_dict()), seqs, cfg(4), _PoisonedStep({4, 5}), progress=False)


def test_cached_teacher_equals_live_top_k(tiny_arch, single_process, tmp_path):
    teacher = Teacher(build_gpt_model(tiny_arch))
    student = build_gpt_model(tiny_arch)
    seqs = _sequences(tiny_arch, 6)
    path = write_teacher_cache(teacher, seqs, tmp_path / "teacher.safetensors", top_k=8, micro_batch_size=4)
    cached = CachedTeacher(path)
    tokens = seqs[[4, 1, 3], :-1]  # another order and batch than the cache was written with
    with torch.no_grad():
        logits = forward_logits(student, tokens)
        expected = VocabParallelKDLoss("topk_forward_kl", temperature=2.0, top_k=8)(logits, teacher.logits(tokens))
        got = CachedTopKKLLoss(temperature=2.0)(logits, cached.targets(tokens))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    with pytest.raises(KeyError):
        cached.targets(_sequences(tiny_arch, 1, seed=9)[:, :-1])
    # repeated rows are stored once (equal tokens, equal targets)
    again = CachedTeacher(write_teacher_cache(teacher, seqs[[0, 2, 0, 5]], tmp_path / "dup.safetensors", top_k=8))
    assert again.log_probs.shape[0] == 3 and not list(tmp_path.glob("*.partial"))
    torch.testing.assert_close(again.targets(seqs[[0, 5], :-1]), cached.targets(seqs[[0, 5], :-1]))

    # Training on the cache: the first step's loss is the top-K KL of the initial student.
    with torch.no_grad():
        expected = CachedTopKKLLoss()(forward_logits(student, seqs[:, :-1]), cached.targets(seqs[:, :-1])).mean()
    history = train(student, seqs, TrainConfig(steps=1, micro_batch_size=3, global_batch_size=6), ForwardStep(cached),
                    progress=False)
    assert abs(history[0]["kd_loss"] - expected.item()) < 1e-5


def test_resume_gives_the_same_weights(tiny_arch, single_process, tmp_path):
    seqs = _sequences(tiny_arch, 6)
    teacher = Teacher(build_gpt_model(tiny_arch))
    init = build_gpt_model(tiny_arch).state_dict()
    cfg = TrainConfig(steps=4, micro_batch_size=2, global_batch_size=4, lr=1e-2, min_lr=1e-3, warmup_steps=1,
                      save_interval=2)
    straight = _copy(tiny_arch, init)
    full_history = train(straight, seqs, cfg, ForwardStep(teacher), checkpoint_dir=tmp_path, arch=tiny_arch,
                         progress=False)
    # Interrupted after step 2: only the step-2 checkpoint exists; a fresh model and optimizer resume from it.
    (tmp_path / "latest").write_text("iter_0000002\n")
    resumed = _copy(tiny_arch, init)
    history = train(resumed, seqs, cfg, ForwardStep(teacher), checkpoint_dir=tmp_path, arch=tiny_arch, progress=False)
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for a, b in zip(history, full_history):
        assert abs(a["loss"] - b["loss"]) < 1e-6 and a["lr"] == b["lr"]
    expected = _params(straight)
    for name, p in _params(resumed).items():
        torch.testing.assert_close(p, expected[name], atol=1e-6, rtol=0, msg=name)


def test_checkpoints_are_renamed_into_place_and_checked_before_loading(tiny_arch, single_process, tmp_path):
    """A save goes to iter_N.partial and is renamed; leftovers of a killed save are removed; an incomplete or
    empty checkpoint named by latest is refused with its path."""
    import json

    seqs = _sequences(tiny_arch, 4)
    cfg = TrainConfig(steps=2, micro_batch_size=2, global_batch_size=4, warmup_steps=0, save_interval=1)
    (tmp_path / "iter_0000009.partial").mkdir(parents=True)  # what a kill during a save leaves
    (tmp_path / "latest.partial").write_text("iter_0000009\n")
    train(build_gpt_model(tiny_arch), seqs, cfg, checkpoint_dir=tmp_path, arch=tiny_arch, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["iter_0000001", "iter_0000002", "latest"]
    for folder in (tmp_path / "iter_0000002", tmp_path / "iter_0000002" / "optimizer"):
        assert json.loads((folder / "manifest.json").read_text())["files"]
    shard = sorted((tmp_path / "iter_0000002" / "optimizer").glob("*.distcp"))[0]
    shard.write_bytes(b"")
    with pytest.raises(ValueError, match=f"optimizer is damaged: {shard.name} has 0 bytes"):
        train(build_gpt_model(tiny_arch), seqs, cfg, checkpoint_dir=tmp_path, arch=tiny_arch, progress=False)
    (tmp_path / "latest").write_text("")
    with pytest.raises(ValueError, match="latest is empty"):
        train(build_gpt_model(tiny_arch), seqs, cfg, checkpoint_dir=tmp_path, arch=tiny_arch, progress=False)
    assert not (tmp_path / "writer.lock").exists()  # released after a failure too


def test_one_writer_per_checkpoint_folder(tiny_arch, single_process, tmp_path, capsys):
    import json
    import socket
    import subprocess
    import sys

    seqs = _sequences(tiny_arch, 4)
    cfg = TrainConfig(steps=1, micro_batch_size=2, global_batch_size=4, warmup_steps=0)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "writer.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(ValueError, match=f"being written by another run \\(pid {holder.pid}\\)"):
            train(build_gpt_model(tiny_arch), seqs, cfg, checkpoint_dir=tmp_path, arch=tiny_arch, progress=False)
        assert not list(tmp_path.glob("iter_*"))
    finally:
        holder.kill()
        holder.wait()
    train(build_gpt_model(tiny_arch), seqs, cfg, checkpoint_dir=tmp_path, arch=tiny_arch, progress=False)
    assert f"its writer (pid {holder.pid}) is gone; taking the folder over" in capsys.readouterr().out
    assert (tmp_path / "latest").read_text().strip() == "iter_0000001" and not (tmp_path / "writer.lock").exists()
    (tmp_path / "writer.lock").write_text(json.dumps({"host": "elsewhere", "pid": 1}))
    with pytest.raises(ValueError, match="on host elsewhere"):
        train(build_gpt_model(tiny_arch), seqs, cfg, checkpoint_dir=tmp_path, arch=tiny_arch, progress=False)


def _shard(name: str, full: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """This TP rank's shard of a full (TP=1) parameter."""
    if name.endswith("linear_fc1.weight"):  # [gate; up]: each rank takes its rows of both
        return torch.cat([half.chunk(tp)[rank] for half in full.chunk(2)])
    if name.endswith(("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight")):
        return full.chunk(tp)[rank]  # vocab-parallel / column-parallel (QKV rows are grouped by query group)
    if name.endswith(("linear_proj.weight", "linear_fc2.weight")):
        return full.chunk(tp, dim=1)[rank]  # row-parallel
    return full  # norms: replicated


def _global_name(name: str, pp_rank: int, layers_per_stage: int) -> str:
    """A pipeline stage's parameter name under its PP=1 name (local layer i -> i + pp_rank * layers_per_stage)."""
    if not name.startswith("decoder.layers."):
        return name
    local = int(name.split(".")[2])
    return name.replace(f"layers.{local}.", f"layers.{local + pp_rank * layers_per_stage}.", 1)


def _build_from_full(arch, full: dict, tp_rank: int = 0, tp: int = 1, pp_rank: int = 0):
    """This rank's model with the full (TP=1, PP=1) weights: its TP shard of its pipeline stage's layers."""
    model = build_gpt_model(arch)
    layers_per_stage = len(model.decoder.layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            name = _global_name(name, pp_rank, layers_per_stage)
            shard = _shard(name, full[name], tp_rank, tp)
            assert shard.shape == p.shape, name
            p.copy_(shard)
    return model


def _parallel_runs(rank, world_size, arch, teacher_full, student_full, seqs, cfg, out_dir):
    """From the same full weights: the cached top-K KL and KD training under TP=2, KD under DP=2, LM training under
    PP=2. Rank 0 writes the results (every rank holds the reduced losses)."""
    layouts = {"tp2": ParallelConfig(tensor_model_parallel_size=2), "dp2": ParallelConfig(),
               "pp2_lm": ParallelConfig(pipeline_model_parallel_size=2)}
    for name, parallel in layouts.items():
        init_distributed(parallel)
        tp, pp = parallel.tensor_model_parallel_size, parallel.pipeline_model_parallel_size
        student = _build_from_full(arch, student_full, rank % tp, tp, rank if pp > 1 else 0)
        teacher = Teacher(_build_from_full(arch, teacher_full, rank % tp, tp, rank if pp > 1 else 0))
        if tp > 1:  # the teacher cache and its top-K loss, vocab-parallel
            path = write_teacher_cache(teacher, seqs, out_dir / "tp2.safetensors", top_k=8)
            with torch.no_grad():
                tokens = seqs[:, :-1]
                top_k_kl = CachedTopKKLLoss()(forward_logits(student, tokens), CachedTeacher(path).targets(tokens))
            (out_dir / "tp2_top_k_kl.json").write_text(json.dumps(top_k_kl.mean().item()))
        if pp > 1:  # LM training here; distillation under PP: tests/test_trainer_pp.py
            teacher = None
        history = train(student, seqs, cfg, ForwardStep(teacher), progress=False)
        if rank == 0:
            (out_dir / f"{name}.json").write_text(json.dumps(history))
            if name == "dp2":
                torch.save(_params(student), out_dir / "dp2.pt")


def test_tp2_dp2_pp2_equal_single_process(tiny_arch, single_process, tmp_path):
    arch = tiny_arch.replace(tie_word_embeddings=False)  # exercises the vocab-parallel output layer too
    teacher_full, student_full = _params(build_gpt_model(arch)), _params(build_gpt_model(arch))
    seqs = _sequences(arch, 8)
    cfg = TrainConfig(steps=3, micro_batch_size=2, global_batch_size=4, lr=1e-2, min_lr=1e-3)
    student = _build_from_full(arch, student_full)
    with torch.no_grad():
        teacher_logits = forward_logits(_build_from_full(arch, teacher_full), seqs[:, :-1])
        top_k_kl = VocabParallelKDLoss("topk_forward_kl", top_k=8)(forward_logits(student, seqs[:, :-1]),
                                                                   teacher_logits).mean().item()
    kd_reference = train(student, seqs, cfg, ForwardStep(Teacher(_build_from_full(arch, teacher_full))),
                         progress=False)
    lm_reference = train(_build_from_full(arch, student_full), seqs, cfg, progress=False)
    run_distributed(_parallel_runs, 2, arch, teacher_full, student_full, seqs, cfg, tmp_path)
    for name, reference in (("tp2", kd_reference), ("dp2", kd_reference), ("pp2_lm", lm_reference)):
        history = json.loads((tmp_path / f"{name}.json").read_text())
        assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in reference], abs=1e-5), name
        assert [h["grad_norm"] for h in history] == pytest.approx([h["grad_norm"] for h in reference], abs=1e-5)
    assert abs(json.loads((tmp_path / "tp2_top_k_kl.json").read_text()) - top_k_kl) < 1e-5
    dp_weights, expected = torch.load(tmp_path / "dp2.pt"), _params(student)
    for name, p in dp_weights.items():
        torch.testing.assert_close(p, expected[name], atol=1e-5, rtol=0, msg=name)
