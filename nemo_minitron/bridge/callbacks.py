"""Megatron-Bridge callbacks: importance scores from Bridge's evaluation passes, and the run's loss history."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from nemo_minitron.distillation.intermediate import IntermediateLoss
from nemo_minitron.importance.compute import CalibrationHooks, add_loss_metrics, score_meta, validate_options
from nemo_minitron.models.arch import ModelArch
from nemo_minitron.models.build import unwrap
from nemo_minitron.models.checkpoint import save_checkpoint
from nemo_minitron.pruning.apply import CONFIG_FIELDS
from nemo_minitron.runtime.absent_imports import absent_imports
from nemo_minitron.runtime.distributed import is_rank0

with absent_imports():
    from megatron.bridge.training.callbacks import Callback


class ImportanceCallback(Callback):
    """Importance scores of the model Bridge evaluates: the width statistics and Block Influence of ``importance/``
    are collected during Bridge's evaluation passes over its validation data (the calibration set), the
    loss-based depth metrics (lm_loss_drop, block_sizes) are computed afterwards on ``validation`` sequences (a
    run's selection split, held out from the validation split that evaluation reports), and
    the scores are written to ``out_dir`` in the format `minitron prune` reads (ImportanceScores.save). Equal to
    compute_importance on the same weights and tokens.

    Run it with ``skip_train=True`` and ``eval_iters`` covering the calibration sequences (``validation.*`` from
    Bridge 0.4 on, ``train.*`` before).
    """

    def __init__(self, arch: ModelArch, out_dir: str | Path, *, seq_agg: str = "mean", batch_agg: str = "l2",
                 depth_metrics=("block_influence",), block_sizes=(), screen_tokens=None, screen_keep: int = 3,
                 validation=None, micro_batch_size: int = 4):
        self.arch, self.out_dir = arch, Path(out_dir)
        self.seq_agg, self.batch_agg = seq_agg, batch_agg
        self.depth_metrics, self.block_sizes = tuple(depth_metrics), tuple(block_sizes)
        self.screen_tokens, self.screen_keep = screen_tokens, screen_keep
        self.validation, self.micro_batch_size = validation, micro_batch_size
        self.hooks, self.scores = None, None

    def on_eval_start(self, context) -> None:
        (chunk,) = context.model
        validate_options(chunk, self.arch, self.micro_batch_size, self.seq_agg, self.batch_agg, self.depth_metrics,
                         self.block_sizes, self.screen_tokens, self.screen_keep)
        self.hooks = CalibrationHooks(unwrap(chunk), self.seq_agg, self.depth_metrics).__enter__()

    def on_eval_end(self, context) -> None:
        (chunk,) = context.model
        with self.hooks:
            scores = self.hooks.scores(self.batch_agg)
        cfg = context.state.cfg
        scores.meta = score_meta(self.seq_agg, self.batch_agg, self.depth_metrics, self.block_sizes,
                                 cfg.train.micro_batch_size, _eval_iters(cfg) * cfg.train.global_batch_size,
                                 cfg.model.seq_length, float(context.total_loss_dict["lm loss"]))
        if self.validation is not None:
            add_loss_metrics(scores, unwrap(chunk), self.validation, self.depth_metrics, self.block_sizes,
                             self.micro_batch_size, self.screen_tokens, self.screen_keep)
        scores.check_finite("the model in training")
        if is_rank0():
            scores.save(self.out_dir)
        self.scores = scores


def _eval_iters(cfg) -> int:
    """Validation batches per evaluation: ``cfg.validation.eval_iters`` from Bridge 0.4 on (its ValidationConfig),
    ``cfg.train.eval_iters`` before."""
    validation = getattr(cfg, "validation", None)
    return (validation or cfg.train).eval_iters


class HistoryCallback(Callback):
    """The loss history of a Bridge run in the project trainer's format: one dict per step with step, lr (the
    rate the step used), loss (the minimised objective, or the LM loss without a teacher), kd_loss / lm_loss /
    inter_loss, grad_norm, seconds; val_loss after an evaluation. Kept on the ranks of the last pipeline stage
    (where Bridge reports the losses) and written to ``path`` (JSON) after every step by the first of them."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path is not None else None
        self.history: list[dict] = []
        self._lr, self._start = None, None

    def on_train_start(self, context) -> None:
        if self.path is not None and self.path.is_file():  # resumed: continue the saved history
            saved = json.loads(self.path.read_text())
            self.history = [entry for entry in saved if entry["step"] <= context.state.train_state.step]

    def on_train_step_start(self, context) -> None:
        self._lr, self._start = context.optimizer.param_groups[0]["lr"], time.perf_counter()

    def on_train_step_end(self, context) -> None:
        if not context.loss_dict:  # a pipeline stage before the last: Bridge reports no losses there
            return
        losses = {name.replace(" ", "_"): float(value) for name, value in context.loss_dict.items()}
        loss = losses.pop("objective", None)
        entry = {"step": context.state.train_state.step + 1, "lr": self._lr,  # Bridge counts after the callbacks
                 "loss": losses["lm_loss"] if loss is None else loss, **losses,
                 "grad_norm": None if context.grad_norm is None else float(context.grad_norm),
                 "seconds": time.perf_counter() - self._start}
        self.history.append(entry)
        self._write()

    def on_eval_end(self, context) -> None:
        if self.history and context.total_loss_dict and "lm loss" in context.total_loss_dict:
            self.history[-1]["val_loss"] = float(context.total_loss_dict["lm loss"])
            self._write()

    def _write(self) -> None:
        from megatron.core import parallel_state

        writer = (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
                  and parallel_state.get_data_parallel_rank() == 0)  # the first rank that holds the losses
        if self.path is not None and writer:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.history, indent=1))


