"""Training loop for teacher correction (LM fine-tuning) and logit distillation, on Megatron-Core's own engine.

One step: the student (wrapped in Megatron-Core's DistributedDataParallel) runs ``forward_backward_func`` (the
pipeline schedules) over the micro-batches of one global batch with a per-token loss; the schedule calls
``finalize_model_grads``, which sums the gradients over data-parallel ranks and divides them by the global token
count, so the update is that of the mean per-token loss of the global batch; then the Megatron optimizer (Adam
with gradient clipping) steps and OptimizerParamScheduler sets the next learning rate (linear warmup from 0, cosine
decay to min_lr).
"""

from __future__ import annotations

import json
import shutil
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_minitron.distillation.fused_output import FusedOutputKDLoss, final_hidden_states
from nemo_minitron.distillation.intermediate import IntermediateLoss
from nemo_minitron.distillation.losses import VocabParallelKDLoss
from nemo_minitron.distillation.teacher import CachedTeacher, CachedTopKKLLoss, Teacher
from nemo_minitron.evaluation.loss import lm_forward_step, micro_batches, token_weighted_means, validation_loss
from nemo_minitron.models.build import causal_inputs
from nemo_minitron.runtime.distributed import is_rank0

LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
REPORTED_LOSSES = ["kd loss", "lm loss", "inter loss", "objective"]  # [sum, count] reports of the loss_funcs


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

    def __post_init__(self):
        for name in ("steps", "micro_batch_size", "global_batch_size", "log_interval"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"train.{name} must be an integer >= 1, got {getattr(self, name)!r}")
        for name in ("warmup_steps", "eval_interval", "save_interval"):
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


def global_batch(sequences: torch.Tensor, step: int, global_batch_size: int, seed: int) -> torch.Tensor:
    """Rows of step ``step`` (0-based): positions [step * G, (step + 1) * G) of the concatenated epochs, epoch e
    being a permutation of the sequences drawn from seed + e."""
    n = sequences.shape[0]
    positions = torch.arange(step * global_batch_size, (step + 1) * global_batch_size)
    epochs = positions // n
    rows = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch))
        hit = epochs == epoch
        rows[hit] = order[positions[hit] % n]
    return sequences[rows]


