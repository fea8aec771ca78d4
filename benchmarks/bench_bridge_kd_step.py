"""Cost of running distillation inside Megatron-Bridge: the time of one KD training step under Bridge's pretrain()
divided by the time of the same step under the project's trainer, on the same shape (kd_step's proportioned one:
8 layers of hidden 512, vocabulary 8192, 4 x 128 tokens per step), the same ForwardStep, teacher and optimizer
settings. A step is timed from its start to its end in both loops (forward/backward over the micro-batches,
gradient finalisation, clipped Adam step, scheduler; Bridge adds its logging and bookkeeping).

The two loops run alternately (the machine may be shared): each repetition trains a fresh student for STEPS steps
in each loop and takes the median of its last STEPS - WARMUP step times; the recorded ratio is the median over
REPEATS of the per-repetition ratio (Bridge / trainer).

Run: .venv/bin/python benchmarks/bench_bridge_kd_step.py  (records bridge_kd_step_ratio in benchmarks/results.json)
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
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
from nemo_minitron.runtime.distributed import ParallelConfig, init_distributed  # noqa: E402

ARCH = SHAPES["proportioned"]
STEPS, WARMUP, REPEATS = 6, 2, 7


def _trainer_steps(stage: TrainStageConfig, teacher_dir: str, sequences: torch.Tensor) -> list[float]:
    init_distributed(ParallelConfig(), seed=0)
    teacher, _ = load_checkpoint(teacher_dir)
    history = train(build_gpt_model(ARCH), sequences, stage.train_config(seed=0), ForwardStep(Teacher(teacher)),
                    progress=False)
    return [entry["seconds"] for entry in history]


def _bridge_steps(stage: TrainStageConfig, teacher_dir: str, data: str) -> list[float]:
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
    launch(BridgeRun(config, ForwardStep(teacher), [history]))
    return [entry["seconds"] for entry in history.history]


def main() -> None:
    stage = TrainStageConfig(steps=STEPS, micro_batch_size=BATCH, global_batch_size=BATCH, lr=1e-4, min_lr=1e-5,
                             warmup_steps=1)
    sequences = torch.randint(0, ARCH.vocab_size, (BATCH * STEPS, SEQ + 1), generator=torch.Generator().manual_seed(0))
    with tempfile.TemporaryDirectory() as tmp:
        teacher_dir, data = f"{tmp}/teacher", f"{tmp}/train.pt"
        init_distributed(ParallelConfig(), seed=0)
        save_checkpoint(build_gpt_model(ARCH), ARCH, teacher_dir)
        torch.save(sequences, data)
        trainer, bridge, ratios = [], [], []
        for _ in range(REPEATS):
            trainer.append(statistics.median(_trainer_steps(stage, teacher_dir, sequences)[WARMUP:]))
            bridge.append(statistics.median(_bridge_steps(stage, teacher_dir, data)[WARMUP:]))
            ratios.append(bridge[-1] / trainer[-1])
    record("bridge_kd_step_ratio", statistics.median(ratios), bridge_step_s=round(statistics.median(bridge), 4),
           trainer_step_s=round(statistics.median(trainer), 4),
           ratio_quartiles=[round(q, 4) for q in statistics.quantiles(ratios, n=4)], repeats=REPEATS,
           steps_per_run=STEPS, warmup_steps_dropped=WARMUP, batch=f"{BATCH}x{SEQ}", arch=ARCH.to_dict(),
           threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