class SaveCheckpoint(Callback):
    """At the end of training, save the trained model in the project's checkpoint format (dist_checkpointing +
    arch.json) to ``out_dir``, so `minitron eval` / `report` and the HF export read it. Its arch is ``arch`` with
    the sizes the model now has (a student pruned by a pre-wrap hook records them in its config); intermediate-loss
    projections, which belong to the run, not to the student, are removed first. export_hf: also a Hugging Face
    checkpoint in out_dir/hf (with the tokenizer saved at ``hf_tokenizer``, if any)."""

    def __init__(self, arch: ModelArch, out_dir: str | Path, hf_tokenizer: str | Path | None = None,
                 export_hf: bool = False):
        self.arch, self.out_dir, self.export_hf = arch, Path(out_dir), export_hf
        self.hf_tokenizer = Path(hf_tokenizer) if hf_tokenizer is not None else None

    def on_train_end(self, context) -> None:
        from nemo_minitron.models.hf_convert import save_hf_checkpoint

        (chunk,) = context.model
        model = unwrap(chunk)
        IntermediateLoss.detach(model)
        arch = self.arch.replace(**{name: getattr(model.config, name) for name in CONFIG_FIELDS})
        save_checkpoint(model, arch, self.out_dir)
        if self.export_hf:  # as `minitron distill` does: out_dir/hf, with the run's tokenizer when there is one
            tokenizer = None
            if self.hf_tokenizer is not None and self.hf_tokenizer.exists():
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(self.hf_tokenizer)
            save_hf_checkpoint(model, arch, self.out_dir / "hf", tokenizer=tokenizer)


class TeacherStages(Callback):
    """Pipeline parallelism with a live teacher in Bridge: from the start of training until this context manager
    closes (after ``pretrain`` returns, so also through the validation pass it runs after training), the teacher's
    stages run alongside the student's (ForwardStep.pipeline: the stages exchange [s, b, h_S + h_T]), and Bridge's
    training and evaluation schedules get the matching ``adjust_tensor_shapes_fn``. Bridge asks ModelOpt's
    distillation plugin for that function (``get_tensor_shapes_adjust_fn_for_distillation``) in training, and in
    evaluation from 0.4 on: that name is patched in each module that has it; 0.3's evaluation passes none, so its
    schedule is given ours."""

    def __init__(self, forward_step):
        self.forward_step, self.adjust, self._pipeline = forward_step, None, None
        self._patches = contextlib.ExitStack()

    def __enter__(self):
        import functools
        import importlib

        from nemo_minitron.runtime.bridge_shims import patched

        name = "get_tensor_shapes_adjust_fn_for_distillation"
        train = importlib.import_module("megatron.bridge.training.train")
        evaluate = importlib.import_module("megatron.bridge.training.eval")
        for module in (train, evaluate):
            if hasattr(module, name):
                self._patches.enter_context(patched(module, name, lambda *args, **kwargs: self.adjust))
        if not hasattr(evaluate, name):  # Bridge 0.3
            get_schedule = evaluate.get_forward_backward_func
            self._patches.enter_context(patched(evaluate, "get_forward_backward_func", lambda *args, **kwargs: (
                functools.partial(get_schedule(*args, **kwargs), adjust_tensor_shapes_fn=self.adjust))))
        return self

    def __exit__(self, *exc):
        if self._pipeline is not None:
            self._pipeline.__exit__(None, None, None)
            self._pipeline, self.adjust = None, None
        self._patches.close()

    def on_train_start(self, context) -> None:
        (chunk,) = context.model
        self._pipeline = self.forward_step.pipeline(unwrap(chunk))
        self.adjust = self._pipeline.__enter__()
