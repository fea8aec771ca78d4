"""`python -m nemo_minitron.bridge COMMAND (--recipe FILE | --run DIR) [key=value ...]`: the recipe with its training
stages run by Megatron-Bridge's pretrain() (NeMo's training loop).

  demo     the embedded default (SmolLM2-135M on Shakespeare) end to end, like `minitron demo`
  run      every stage of a recipe: `minitron prepare`, Bridge's correct-teacher (if enabled), score and distill,
           then `minitron prune`, `eval` and `report`

  STAGE    one stage on a prepared run folder: correct-teacher | score | distill (runs of Bridge's pretrain()),
           or prune (every prune target written as a Bridge checkpoint, pruned/NAME/bridge; distill prunes the
           student in its own run)
  key=value  a recipe setting (e.g. distill.steps=20, parallel.tensor_model_parallel_size=2), or a setting of
             Bridge's ConfigContainer in Bridge's override syntax (e.g. train.eval_iters=4,
             checkpoint.save_interval=100, logger.tensorboard_dir=/results/tb): keys the recipe does not have go
             to Bridge.

Under torchrun / srun every rank runs the same command. `minitron prune` / `eval` / `report` read what these
stages write (scores/, teacher_corrected/, distilled/NAME/). A bad input is reported as one line, exit code 1
(--debug: the traceback).
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

STAGE_NAMES = ("correct-teacher", "score", "prune", "distill")
COMMANDS = ("demo", "run", *STAGE_NAMES)


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(recipe overrides, Bridge overrides): a key goes to the recipe when the recipe has that key."""
    from nemo_minitron.config import RecipeConfig

    schema = OmegaConf.structured(RecipeConfig)
    recipe, bridge = [], []
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        path = key.lstrip("+~")
        known = OmegaConf.select(schema, path, default="__missing__") != "__missing__" or (
            path.split(".")[0] == "prune")
        (recipe if known else bridge).append(item)
    return recipe, bridge


def main(argv=None) -> int:
    from nemo_minitron.runtime.console import quiet_known_warnings, run_command

    quiet_known_warnings()
    parser = argparse.ArgumentParser(prog="python -m nemo_minitron.bridge", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=COMMANDS, metavar="COMMAND")
    parser.add_argument("--recipe", help="recipe YAML file")
    parser.add_argument("--run-dir", "--run", dest="run", metavar="DIR",
                        help="existing run folder (its recipe.yaml is used); under torchrun write --run-dir, since "
                             "torchrun reads --run as an abbreviation of its own --run-path")
    parser.add_argument("--dry-run", action="store_true", help="print the Bridge ConfigContainer and exit")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.add_argument("overrides", nargs="*", help="recipe or Bridge overrides, key=value")
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    args.quick = False  # resolve_recipe reads it: a `minitron study` option
    return run_command(f"python -m nemo_minitron.bridge {args.command}", lambda: command(args), debug=args.debug)


def command(args) -> int:
    """Run the parsed command (errors are reported by run_command)."""
    from nemo_minitron.cli import resolve_recipe

    args.overrides, bridge_overrides = split_overrides(args.overrides)
    recipe = resolve_recipe(args)
    from nemo_minitron.bridge import stages  # after the recipe: a bad one is reported without importing Bridge

    if args.command in ("demo", "run"):
        if args.dry_run:
            raise ValueError("--dry-run prints one stage's ConfigContainer: name the stage")
        from nemo_minitron.pipeline import log

        log(stages.run_all(recipe, bridge_overrides))
        return 0
    if args.command == "prune":
        for path in stages.prune(recipe):
            print(f"[prune] Megatron-Bridge checkpoint: {path}")
        return 0
    run = stages.training_stage(args.command, recipe, bridge_overrides)
    if args.dry_run:
        from megatron.bridge.training.utils.omegaconf_utils import create_omegaconf_dict_config

        print(OmegaConf.to_yaml(create_omegaconf_dict_config(run.config)[0]))
        return 0
    stages.launch(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
