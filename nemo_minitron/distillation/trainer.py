"""Training loop for teacher correction (LM fine-tuning) and logit distillation, on Megatron-Core's own engine.

One step: the student (in Megatron-Core's DistributedDataParallel; a 16-bit student first in its Float16Module
mixed-precision wrapper, with float32 master weights in the optimizer) runs ``forward_backward_func`` (the
pipeline schedules) over the micro-batches of one global batch with a per-token loss; the schedule calls
``finalize_model_grads``, which sums the gradients over data-parallel ranks and divides them by the global token
count, so the update is that of the mean per-token loss of the global batch; then the Megatron optimizer (Adam
with gradient clipping) steps and OptimizerParamScheduler sets the next learning rate (linear warmup from 0, cosine
decay to min_lr).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_minitron.data.order import stream_batch
from nemo_minitron.distillation.forward_step import REPORTED_LOSSES, ForwardStep
from nemo_minitron.evaluation.loss import micro_batches, token_weighted_means, validation_loss
from nemo_minitron.runtime import lock
from nemo_minitron.runtime.distributed import is_rank0

LATEST = "latest"
PARTIAL = ".partial"  # suffix of a checkpoint (or latest) being written
TRAINER_STATE = "trainer_state.json"
# The distributed optimizer saves each rank's contiguous shard of its buffers: fully parallel, and a resumed run may
# change the data-parallel size (Megatron-LM's default format).
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainConfig:
    """Optimisation settings; one step consumes global_batch_size sequences."""

    steps: int
    micro_batch_size: int = 1
    global_batch_size: int = 1
    lr: float = 1e-4  # peak
    min_lr: float = 1e-5
    warmup_steps: int = 0  # Megatron's linear warmup: step k (1-based) runs at lr * (k - 1) / warmup_steps
    weight_decay: float = 0.0
    clip_grad: float = 1.0  # 0 disables clipping
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    log_interval: int = 1  # history entries (and progress-bar updates) every log_interval steps
    eval_interval: int = 0  # 0 = validate at the end only
    save_interval: int = 0  # 0 = save at the end only
    seed: int = 1234
    use_distributed_optimizer: bool = False  # shard float32 master weights and Adam states over data-parallel ranks
    skip_nonfinite_steps: int = 0  # steps with a non-finite loss skipped (no update) before one stops the run

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_interval", "save_interval", "skip_nonfinite_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"train.{name} must be an integer >= 0, got {getattr(self, name)!r}")
        if self.warmup_steps and self.warmup_steps >= self.steps:
            raise ValueError(f"train.warmup_steps ({self.warmup_steps}) must be below train.steps ({self.steps})")
        if not self.lr > 0:
            raise ValueError(f"train.lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"train.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        for name in ("weight_decay", "clip_grad"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if not self.adam_eps > 0:
            raise ValueError(f"train.adam_eps must be > 0, got {self.adam_eps}")
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                             f"train.micro_batch_size ({self.micro_batch_size})")

    def num_microbatches(self, data_parallel_size: int) -> int:
        """global_batch_size / (micro_batch_size * data_parallel_size), which must be a whole number."""
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ValueError(f"train.global_batch_size ({self.global_batch_size}) must be a multiple of "
                             f"train.micro_batch_size * data-parallel size = {self.micro_batch_size} * "
                             f"{data_parallel_size}")
        return self.global_batch_size // per_step


def _save(checkpoint_dir: Path, step: int, consumed: int, global_batch_size: int, model, arch, optimizer, scheduler,
          history: list[dict], inputs: dict) -> None:
    """checkpoint_dir/iter_{step:07d}/: model weights (save_checkpoint: dist_checkpointing + arch.json + manifest,
    loadable by load_checkpoint), optimizer/ (dist_checkpointing of optimizer.sharded_state_dict, + manifest),
    trainer_state.json (step, consumed_samples, global_batch_size, scheduler, history, inputs). Written as
    iter_{step:07d}.partial and renamed into place once complete; then checkpoint_dir/latest is replaced (os.replace)
    to name it, so a kill at any moment leaves latest naming a complete checkpoint."""
    from megatron.core import dist_checkpointing

    from nemo_minitron.models.checkpoint import save_checkpoint, tied_checkpoint_writers, write_manifest

    iter_dir = checkpoint_dir / f"iter_{step:07d}"
    partial = iter_dir.with_name(iter_dir.name + PARTIAL)
    if is_rank0() and partial.exists():
        shutil.rmtree(partial)
    dist.barrier()
    save_checkpoint(model, arch, partial)
    if is_rank0():
        (partial / "optimizer").mkdir()
    dist.barrier()
    with tied_checkpoint_writers():
        dist_checkpointing.save(optimizer.sharded_state_dict(model.sharded_state_dict(), metadata=OPTIMIZER_METADATA),
                                str(partial / "optimizer"))
    dist.barrier()
    if is_rank0():
        write_manifest(partial / "optimizer")
        state = {"step": step, "consumed_samples": consumed, "global_batch_size": global_batch_size,
                 "scheduler": scheduler.state_dict(), "history": history, "inputs": inputs}
        (partial / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        old = iter_dir.with_name(iter_dir.name + ".old")
        if iter_dir.exists():  # the same step saved again: the old copy stays until latest names the new one
            os.replace(iter_dir, old)
        os.replace(partial, iter_dir)
        _write_latest(checkpoint_dir, iter_dir.name)
        if old.exists():
            shutil.rmtree(old)
    dist.barrier()


def _write_latest(checkpoint_dir: Path, name: str) -> None:
    tmp = checkpoint_dir / (LATEST + PARTIAL)
    tmp.write_text(name + "\n")
    os.replace(tmp, checkpoint_dir / LATEST)


def _latest_dir(checkpoint_dir: Path) -> Path:
    """The checkpoint checkpoint_dir/latest names, checked complete (manifests) and safe to unpickle."""
    from nemo_minitron.models.checkpoint import check_metadata, verify_manifest

    name = (checkpoint_dir / LATEST).read_text().strip()
    if not name:
        raise ValueError(f"{checkpoint_dir / LATEST} is empty: write the name of a complete iter_* folder of "
                         f"{checkpoint_dir} into it, or delete it to start the stage afresh")
    iter_dir = checkpoint_dir / name
    if not iter_dir.is_dir() and iter_dir.with_name(name + ".old").is_dir():  # killed between the two renames
        iter_dir = iter_dir.with_name(name + ".old")
    if not iter_dir.is_dir():
        raise ValueError(f"{checkpoint_dir / LATEST} names {name}, which is not in {checkpoint_dir}")
    for part in (iter_dir, iter_dir / "optimizer"):
        verify_manifest(part)
        check_metadata(part)
    return iter_dir


# schedule settings a resumed run takes from its TrainConfig (logged when they differ from the checkpoint's)
_SCHEDULE = {"lr": "max_lr", "min_lr": "min_lr", "warmup_steps": "lr_warmup_steps", "steps": "lr_decay_steps"}


def _check_inputs(checkpoint_dir: Path, saved: dict | None, inputs: dict) -> None:
    """ValueError naming what changed unless the checkpoint was trained from ``inputs`` (a checkpoint written before
    inputs were recorded is resumed, with a warning)."""
    if saved is None:
        if is_rank0():
            print(f"[resume] {checkpoint_dir} does not record its inputs (an older run): resuming it unchecked",
                  flush=True)
        return
    changed = sorted(k for k in set(saved) | set(inputs) if saved.get(k) != inputs.get(k))
    if changed:
        raise ValueError(f"{checkpoint_dir} holds training state from other inputs ({', '.join(changed)} changed "
                         f"since it was written: e.g. re-scored, re-pruned or new data); resuming would train the old "
                         f"model: delete {checkpoint_dir} to start this stage afresh")


def _load(checkpoint_dir: Path, model, optimizer, scheduler, cfg: TrainConfig,
          inputs: dict) -> tuple[int, int, list]:
    """Load the checkpoint named by checkpoint_dir/latest into model, optimizer and scheduler in place (refused if
    it was trained from other ``inputs``; the schedule and global batch size of ``cfg`` apply, each change logged);
    returns (step, consumed_samples, history)."""
    from megatron.core import dist_checkpointing

    from megatron.core.optimizer import DistributedOptimizer

    iter_dir = _latest_dir(checkpoint_dir)
    state = json.loads((iter_dir / TRAINER_STATE).read_text())
    _check_inputs(checkpoint_dir, state.get("inputs"), inputs)
    for name, key in _SCHEDULE.items():
        if state["scheduler"].get(key) != getattr(cfg, name) and is_rank0():
            print(f"[resume] {name}: {state['scheduler'].get(key)} in {iter_dir.name} -> {getattr(cfg, name)} "
                  f"(the setting of this run applies)", flush=True)
    consumed = state.get("consumed_samples", state["step"] * cfg.global_batch_size)  # saved before phase changes
    if state.get("global_batch_size", cfg.global_batch_size) != cfg.global_batch_size and is_rank0():
        print(f"[resume] global_batch_size: {state['global_batch_size']} in {iter_dir.name} -> "
              f"{cfg.global_batch_size} (a new phase: step {state['step'] + 1} on reads the training stream from "
              f"its sequence {consumed}, where the last phase stopped)", flush=True)
    parts = getattr(optimizer, "chained_optimizers", [optimizer])
    for part in parts:
        if isinstance(part, DistributedOptimizer) and not part.optimizer.state:
            # Without Apex / Transformer Engine (torch's Adam) the distributed optimizer's state_dict needs Adam's
            # states to exist before they are loaded: one zero-gradient step creates them (Megatron's own remedy;
            # the weights it may touch are loaded below).
            part._init_optimizer_states_with_dummy_values()
    optimizer_sd = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True,
                                                metadata=OPTIMIZER_METADATA)
    with torch.no_grad():  # the distributed optimizer copies into float32 shards that may view the parameters
        optimizer.load_state_dict(dist_checkpointing.load(optimizer_sd, str(iter_dir / "optimizer")))
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(iter_dir)))
    scheduler.load_state_dict(state["scheduler"])
    for part in parts:
        if isinstance(part, DistributedOptimizer):
            for adam_state in part.optimizer.state.values():
                if "step" in adam_state:
                    # torch's Adam keeps a step count per parameter, which the distributed optimizer's checkpoint
                    # format does not restore (it loads one shared, wrong count): it is the number of applied
                    # updates, which the scheduler counts.
                    adam_state["step"] = torch.tensor(float(scheduler.num_steps))
    return state["step"], consumed, state["history"]


def _nonfinite(values: dict) -> bool:
    return any(value is not None and not math.isfinite(value) for value in values.values())


def _stop_if_nonfinite(values: dict, step: int, lr: float, checkpoint_dir: Path | None) -> None:
    """FloatingPointError naming the first non-finite value of ``values`` (losses, grad_norm) at ``step``: the run
    stops before anything of this step is saved, so checkpoint_dir/latest keeps the last good checkpoint."""
    bad = {name: value for name, value in values.items() if value is not None and not math.isfinite(value)}
    if not bad:
        return
    name, value = next(iter(bad.items()))
    kept = "nothing was saved"
    if checkpoint_dir is not None and (checkpoint_dir / LATEST).is_file():
        kept = f"{checkpoint_dir / LATEST} still names {(checkpoint_dir / LATEST).read_text().strip()}"
    raise FloatingPointError(f"training step {step}: {name.replace('_', ' ')} is {value} (lr {lr:.3g}); the run "
                             f"stopped before saving this step ({kept}): lower the learning rate, or check the data "
                             "and the model loaded for non-finite values")


def train(model, train_sequences: torch.Tensor, cfg: TrainConfig, forward_step: ForwardStep | None = None, *,
          validation: torch.Tensor | None = None, checkpoint_dir: str | Path | None = None, arch=None,
          resume: bool = True, progress: bool = True, inputs: dict | None = None) -> list[dict]:
    """Train ``model`` (this rank's Megatron-Core GPTModel) in place for cfg.steps steps; returns the history.

    forward_step: what one micro-batch computes (distillation/forward_step.py); the default ForwardStep() is LM
        fine-tuning (teacher correction). Tensor, sequence, data and pipeline parallelism; under pipeline
        parallelism a live teacher has the student's layout (this rank holds teacher stage i and student stage i)
        and the stages send [s, b, h_S + h_T] (both models' hidden states). Intermediate losses need
        pipeline_model_parallel_size=1; their projections (when the hidden sizes differ) are attached to ``model``
        while it trains, saved in its resume checkpoints, and removed at the end, so the caller saves a plain
        student.
    train_sequences: packed token sequences [n, s + 1], the same on every rank; step k takes sequences
        [k * G, (k + 1) * G) of seeded epoch shuffles (``global_batch``), data-parallel rank r its r-th slice; a run
        resumed with another global batch size G' (a new phase) reads the next G' positions after those consumed.
    validation: sequences [m, s + 1] (the same on every rank): validation loss every cfg.eval_interval steps and
        at the end.
    checkpoint_dir: save every cfg.save_interval steps and at the end (needs ``arch``, the student's ModelArch);
        with resume, continue from checkpoint_dir/latest when it exists. ``inputs`` (e.g. content hashes of the
        teacher, the initial student and the data) are saved with it; resuming from other inputs is refused, while
        the schedule (lr, min_lr, warmup_steps, steps) of ``cfg`` applies to a resumed run.
    History: one dict per logged step: step, lr, loss (the minimised objective), kd_loss / lm_loss / inter_loss
    (unweighted components; inter_loss is the mean over the pairs), grad_norm, seconds, val_loss at evaluation
    steps, and skipped=True on a step whose update fp16 loss scaling skipped (inf / NaN gradients).
    A non-finite loss (checked before the update) or gradient norm stops the run with FloatingPointError before
    anything of that step is saved, so checkpoint_dir/latest keeps the last good checkpoint; with
    cfg.skip_nonfinite_steps = N the first N steps of non-finite loss are skipped instead (no update; logged, and
    kept in the history with nonfinite_skipped=True).
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.transformer.module import Float16Module

    from nemo_minitron.runtime.cpu_shims import cuda_type_names

    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    num_microbatches = cfg.num_microbatches(dp_size)
    if train_sequences.ndim != 2 or train_sequences.shape[1] < 2:
        raise ValueError(f"train_sequences must be [n, s + 1] with s >= 1, got shape {tuple(train_sequences.shape)}")
    if validation is not None and validation.shape[0] % (cfg.micro_batch_size * dp_size):
        raise ValueError(f"validation: {validation.shape[0]} sequences must be a multiple of micro_batch_size * "
                         f"data-parallel size = {cfg.micro_batch_size * dp_size}")
    if checkpoint_dir is not None and arch is None:
        raise ValueError("train: checkpoint_dir needs arch (the student's ModelArch, saved with its weights)")
    forward_step = ForwardStep() if forward_step is None else forward_step
    forward_step.check_layout(parallel_state.get_pipeline_model_parallel_world_size())
    teacher, intermediate = forward_step.teacher, forward_step.intermediate
    seq_length = train_sequences.shape[1] - 1

    config = model.config
    saved_config = {name: getattr(config, name) for name in
                    ("calculate_per_token_loss", "finalize_model_grads_func", "grad_scale_func", "no_sync_func")}
    bar = None
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    if checkpoint_dir is not None:
        lock.acquire(checkpoint_dir)
        if is_rank0():  # what a killed save left behind; latest never names it
            for leftover in checkpoint_dir.glob(f"*{PARTIAL}"):
                shutil.rmtree(leftover) if leftover.is_dir() else leftover.unlink()
    try:
        config.calculate_per_token_loss = True  # loss_func returns (sum, tokens); finalize_model_grads divides
        if intermediate is not None:  # before DDP, so DDP and the optimizer include the projections
            intermediate.attach(model, teacher.model, seed=cfg.seed)
        ddp_model = DistributedDataParallel(
            config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                  use_distributed_optimizer=cfg.use_distributed_optimizer),
            Float16Module(config, model) if config.bf16 or config.fp16 else model)
        with cuda_type_names():
            optimizer = get_megatron_optimizer(OptimizerConfig(
                optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
                clip_grad=cfg.clip_grad, adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
                bf16=config.bf16, fp16=config.fp16, params_dtype=config.params_dtype,
                use_distributed_optimizer=cfg.use_distributed_optimizer), [ddp_model])
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=cfg.warmup_steps,
            lr_decay_steps=cfg.steps, lr_decay_style="cosine", start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
            wd_incr_steps=cfg.steps, wd_incr_style="constant", override_opt_param_scheduler=True,
            use_checkpoint_opt_param_scheduler=False)
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        config.no_sync_func = ddp_model.no_sync

        step, consumed, history = 0, 0, []
        if checkpoint_dir is not None and resume and (checkpoint_dir / LATEST).is_file():
            step, consumed, history = _load(checkpoint_dir, model, optimizer, scheduler, cfg, inputs or {})
        skipped = sum(bool(entry.get("nonfinite_skipped")) for entry in history)
        local_validation = None
        if validation is not None:
            per_rank = validation.shape[0] // dp_size
            local_validation = validation[dp_rank * per_rank:(dp_rank + 1) * per_rank]

        if progress and is_rank0():
            from tqdm.auto import tqdm

            bar = tqdm(total=cfg.steps, initial=step, desc="distill" if teacher is not None else "train", unit="step")
        per_rank = cfg.global_batch_size // dp_size
        model.train()
        while step < cfg.steps:
            start = time.perf_counter()
            lr = optimizer.param_groups[0]["lr"]
            batch = stream_batch(train_sequences, consumed, cfg.global_batch_size, cfg.seed)
            consumed += cfg.global_batch_size
            local = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
            ddp_model.zero_grad_buffer()
            optimizer.zero_grad()
            with forward_step.pipeline(model) as adjust_tensor_shapes:
                outputs = get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=micro_batches(local, cfg.micro_batch_size),
                    model=[ddp_model], num_microbatches=num_microbatches, seq_length=seq_length,
                    micro_batch_size=cfg.micro_batch_size, forward_only=False,
                    adjust_tensor_shapes_fn=adjust_tensor_shapes)
            losses = token_weighted_means(outputs, REPORTED_LOSSES)
            skip = _nonfinite(losses) and skipped < cfg.skip_nonfinite_steps
            if skip:  # no update; the schedule moves on, and the step's batch is not retried
                skipped += 1
                update_successful, grad_norm = False, None
                scheduler.step(increment=1)
                if is_rank0():
                    (bar.write if bar is not None else print)(
                        f"[train] step {step + 1}: non-finite loss {losses} (lr {lr:.3g}): skipped without an "
                        f"update ({skipped} of skip_nonfinite_steps={cfg.skip_nonfinite_steps})")
            else:
                _stop_if_nonfinite(losses, step + 1, lr, checkpoint_dir)  # before the update: the weights stay good
                update_successful, grad_norm, _ = optimizer.step()
                if update_successful:  # fp16 loss scaling skips steps with inf / NaN gradients
                    scheduler.step(increment=1)
                    _stop_if_nonfinite({"grad_norm": grad_norm}, step + 1, lr, checkpoint_dir)
            step += 1
            loss = losses["lm_loss"] if teacher is None else losses.pop("objective")
            entry = {"step": step, "lr": lr, "loss": loss, **losses, "grad_norm": grad_norm,
                     "seconds": time.perf_counter() - start}
            if skip:
                entry["nonfinite_skipped"] = True
            elif not update_successful:
                entry["skipped"] = True
            last = step == cfg.steps
            if local_validation is not None and (last or (cfg.eval_interval and step % cfg.eval_interval == 0)):
                entry["val_loss"] = validation_loss(model, local_validation, cfg.micro_batch_size)
            if last or step % cfg.log_interval == 0 or "val_loss" in entry or skip:  # skips are always kept
                history.append(entry)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if bar is not None:
                bar.update(1)
            if checkpoint_dir is not None and (last or (cfg.save_interval and step % cfg.save_interval == 0)):
                _save(checkpoint_dir, step, consumed, cfg.global_batch_size, model, arch, optimizer, scheduler,
                      history, inputs or {})
    finally:
        if bar is not None:
            bar.close()
        if checkpoint_dir is not None:
            lock.release(checkpoint_dir)
        for name, value in saved_config.items():
            setattr(config, name, value)
        if intermediate is not None:
            intermediate.detach(model)
    return history

