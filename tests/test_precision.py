"""Precision and memory settings of the trainer: 16-bit mixed precision with float32 master weights, the
distributed optimizer, activation recompute, and checkpoints loaded across dtypes."""

import pytest
import torch

from nemo_minitron.distillation.trainer import TrainConfig, train
from nemo_minitron.models.build import build_gpt_model
from nemo_minitron.models.checkpoint import load_checkpoint, save_checkpoint
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed
from tests.distributed import run_distributed


def _sequences(arch, n=8, s=16, seed=0):
    return torch.randint(0, arch.vocab_size, (n, s + 1), generator=torch.Generator().manual_seed(seed))


def _built(arch, state, **kwargs):
    model = build_gpt_model(arch, **kwargs)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name])
    return model


def test_bf16_training_keeps_float32_master_weights_and_follows_float32(tiny_arch, single_process):
    """A bf16 student (Float16Module + float32 master weights) starts from the float32 run's weights rounded to
    bf16; Adam's first step is lr * g / |g| per weight, so its float32 master weights move exactly like the
    float32 run's wherever the two agree on the gradient's sign (all but a few near-zero gradients), although the
    step (1e-4) is below bf16's resolution of most weights."""
    dtype = torch.bfloat16
    seqs = _sequences(tiny_arch)
    start = {k: v.to(dtype).float() for k, v in build_gpt_model(tiny_arch).state_dict().items()
             if not k.endswith("_extra_state")}
    lr = 1e-5
    cfg = TrainConfig(steps=1, micro_batch_size=2, global_batch_size=8, lr=lr, min_lr=lr, clip_grad=0.0)
    full = _built(tiny_arch, start)
    reference = train(full, seqs, cfg, progress=False)

    half = _built(tiny_arch, start, params_dtype=dtype)
    history = train(half, seqs, cfg, progress=False)
    assert history[0]["loss"] == pytest.approx(reference[0]["loss"], rel=2e-2)
    moved, full_moved, rounded = [], [], []
    full_params = dict(full.named_parameters())
    for name, p in half.named_parameters():
        master = p.main_param  # the optimizer's float32 copy of this 16-bit parameter
        assert p.dtype == dtype and master.dtype == torch.float32
        torch.testing.assert_close(p.detach(), master.detach().view_as(p).to(dtype), rtol=0, atol=0)
        moved.append(master.detach().flatten() - start[name].flatten())
        full_moved.append((full_params[name].detach() - start[name]).flatten())
        rounded.append((p.detach().float().flatten() - start[name].flatten()).abs() < lr / 2)
    moved, full_moved = torch.cat(moved), torch.cat(full_moved)
    agree = (moved - full_moved).abs() < lr * 1e-3
    assert agree.float().mean() > 0.97, f"only {agree.float().mean():.3f} of the master updates match float32"
    assert full_moved.abs().max() == pytest.approx(lr, rel=1e-2)
    assert torch.cat(rounded).float().mean() > 0.5  # most 1e-5 steps vanish in bf16: the master weights keep them


def test_fp16_loss_scaling_skips_overflowing_steps(tiny_arch, single_process):
    """fp16 runs with Megatron's dynamic loss scale (from 2^32): steps whose scaled gradients overflow leave the
    weights, master weights and learning-rate schedule untouched and are marked skipped; once the scale has
    backed off, updates go through and training lowers the loss."""
    model = build_gpt_model(tiny_arch, params_dtype=torch.float16)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    seqs = _sequences(tiny_arch)
    history = train(model, seqs, TrainConfig(steps=1, micro_batch_size=2, global_batch_size=8, lr=1e-2,
                                             min_lr=1e-2), progress=False)
    assert history[0]["skipped"] and all(torch.equal(p, before[k]) for k, p in model.named_parameters())
    assert all(torch.equal(p.main_param.view_as(p).half(), p) for p in model.parameters())
    history = train(model, seqs[:2], TrainConfig(steps=32, micro_batch_size=2, global_batch_size=2, lr=1e-2,
                                                 min_lr=1e-2), progress=False)
    applied = [h for h in history if not h.get("skipped")]
    assert applied and history[0].get("skipped") and not history[-1].get("skipped")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert applied[-1]["loss"] < applied[0]["loss"] - 0.5


