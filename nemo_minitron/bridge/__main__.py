"""`python -m nemo_minitron.bridge COMMAND (--recipe FILE | --run DIR) [key=value ...]`: the recipe with its training
stages run by Megatron-Bridge's pretrain() (NeMo's training loop).

  demo     the embedded default (SmolLM2-135M on Shakespeare) end to end, like `minitron demo`
  run      every stage of a recipe: `minitron prepare`, Bridge's correct-teacher (if enabled), score and distill,
           then `minitron prune`, `eval` and `report`

  STAGE    one stage on a prepared run folder: correct-teacher | score | distill (runs of Bridge's pretrain()),
           or prune (every prune target written as a Bridge checkpoint, pruned/NAME/bridge; distill prunes the
           student in its own run)
  key=value  a recipe setting (e.g. distill.steps=20, parallel.tensor_model_parallel_size=2), or a field of
             Bridge's ConfigContainer in Bridge's override syntax (e.g. logger.tensorboard_dir=/results/tb,
             validation.eval_iters=4). Bridge's names for what the recipe sets are aliases of the recipe's keys:
             model.tensor_model_parallel_size, model.pipeline_model_parallel_size, model.sequence_parallel,
             model.seq_length, ddp.use_distributed_optimizer, rng.seed, and for distill / correct-teacher
             train.train_iters, train.global_batch_size, train.micro_batch_size, optimizer.lr / min_lr /
             weight_decay / clip_grad, scheduler.lr_warmup_iters, train.eval_interval, checkpoint.save_interval.
             A key that is neither the recipe's nor Bridge's is refused, naming the nearest known key.

Under torchrun / srun every rank runs the same command. `minitron prune` / `eval` / `report` read what these
stages write (scores/, teacher_corrected/, distilled/NAME/). A bad input is reported as one line, exit code 1
(--debug: the traceback).
"""

from __future__ import annotations

import argparse
import sys

from omegaconf import OmegaConf

from nemo_minitron.bridge.overrides import split_overrides

STAGE_NAMES = ("correct-teacher", "score", "prune", "distill")
COMMANDS = ("demo", "run", *STAGE_NAMES)


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

    args.overrides, bridge_overrides = split_overrides(args.overrides, args.command)
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