def _kd_forward_step(teacher, kd_loss, lm_loss_weight: float, intermediate: IntermediateLoss | None = None,
                     fused: FusedOutputKDLoss | None = None):
    """Megatron forward_step_func for distillation: kd_loss(student, teacher) (+ the weighted intermediate
    hidden-state losses) (+ lm_loss_weight * LM cross-entropy), summed over the tokens, with the token count.

    With ``fused`` (a FusedOutputKDLoss carrying kd_loss and lm_loss_weight) the last stage stops both models at
    their final hidden states and the loss computes the logits chunk by chunk, never all at once.
    Under pipeline parallelism a non-last stage returns cat([student_hidden, teacher_hidden], -1) [s, b, h_S + h_T]
    for a live Teacher (its stage input was split by ``_teacher_pipeline``) and the student's hidden states for a
    CachedTeacher; only the last stage computes the loss."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        tokens, labels = batch["tokens"], batch["labels"]
        position_ids, mask = causal_inputs(tokens)
        if not parallel_state.is_pipeline_last_stage():
            hidden = model(tokens, position_ids, mask)
            if isinstance(teacher, Teacher):
                with torch.no_grad():
                    teacher_hidden = teacher.model(tokens, position_ids, mask)
                hidden = torch.cat([hidden, teacher_hidden], dim=-1)  # backward routes the student part only
            return hidden, None  # the schedule calls loss_func on the last stage only
        with intermediate.capture(teacher.model, "teacher") if intermediate else nullcontext() as teacher_states:
            if fused is None:
                targets = teacher.targets(tokens)
            else:
                with torch.no_grad():
                    targets = final_hidden_states(teacher.model, tokens, position_ids, mask)
        with intermediate.capture(model, "student") if intermediate else nullcontext() as student_states:
            if fused is None:
                output = model(tokens, position_ids, mask)  # logits [b, s, V/TP]
            else:
                student_final = final_hidden_states(model, tokens, position_ids, mask)
                output = student_final.hidden

        def loss_func(output: torch.Tensor):
            loss_mask = torch.ones_like(labels, dtype=torch.bool)
            count = torch.tensor(labels.numel(), device=output.device, dtype=torch.int)
            if fused is not None:
                out = fused(student_final._replace(hidden=output), targets, loss_mask,
                            labels if lm_loss_weight > 0 else None)
                total, kd_sum, lm_sum = out.loss, out.kd, out.lm
            else:
                kd_sum = total = kd_loss(output, targets, loss_mask).float().sum()
                lm_sum = None
                if lm_loss_weight > 0:
                    lm_sum = vocab_parallel_cross_entropy(output.float(), labels).sum()
                    total = total + lm_loss_weight * lm_sum
            report = {"kd loss": torch.stack([kd_sum.detach(), count.float()])}
            if lm_sum is not None:
                report["lm loss"] = torch.stack([lm_sum.detach(), count.float()])
            if intermediate is not None:
                inter = intermediate.per_token(model, student_states, teacher_states, loss_mask)
                report["inter loss"] = torch.stack([inter.sum().detach() / inter.shape[0], count.float()])
                total = total + (intermediate.weights(kd_sum, inter)[:, None, None] * inter).sum()
            report["objective"] = torch.stack([total.detach(), count.float()])
            return total, count, report

        return output, loss_func

    return forward_step


@contextmanager
def _teacher_pipeline(model, teacher: Teacher):
    """Run the teacher's pipeline stages alongside the student's: the stages exchange [s, b, h_S + h_T] tensors
    (the student's hidden states, then the teacher's; the sequence dim is whatever Megatron computed, s / TP under
    sequence parallelism). Inside, the schedule's ``set_input_tensor`` on ``model`` (the unwrapped student) gives
    the first h_S channels to the student and the rest to the teacher; yields the ``adjust_tensor_shapes_fn`` of
    forward_backward_pipelining_without_interleaving.

    The received tensor requires grad: the student's slice carries the gradient back to the previous stage, the
    teacher's (run under no_grad) gets zeros, which that stage's backward through torch.cat discards.
    """
    h_student = model.config.hidden_size
    h_total = h_student + teacher.model.config.hidden_size

    def set_input_tensor(input_tensor):
        hidden = input_tensor[0] if isinstance(input_tensor, list) else input_tensor
        student_part, teacher_part = (None, None) if hidden is None else (hidden[..., :h_student],
                                                                          hidden[..., h_student:])
        type(model).set_input_tensor(model, student_part)  # None on the first stage
        teacher.model.set_input_tensor(teacher_part)

    def adjust_tensor_shapes(recv_shapes, send_shapes):
        return ([(*shape[:-1], h_total) for shape in recv_shapes], [(*shape[:-1], h_total) for shape in send_shapes])

    model.set_input_tensor = set_input_tensor  # an instance attribute shadows GPTModel.set_input_tensor
    try:
        yield adjust_tensor_shapes
    finally:
        del model.set_input_tensor


def _save(checkpoint_dir: Path, step: int, model, arch, optimizer, scheduler, history: list[dict]) -> None:
    """checkpoint_dir/iter_{step:07d}/: model weights (save_checkpoint: dist_checkpointing + arch.json, loadable by
    load_checkpoint), optimizer/ (dist_checkpointing of optimizer.sharded_state_dict), trainer_state.json (step,
    consumed samples, scheduler, history); then checkpoint_dir/latest names it."""
    from megatron.core import dist_checkpointing

    from nemo_minitron.models.checkpoint import save_checkpoint

    iter_dir = checkpoint_dir / f"iter_{step:07d}"
    if is_rank0() and iter_dir.exists():
        shutil.rmtree(iter_dir)
    dist.barrier()
    save_checkpoint(model, arch, iter_dir)
    if is_rank0():
        (iter_dir / "optimizer").mkdir()
    dist.barrier()
    dist_checkpointing.save(optimizer.sharded_state_dict(model.sharded_state_dict()), str(iter_dir / "optimizer"))
    if is_rank0():
        state = {"step": step, "scheduler": scheduler.state_dict(), "history": history}
        (iter_dir / TRAINER_STATE).write_text(json.dumps(state, indent=1))
        (checkpoint_dir / LATEST).write_text(iter_dir.name + "\n")
    dist.barrier()


def _load(checkpoint_dir: Path, model, optimizer, scheduler) -> tuple[int, list[dict]]:
    """Load the checkpoint named by checkpoint_dir/latest into model, optimizer and scheduler in place; returns
    (step, history)."""
    from megatron.core import dist_checkpointing

    iter_dir = checkpoint_dir / (checkpoint_dir / LATEST).read_text().strip()
    model.load_state_dict(dist_checkpointing.load(model.sharded_state_dict(), str(iter_dir)))
    optimizer_sd = optimizer.sharded_state_dict(model.sharded_state_dict(), is_loading=True)
    optimizer.load_state_dict(dist_checkpointing.load(optimizer_sd, str(iter_dir / "optimizer")))
    state = json.loads((iter_dir / TRAINER_STATE).read_text())
    scheduler.load_state_dict(state["scheduler"])
    return state["step"], state["history"]


def train(model, train_sequences: torch.Tensor, cfg: TrainConfig, *, teacher=None, kd_loss=None,
          lm_loss_weight: float = 0.0, intermediate: IntermediateLoss | None = None,
          fuse_output_layer: bool = False, validation: torch.Tensor | None = None,
          checkpoint_dir: str | Path | None = None, arch=None, resume: bool = True,
          progress: bool = True) -> list[dict]:
    """Train ``model`` (this rank's Megatron-Core GPTModel) in place for cfg.steps steps; returns the history.

    teacher=None: LM fine-tuning (teacher correction), loss = mean next-token cross-entropy.
    teacher (Teacher or CachedTeacher): loss = mean kd_loss(student_logits, teacher.targets(tokens)) per token
        (+ lm_loss_weight * cross-entropy); kd_loss defaults to VocabParallelKDLoss() (forward KL) for a Teacher
        and CachedTopKKLLoss() for a CachedTeacher. Tensor, sequence, data and pipeline parallelism; under
        pipeline parallelism a live teacher has the student's layout (this rank holds teacher stage i and student
        stage i) and the stages send [s, b, h_S + h_T] (both models' hidden states); a CachedTeacher's targets are
        looked up on the last stage only.
    intermediate: hidden-state losses added per token (needs a live Teacher and pipeline_model_parallel_size=1);
        their projections (when the hidden sizes differ) are attached to ``model`` while it trains, saved in its
        resume checkpoints, and removed at the end, so the caller saves a plain student.
    train_sequences: packed token sequences [n, s + 1], the same on every rank; step k takes sequences
        [k * G, (k + 1) * G) of seeded epoch shuffles (``global_batch``), data-parallel rank r its r-th slice.
    fuse_output_layer: compute the logit loss from both models' final hidden states and output weights, chunk by
        chunk (FusedOutputKDLoss; kd_loss.chunk_size tokens at a time), so the full logits never exist; same
        loss and gradients.
    validation: sequences [m, s + 1] (the same on every rank): validation loss every cfg.eval_interval steps and
        at the end.
    checkpoint_dir: save every cfg.save_interval steps and at the end (needs ``arch``, the student's ModelArch);
        with resume, continue from checkpoint_dir/latest when it exists.
    History: one dict per logged step: step, lr, loss (the minimised objective), kd_loss / lm_loss / inter_loss
    (unweighted components; inter_loss is the mean over the pairs),
    grad_norm, seconds, and val_loss at evaluation steps.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
    from megatron.core.pipeline_parallel import get_forward_backward_func

    dp_size = parallel_state.get_data_parallel_world_size()
    dp_rank = parallel_state.get_data_parallel_rank()
    num_microbatches = cfg.num_microbatches(dp_size)
    pipeline_parallel = parallel_state.get_pipeline_model_parallel_world_size() > 1
    if train_sequences.ndim != 2 or train_sequences.shape[1] < 2:
        raise ValueError(f"train_sequences must be [n, s + 1] with s >= 1, got shape {tuple(train_sequences.shape)}")
    if validation is not None and validation.shape[0] % (cfg.micro_batch_size * dp_size):
        raise ValueError(f"validation: {validation.shape[0]} sequences must be a multiple of micro_batch_size * "
                         f"data-parallel size = {cfg.micro_batch_size * dp_size}")
    if checkpoint_dir is not None and arch is None:
        raise ValueError("train: checkpoint_dir needs arch (the student's ModelArch, saved with its weights)")
    if lm_loss_weight < 0:
        raise ValueError(f"train.lm_loss_weight must be >= 0, got {lm_loss_weight}")
    if teacher is None:
        if kd_loss is not None or intermediate is not None or fuse_output_layer:
            raise ValueError("train: kd_loss, intermediate and fuse_output_layer need a teacher")
        forward_step = lm_forward_step
    else:
        if kd_loss is None:
            kd_loss = CachedTopKKLLoss() if isinstance(teacher, CachedTeacher) else VocabParallelKDLoss()
        if intermediate is not None and not isinstance(teacher, Teacher):
            raise ValueError("train: intermediate losses need a live Teacher (a CachedTeacher has no hidden states)")
        if intermediate is not None and pipeline_parallel:
            raise ValueError("train: intermediate losses need pipeline_model_parallel_size=1, got "
                             f"{parallel_state.get_pipeline_model_parallel_world_size()}")
        fused = None
        if fuse_output_layer:
            if not isinstance(teacher, Teacher) or not isinstance(kd_loss, VocabParallelKDLoss):
                raise ValueError("train: fuse_output_layer needs a live Teacher and a VocabParallelKDLoss (it computes "
                                 "the logits of both models from their final hidden states)")
            fused = FusedOutputKDLoss(kd_loss, lm_loss_weight)
        forward_step = _kd_forward_step(teacher, kd_loss, lm_loss_weight, intermediate, fused)
    # A live teacher's stages run alongside the student's, their hidden states sent through the pipeline together.
    teacher_pipeline = pipeline_parallel and isinstance(teacher, Teacher)
    seq_length = train_sequences.shape[1] - 1

    config = model.config
    saved_config = {name: getattr(config, name) for name in
                    ("calculate_per_token_loss", "finalize_model_grads_func", "grad_scale_func", "no_sync_func")}
    bar = None
    try:
        config.calculate_per_token_loss = True  # loss_func returns (sum, tokens); finalize_model_grads divides
        if intermediate is not None:  # before DDP, so DDP and the optimizer include the projections
            intermediate.attach(model, teacher.model, seed=cfg.seed)
        ddp_model = DistributedDataParallel(
            config, DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                                  use_distributed_optimizer=False), model)
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay, clip_grad=cfg.clip_grad,
            adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps, bf16=config.bf16,
            fp16=config.fp16, params_dtype=config.params_dtype), [ddp_model])
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr, lr_warmup_steps=cfg.warmup_steps,
            lr_decay_steps=cfg.steps, lr_decay_style="cosine", start_wd=cfg.weight_decay, end_wd=cfg.weight_decay,
            wd_incr_steps=cfg.steps, wd_incr_style="constant")
        config.finalize_model_grads_func = finalize_model_grads
        config.grad_scale_func = optimizer.scale_loss
        config.no_sync_func = ddp_model.no_sync

        checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        step, history = 0, []
        if checkpoint_dir is not None and resume and (checkpoint_dir / LATEST).is_file():
            step, history = _load(checkpoint_dir, model, optimizer, scheduler)
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
            batch = global_batch(train_sequences, step, cfg.global_batch_size, cfg.seed)
            local = batch[dp_rank * per_rank:(dp_rank + 1) * per_rank]
            ddp_model.zero_grad_buffer()
            optimizer.zero_grad()
            with _teacher_pipeline(model, teacher) if teacher_pipeline else nullcontext() as adjust_tensor_shapes:
                outputs = get_forward_backward_func()(
                    forward_step_func=forward_step, data_iterator=micro_batches(local, cfg.micro_batch_size),
                    model=[ddp_model], num_microbatches=num_microbatches, seq_length=seq_length,
                    micro_batch_size=cfg.micro_batch_size, forward_only=False,
                    adjust_tensor_shapes_fn=adjust_tensor_shapes)
            update_successful, grad_norm, _ = optimizer.step()
            if update_successful:  # fp16 loss scaling skips steps with inf / NaN gradients
                scheduler.step(increment=1)
            step += 1
            losses = token_weighted_means(outputs, REPORTED_LOSSES)
            loss = losses["lm_loss"] if teacher is None else losses.pop("objective")
            entry = {"step": step, "lr": lr, "loss": loss, **losses, "grad_norm": grad_norm,
                     "seconds": time.perf_counter() - start}
            last = step == cfg.steps
            if local_validation is not None and (last or (cfg.eval_interval and step % cfg.eval_interval == 0)):
                entry["val_loss"] = validation_loss(model, local_validation, cfg.micro_batch_size)
            if last or step % cfg.log_interval == 0 or "val_loss" in entry:
                history.append(entry)
                if bar is not None:
                    bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
            if bar is not None:
                bar.update(1)
            if checkpoint_dir is not None and (last or (cfg.save_interval and step % cfg.save_interval == 0)):
                _save(checkpoint_dir, step, model, arch, optimizer, scheduler, history)
    finally:
        if bar is not None:
            bar.close()
        for name, value in saved_config.items():
            setattr(config, name, value)
        if intermediate is not None:
            intermediate.detach(model)
    return history

