"""What the cached teacher (recipe option distill.cached_teacher_top_k) buys and costs.

kd_cached_step_ratio (speed): time of one KD training step (trainer.train) against the teacher's cached top-K
log-probs (CachedTeacher + CachedTopKKLLoss, K=64) / time of one step with the co-located live teacher (its forward
in every step, full-vocabulary forward KL). Shapes: the SmolLM2-135M teacher and its width-half student (hidden 384,
ffn 1024, 6 heads) of bench_pruned_speed, random weights, global batch 8 x 128 tokens in micro-batches of 4. Each
of ``--repeats`` rounds trains a fresh student for 1 + TIMED_STEPS steps with each variant in turn; the first step
of every run warms up; medians over the timed steps (details: also the fastest step of each, and the machine's
1-minute load average at the start, as the machine may be shared).

kd_cache_loss_gap (quality): on the real SmolLM2-135M of recipes/demo.yaml (prepared, scored and pruned to the
demo's width target in a temporary run folder), the same pruned checkpoint is distilled for ``--steps`` steps (the
demo's distill settings otherwise: forward KL, 8 x 128 tokens a step) three times: from the cached top-64, from the
cached top-256 (each cache written by that run, into a MINITRON_CACHE_DIR under the temporary folder) and from the
live teacher. value = validation loss (top-64) - validation loss (live), on the run's validation split; details:
the three losses, the top-256 gap, the pruned student's loss before distillation, the cache sizes on disk and each
run's wall time (cache writing included).

    .venv/bin/python -m benchmarks.bench_teacher_cache [--steps 20] [--repeats 4] [--only speed|quality]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

from benchmarks.bench_pruned_speed import STUDENTS, TEACHER  # noqa: E402
from benchmarks.results import record  # noqa: E402

TOP_K, MICRO_BATCH, GLOBAL_BATCH, SEQ_LENGTH, TIMED_STEPS = 64, 4, 8, 128, 2
VARIANTS = {"top_k_64": 64, "top_k_256": 256, "live": None}  # distill.cached_teacher_top_k of each quality run


def step_seconds(tmp: str, repeats: int) -> dict[str, list[float]]:
    """Seconds of the timed KD steps with the live and with the cached (top-K) teacher, random weights."""
    from nemo_minitron.distillation.forward_step import ForwardStep
    from nemo_minitron.distillation.teacher import CachedTeacher, Teacher, write_teacher_cache
    from nemo_minitron.distillation.trainer import TrainConfig, train
    from nemo_minitron.models.build import build_gpt_model

    sequences = torch.randint(0, TEACHER.vocab_size, (GLOBAL_BATCH, SEQ_LENGTH + 1),
                              generator=torch.Generator().manual_seed(0))
    live = Teacher(build_gpt_model(TEACHER))
    cache = write_teacher_cache(live, sequences, Path(tmp, "step_cache.safetensors"), top_k=TOP_K,
                                micro_batch_size=MICRO_BATCH)
    teachers = {"live": live, "cached": CachedTeacher(cache)}
    cfg = TrainConfig(steps=1 + TIMED_STEPS, micro_batch_size=MICRO_BATCH, global_batch_size=GLOBAL_BATCH)
    times = {name: [] for name in teachers}
    for _ in range(repeats):
        for name, teacher in teachers.items():
            history = train(build_gpt_model(STUDENTS["width"]), sequences, cfg, ForwardStep(teacher), progress=False)
            times[name] += [entry["seconds"] for entry in history[1:]]
    return times


def distilled_losses(recipe, tmp: str, steps: int) -> dict:
    """Validation losses of the demo's width student distilled for ``steps`` steps from each of VARIANTS."""
    from nemo_minitron import pipeline
    from nemo_minitron.evaluation.loss import validation_loss
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.models.checkpoint import fingerprint
    from nemo_minitron.runtime.cache import CACHE_ENV

    pipeline.prepare(recipe)
    pipeline.score(recipe)
    run = pipeline.RunDir(recipe.run_dir)
    pruned = run.pruned("width")
    pipeline.prune_model(recipe, run.active_teacher(), ImportanceScores.load(run.scores), recipe.prune["width"],
                         pruned)
    validation = run.split("validation")[:]
    mb = recipe.eval.micro_batch_size
    losses = {"pruned": validation_loss(pipeline._load(pruned, recipe)[0], validation, mb)}
    seconds, cache_mb = {}, {}
    for name, top_k in VARIANTS.items():
        cache = Path(tmp, "cache", name)
        os.environ[CACHE_ENV] = str(cache)  # only now: prepare used the usual one (converted teacher, tokens)
        student, arch = pipeline._load(pruned, recipe)
        d = replace(recipe.distill, steps=steps, cached_teacher_top_k=top_k, eval_interval=0)
        start = time.perf_counter()
        pipeline.distill_model(recipe, student, arch, run.distilled(name), d, run.active_teacher(),
                               fingerprint(pruned))
        seconds[name] = round(time.perf_counter() - start, 1)
        losses[name] = validation_loss(student, validation, mb)
        if top_k is not None:
            cache_mb[name] = round(sum(f.stat().st_size for f in cache.rglob("*.safetensors")) / 1e6, 1)
    return dict(losses=losses, seconds=seconds, cache_mb=cache_mb, validation=tuple(validation.shape),
                tokens=steps * recipe.distill.global_batch_size * recipe.data.seq_length)


def main() -> None:
    from nemo_minitron.cli import DEMO_RECIPE
    from nemo_minitron.config import load_recipe
    from nemo_minitron.runtime.distributed import destroy_distributed, init_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20, help="distillation steps of each quality run")
    parser.add_argument("--repeats", type=int, default=4, help="rounds of the step timing")
    parser.add_argument("--only", choices=("speed", "quality"), help="measure one figure (default: both)")
    args = parser.parse_args()
    load = round(os.getloadavg()[0], 1)  # the machine may be shared: wall times stretch with its load
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(DEMO_RECIPE, [f"run_dir={tmp}/run"])
        init_distributed(recipe.parallel, seed=recipe.data.seed)
        quality = distilled_losses(recipe, tmp, args.steps) if args.only != "speed" else None
        steps = step_seconds(tmp, args.repeats) if args.only != "quality" else None
    destroy_distributed()
    threads = torch.get_num_threads()
    if steps is not None:
        cached, live = (statistics.median(steps[name]) for name in ("cached", "live"))
        record("kd_cached_step_ratio", cached / live, cached_step_seconds=round(cached, 3),
               live_step_seconds=round(live, 3), fastest_seconds={n: round(min(t), 3) for n, t in steps.items()},
               top_k=TOP_K, teacher="SmolLM2-135M shape (30x576, ffn 1536)",
               student="width: 30x384, ffn 1024, 6 heads", batch=f"{GLOBAL_BATCH}x{SEQ_LENGTH}",
               micro_batch=MICRO_BATCH, timed_steps=args.repeats * TIMED_STEPS, load_average=load, device="cpu",
               threads=threads)
    if quality is not None:
        losses = quality["losses"]
        record("kd_cache_loss_gap", losses["top_k_64"] - losses["live"],
               val_loss={name: round(loss, 4) for name, loss in losses.items()},
               gap_top_k_256=round(losses["top_k_256"] - losses["live"], 4), steps=args.steps,
               train_tokens=quality["tokens"],
               validation=f"{quality['validation'][0]}x{quality['validation'][1] - 1}", cache_mb=quality["cache_mb"],
               distill_seconds=quality["seconds"], load_average=load, device="cpu", threads=threads)


if __name__ == "__main__":
    main()