def test_full_and_selective_recompute_give_the_same_step(tiny_arch, single_process):
    """Recompute trades compute for memory only: the step's loss, gradient norm and weights are those without it,
    and the recomputed modules really run twice per micro-batch (forward, then again in backward)."""
    seqs = _sequences(tiny_arch)
    start = {k: v.clone() for k, v in build_gpt_model(tiny_arch).state_dict().items()
             if not k.endswith("_extra_state")}
    cfg = TrainConfig(steps=2, micro_batch_size=2, global_batch_size=4, lr=1e-3, min_lr=1e-3)
    results = {}
    for granularity, module in ((None, "layer"), ("full", "layer"), ("selective", "core_attention")):
        model = _built(tiny_arch, start, recompute_granularity=granularity)
        layer = model.decoder.layers[0]
        calls = []
        (layer if module == "layer" else layer.self_attention.core_attention).register_forward_hook(
            lambda *args: calls.append(1))
        history = train(model, seqs, cfg, progress=False)
        results[granularity] = (history, {k: v.detach().clone() for k, v in model.named_parameters()}, len(calls))
    (history, weights, calls) = results[None]
    assert calls == 2 * 2  # 2 steps x 2 micro-batches
    for granularity in ("full", "selective"):
        other_history, other_weights, other_calls = results[granularity]
        assert other_calls == 2 * calls, granularity
        for got, want in zip(other_history, history):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-6)
            assert got["grad_norm"] == pytest.approx(want["grad_norm"], rel=1e-5)
        for name, value in other_weights.items():
            torch.testing.assert_close(value, weights[name], rtol=0, atol=1e-6, msg=f"{granularity} {name}")


def _distributed_optimizer_worker(rank, world_size, arch, state, seqs, expected, checkpoint_dir):
    from pathlib import Path

    import torch.distributed as dist
    from megatron.core.optimizer import get_megatron_optimizer

    init_distributed(ParallelConfig(use_distributed_optimizer=True), seed=1234)
    cfg = TrainConfig(steps=4, micro_batch_size=2, global_batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=1,
                      save_interval=2, use_distributed_optimizer=True)
    train(_built(arch, state), seqs, cfg, checkpoint_dir=checkpoint_dir, arch=arch, progress=False)
    dist.barrier()
    if rank == 0:  # interrupted after step 2: only the step-2 checkpoint counts
        (Path(checkpoint_dir) / "latest").write_text("iter_0000002\n")
    dist.barrier()
    optimizers = []

    def keep(*args, **kwargs):
        optimizers.append(get_megatron_optimizer(*args, **kwargs))
        return optimizers[-1]

    resumed = _built(arch, state)  # fresh weights and optimizer: everything comes from the checkpoint
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("megatron.core.optimizer.get_megatron_optimizer", keep)
        history = train(resumed, seqs, cfg, checkpoint_dir=checkpoint_dir, arch=arch, progress=False)
    expected_history, expected_weights = expected
    assert [h["step"] for h in history] == [1, 2, 3, 4]
    for got, want in zip(history, expected_history):
        assert got["loss"] == pytest.approx(want["loss"], rel=1e-5) and got["lr"] == pytest.approx(want["lr"])
    for name, value in resumed.named_parameters():
        torch.testing.assert_close(value.detach(), expected_weights[name], rtol=1e-5, atol=1e-6, msg=name)
    # each rank holds Adam states for its half of the parameters only
    chained = getattr(optimizers[0], "chained_optimizers", [optimizers[0]])
    state_elements = sum(s["exp_avg"].numel() for opt in chained for s in opt.optimizer.state.values())
    total = sum(p.numel() for p in resumed.parameters())
    assert state_elements <= total // 2 + 64, (state_elements, total)


def test_distributed_optimizer_dp2_equals_plain_adam_and_resumes(tiny_arch, single_process, tmp_path):
    """The distributed optimizer at DP=2 (master weights and Adam states sharded over the two ranks), stopped after
    2 of 4 steps and resumed from its checkpoint, ends with the single-process plain optimizer's weights."""
    seqs = _sequences(tiny_arch)
    model = build_gpt_model(tiny_arch)
    state = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    cfg = TrainConfig(steps=4, micro_batch_size=2, global_batch_size=8, lr=1e-2, min_lr=1e-3, warmup_steps=1)
    history = train(model, seqs, cfg, progress=False)
    expected = (history, {k: v.detach().clone() for k, v in model.named_parameters()})
    run_distributed(_distributed_optimizer_worker, 2, tiny_arch, state, seqs, expected, str(tmp_path / "ckpt"))


def test_checkpoints_load_into_another_params_dtype(tiny_arch, single_process, tmp_path):
    """A float32 checkpoint loads into a bf16 model (weights rounded) and back, so one prepared teacher serves
    fp32 and 16-bit stages."""
    model = build_gpt_model(tiny_arch)
    save_checkpoint(model, tiny_arch, tmp_path / "fp32")
    half, _ = load_checkpoint(tmp_path / "fp32", params_dtype=torch.bfloat16)
    expected = dict(model.named_parameters())
    for name, p in half.named_parameters():
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, expected[name].detach().to(torch.bfloat16), rtol=0, atol=0, msg=name)
    save_checkpoint(half, tiny_arch, tmp_path / "bf16")
    full, _ = load_checkpoint(tmp_path / "bf16")
    for name, p in full.named_parameters():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, expected[name].detach().to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)
