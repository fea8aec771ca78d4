"""Cost of running distillation inside Megatron-Bridge: the time of one KD training step under Bridge's pretrain()
divided by the time of the same step under the project's trainer, on the same shape (kd_step's proportioned one:
8 layers of hidden 512, vocabulary 8192, 4 x 128 tokens per step), the same ForwardStep, teacher and optimizer
settings. A step is timed from its start to its end in both loops (forward/backward over the micro-batches,
gradient finalisation, clipped Adam step, scheduler; Bridge adds its logging and bookkeeping).

The two loops run alternately (the machine may be shared), in alternating order (trainer first in even
repetitions, Bridge first in odd ones, so neither always runs on a warmer or cooler machine): each repetition trains
a fresh student for STEPS steps in each loop and takes the median of its last STEPS - WARMUP step times; the
recorded ratio is the median over REPEATS of the per-repetition ratio (Bridge / trainer), with the medians of each
order. Where Bridge's extra time goes: each step is split into forward-backward (Megatron's schedule, the same
function in both loops), the optimizer step, and the rest (the loop's own bookkeeping: logging, timers, loss
reduction, callbacks), timed by scoped wrappers around the first two; the medians per phase are recorded.

Run: .venv/bin/python benchmarks/bench_bridge_kd_step.py  (records bridge_kd_step_ratio in benchmarks/results.json)
"""

from __future__ import annotations

import contextlib
import importlib
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.bench_kd_step import BATCH, SEQ, SHAPES  # noqa: E402
from benchmarks.results import record  # noqa: E402
from nemo_minitron.config import TrainStageConfig  # noqa: E402
from nemo_minitron.distillation.forward_step import ForwardStep  # noqa: E402
from nemo_minitron.distillation.teacher import Teacher  # noqa: E402
from nemo_minitron.distillation.trainer import train  # noqa: E402
from nemo_minitron.models.build import build_gpt_model  # noqa: E402
from nemo_minitron.models.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from nemo_minitron.runtime.bridge_shims import patched  # noqa: E402
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed  # noqa: E402

ARCH = SHAPES["proportioned"]
STEPS, WARMUP, REPEATS = 6, 2, 7


def _timed(seconds: list, fn):
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    return wrapper


@contextlib.contextmanager
def phase_times(schedule_module: str):
    """While open, the seconds of each forward-backward (the schedule returned by ``schedule_module``'s
    get_forward_backward_func) and of each optimizer step are appended to the yielded dict's lists."""
    from megatron.core.optimizer.optimizer import ChainedOptimizer, FP32Optimizer

    phases = defaultdict(list)
    module = importlib.import_module(schedule_module)
    get_schedule = module.get_forward_backward_func
    with contextlib.ExitStack() as stack:
        stack.enter_context(patched(module, "get_forward_backward_func", lambda *args, **kwargs: _timed(
            phases["forward_backward"], get_schedule(*args, **kwargs))))
        for optimizer in (ChainedOptimizer, FP32Optimizer):  # float32 runs: one or the other steps
            stack.enter_context(patched(optimizer, "step", _timed(phases["optimizer_step"], optimizer.step)))
        yield phases


def _phases(step_seconds: list[float], phases: dict) -> dict:
    """Median seconds per phase over the timed steps (after WARMUP): forward_backward, optimizer_step, rest."""
    timed = {name: values[WARMUP:] for name, values in phases.items()}
    rest = [total - sum(values[i] for values in timed.values()) for i, total in enumerate(step_seconds[WARMUP:])]
    return {**{name: statistics.median(values) for name, values in timed.items()}, "rest": statistics.median(rest)}


def _trainer_steps(stage: TrainStageConfig, teacher_dir: str, sequences: torch.Tensor) -> tuple[list[float], dict]:
    init_distributed(ParallelConfig(), seed=0)
    teacher, _ = load_checkpoint(teacher_dir)
    with phase_times("megatron.core.pipeline_parallel") as phases:
        history = train(build_gpt_model(ARCH), sequences, stage.train_config(seed=0), ForwardStep(Teacher(teacher)),
                        progress=False)
    seconds = [entry["seconds"] for entry in history]
    return seconds, _phases(seconds, phases)


def _bridge_steps(stage: TrainStageConfig, teacher_dir: str, data: str) -> tuple[list[float], dict]:
    from nemo_minitron.bridge.callbacks import HistoryCallback
    from nemo_minitron.bridge.data import PackedSequences
    from nemo_minitron.bridge.model import TeacherFromCheckpoint, gpt_provider
    from nemo_minitron.bridge.recipes import BridgeRun, container
    from nemo_minitron.bridge.stages import launch

    init_distributed(ParallelConfig(), seed=0)
    model = gpt_provider(ARCH, seq_length=SEQ)
    teacher = TeacherFromCheckpoint(teacher_dir)
    model.register_pre_wrap_hook(teacher)
    dataset = PackedSequences(train_path=data, seed=0)
    config = container(model, dataset, stage, seed=1)
    config.logger.log_interval = STEPS  # one log line per run, as the trainer prints none
    history = HistoryCallback()
    with phase_times("megatron.bridge.training.train") as phases:
        launch(BridgeRun(config, ForwardStep(teacher), [history]))
    seconds = [entry["seconds"] for entry in history.history]
    return seconds, _phases(seconds, phases)


def main() -> None:
    stage = TrainStageConfig(steps=STEPS, micro_batch_size=BATCH, global_batch_size=BATCH, lr=1e-4, min_lr=1e-5,
                             warmup_steps=1)
    sequences = torch.randint(0, ARCH.vocab_size, (BATCH * STEPS, SEQ + 1), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir, data = f"{tmp}/teacher", f"{tmp}/train.pt"
        init_distributed(ParallelConfig(), seed=0)
        save_checkpoint(build_gpt_model(ARCH), ARCH, teacher_dir)
        torch.save(sequences, data)
        step = {"trainer": [], "bridge": []}
        phases = {"trainer": [], "bridge": []}
        ratios = {"trainer_first": [], "bridge_first": []}
        for repeat in range(REPEATS):
            order = ("trainer", "bridge") if repeat % 2 == 0 else ("bridge", "trainer")
            for loop in order:
                seconds, loop_phases = (_trainer_steps(stage, teacher_dir, sequences) if loop == "trainer"
                                        else _bridge_steps(stage, teacher_dir, data))
                step[loop].append(statistics.median(seconds[WARMUP:]))
                phases[loop].append(loop_phases)
            ratios[f"{order[0]}_first"].append(step["bridge"][-1] / step["trainer"][-1])
    every = ratios["trainer_first"] + ratios["bridge_first"]
    phase_medians = {loop: {name: round(statistics.median(p[name] for p in runs), 4) for name in runs[0]}
                     for loop, runs in phases.items()}
    record("bridge_kd_step_ratio", statistics.median(every), bridge_step_s=round(statistics.median(step["bridge"]), 4),
           trainer_step_s=round(statistics.median(step["trainer"]), 4),
           ratio_quartiles=[round(q, 4) for q in statistics.quantiles(every, n=4)],
           trainer_first_median=round(statistics.median(ratios["trainer_first"]), 4),
           bridge_first_median=round(statistics.median(ratios["bridge_first"]), 4), phase_seconds=phase_medians,
           bridge_extra_seconds={name: round(phase_medians["bridge"][name] - phase_medians["trainer"][name], 4)
                                 for name in phase_medians["bridge"]},
           repeats=REPEATS, steps_per_run=STEPS, warmup_steps_dropped=WARMUP, batch=f"{BATCH}x{SEQ}",
           arch=ARCH.to_dict(), threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
