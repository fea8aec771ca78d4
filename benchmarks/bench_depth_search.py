"""Wall time of the demo's depth scoring, new against old: ``depth_search_time_ratio`` = time of the depth metrics
as `minitron score` runs them now / time of the exhaustive search (goal <= 1/3), and whether both pick the same
block.

On the demo's SmolLM2-135M teacher and its selection split (4 windows of 128 tokens, recipes/demo.yaml), both
compute lm_loss_drop (30 single layers) and the block search for k=15 (16 blocks):
  exhaustive: the unpruned loss plus one whole-model pass per candidate (47 passes, the search before caching);
  now:        the demo's settings: hidden states entering every layer cached once, each candidate running only the
              layers after its block, screened on the first score.screen_tokens=32 tokens of every window; the best
              score.screen_keep=3 blocks confirmed on all 128 tokens.
A third variant, cached without screening (exact on all tokens), is timed too. Runs interleave; medians of
``--repeats``.

    .venv/bin/python -m benchmarks.bench_depth_search
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")

import torch  # noqa: E402

from benchmarks.results import record  # noqa: E402


def main() -> None:
    from nemo_minitron import pipeline
    from nemo_minitron.cli import DEMO_RECIPE
    from nemo_minitron.config import load_recipe
    from nemo_minitron.evaluation.loss import validation_loss
    from nemo_minitron.importance.compute import add_loss_metrics
    from nemo_minitron.importance.depth import block_losses
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.runtime.distributed import destroy_distributed, init_distributed

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        recipe = load_recipe(DEMO_RECIPE, [f"run_dir={tmp}"])
        init_distributed(recipe.parallel, seed=recipe.data.seed)
        pipeline.prepare(recipe)
        run = pipeline.RunDir(recipe.run_dir)
        model, _ = pipeline._load(run.teacher, recipe, local=True)
        selection = run.split("selection")[:]
    s = recipe.score
    (k,) = s.block_sizes
    mb = s.micro_batch_size

    def exhaustive():
        validation_loss(model, selection, mb)
        block_losses(model, selection, 1, mb)
        return int(torch.argmin(block_losses(model, selection, k, mb)))

    def search(screen_tokens):
        scores = ImportanceScores(*(torch.zeros(1),) * 4)
        add_loss_metrics(scores, model, selection, ("lm_loss_drop",), (k,), mb, screen_tokens, s.screen_keep)
        return scores.best_block(k)[0]

    variants = {"exhaustive": exhaustive, "now": lambda: search(s.screen_tokens), "cached": lambda: search(None)}
    times = {name: [] for name in variants}
    blocks = {}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            start = time.perf_counter()
            blocks[name] = fn()
            times[name].append(time.perf_counter() - start)
    destroy_distributed()
    median = {name: statistics.median(t) for name, t in times.items()}
    record("depth_search_time_ratio", median["now"] / median["exhaustive"], goal="<= 0.333",
           same_block=blocks["now"] == blocks["exhaustive"], block_start={n: b for n, b in blocks.items()},
           seconds={n: round(t, 2) for n, t in median.items()},
           cached_unscreened_ratio=round(median["cached"] / median["exhaustive"], 3),
           selection=f"{selection.shape[0]}x{selection.shape[1] - 1}", screen_tokens=s.screen_tokens,
           screen_keep=s.screen_keep, block_size=k, repeats=args.repeats, threads=torch.get_num_threads())


if __name__ == "__main__":
    main()
