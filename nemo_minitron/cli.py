"""`minitron` command line: run a whole recipe, one stage of it, or the offline demo.

  minitron demo [key=value ...]                    the embedded default end to end (SmolLM2-135M, Shakespeare)
  minitron run --recipe FILE [key=value ...]       every stage of a recipe
  minitron STAGE --run-dir DIR [key=value ...]     re-run one stage on an existing run folder (also --run DIR)
  minitron STAGE --recipe FILE [key=value ...]     one stage of a recipe
  minitron study [--quick] [--recipe FILE] [key=value ...]
                                                   arms of equal size and token budget (Minitron width / depth,
                                                   random importance, from scratch, teacher-generated text, two
                                                   rounds) on recipes/study.yaml; resumable; see nemo_minitron/study.py
  minitron search --run-dir DIR search.params=N [key=value ...]
                                                   architectures within N parameters: ranked by pruned loss, the
                                                   best search.top_k re-ranked after a short distillation
  minitron plan --recipe FILE --gpus N --gpu-memory-gib M [key=value ...]
                                                   parameters, memory per GPU of every stage and throughput,
                                                   before any compute; exits 1 if a stage cannot fit

STAGE is one of prepare, correct-teacher (settings: the recipe's `correct` section), score, prune, distill,
eval, report. Under torchrun / srun every rank runs the
same command (set parallel.tensor_model_parallel_size / pipeline_model_parallel_size).

A bad input (recipe, data, model folder, checkpoint, score file) is reported as one line `minitron COMMAND:
message` naming the file or setting, exit code 1; --debug shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from nemo_minitron import capacity, pipeline
from nemo_minitron.config import load_recipe
from nemo_minitron.runtime.console import quiet_known_warnings, run_command

DEMO_RECIPE = Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml"
STUDY_RECIPE = DEMO_RECIPE.with_name("study.yaml")
# `minitron study --quick`: every arm at a sixth of the budget, for a first look (and the tests)
QUICK_STUDY = ["distill.steps=10", "distill.eval_interval=5", "distill.warmup_steps=1", "correct.steps=4",
               "correct.warmup_steps=1", "search.top_k=2", "search.steps=5",
               "data.num_validation=8", "data.num_calibration=8", "run_dir=runs/study-quick"]
COMMANDS = ("demo", "run", "plan", "study", "search", *pipeline.STAGES)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="minitron", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS)
    parser.add_argument("--recipe", help="recipe YAML file")
    parser.add_argument("--run-dir", "--run", dest="run", metavar="DIR",
                        help="existing run folder (its recipe.yaml is used); under torchrun write --run-dir, since "
                             "torchrun reads --run as an abbreviation of its own --run-path")
    parser.add_argument("overrides", nargs="*", help="recipe overrides, e.g. distill.steps=20")
    parser.add_argument("--quick", action="store_true", help="study: a sixth of the token budget")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    plan = parser.add_argument_group("plan")
    plan.add_argument("--gpus", type=int, help="number of GPUs (default: tensor x pipeline parallel size)")
    plan.add_argument("--gpu-memory-gib", type=float, default=capacity.H100_MEMORY_GIB,
                      help="memory of one GPU (default: H100's %(default)g)")
    plan.add_argument("--peak-tflops", type=float, default=capacity.H100_BF16_TFLOPS,
                      help="peak TFLOP/s of one GPU (default: H100 SXM dense bf16, %(default)g)")
    plan.add_argument("--mfu", type=float, default=capacity.DEFAULT_MFU,
                      help="model FLOPs utilisation assumed (default %(default)g)")
    args = parser.parse_intermixed_args(argv)
    for item in args.overrides:
        if "=" not in item:
            parser.error(f"override {item!r} is not of the form key=value")
    return args


def resolve_recipe(args):
    """The recipe for this command: --run DIR's saved recipe, --recipe FILE, or the demo's (the study's)."""
    if args.quick and args.command != "study":
        raise ValueError("--quick is an option of `minitron study`")
    overrides = (QUICK_STUDY if args.quick else []) + list(args.overrides)
    if args.run:
        path = Path(args.run) / "recipe.yaml"
        if not path.exists():
            raise FileNotFoundError(f"{path} not found; is {args.run} a run folder (made by `minitron prepare`)?")
        overrides.append(f"run_dir={args.run}")
    elif args.recipe:
        path = args.recipe
    elif args.command in ("demo", "study"):
        path = DEMO_RECIPE if args.command == "demo" else STUDY_RECIPE
    else:
        raise ValueError("give --recipe FILE or --run DIR")
    # `minitron plan` sizes a GPU run from any machine, e.g. a CPU login node without Transformer Engine
    return load_recipe(path, overrides, on_this_machine=args.command != "plan")


def main(argv=None) -> int:
    quiet_known_warnings()
    args = parse_args(sys.argv[1:] if argv is None else argv)
    return run_command(f"minitron {args.command}", lambda: command(args), debug=args.debug)


def command(args) -> int:
    """Run the parsed command; its process group (made first, so that every rank reports a bad recipe through
    it) is torn down by run_command."""
    from nemo_minitron.runtime.distributed import init_distributed, init_process_group

    if args.command == "plan":  # sizes a GPU run from any machine, without a process group
        return capacity.plan_command(resolve_recipe(args), args.gpus, args.gpu_memory_gib, args.peak_tflops,
                                     args.mfu)
    init_process_group()
    recipe = resolve_recipe(args)
    init_distributed(recipe.parallel, seed=recipe.data.seed)
    if args.command == "study":
        from nemo_minitron.study import Study

        Study(recipe).run_all()
    elif args.command == "search":
        from nemo_minitron.search import run_search

        run_search(recipe)
    elif args.command in ("demo", "run"):
        markdown = pipeline.run_all(recipe)
        pipeline.log("\n" + markdown + f"\nReport: {Path(recipe.run_dir) / 'report.md'}")
    else:
        result = pipeline.STAGES[args.command](recipe)
        if args.command == "report":
            pipeline.log(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
