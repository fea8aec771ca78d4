"""One override tree for `python -m nemo_minitron.bridge`: each ``key=value`` is either a recipe setting or a field of
Bridge's ConfigContainer, and a setting that both hold has one source of truth, the recipe.

ALIASES (every command) and TRAINING_ALIASES (the training stage's section: ``distill.*`` or ``correct.*``) map
Bridge's names to the recipe's, so ``model.tensor_model_parallel_size=2`` also changes the layout that pruning and
validation use, and ``train.train_iters=20`` the schedule's decay length. A key that is neither the recipe's nor
Bridge's is refused in one line naming it and the nearest known key.
"""

from __future__ import annotations

import dataclasses
import difflib

from omegaconf import OmegaConf

ALIASES = {
    "model.tensor_model_parallel_size": "parallel.tensor_model_parallel_size",
    "model.pipeline_model_parallel_size": "parallel.pipeline_model_parallel_size",
    "model.sequence_parallel": "parallel.sequence_parallel",
    "model.seq_length": "data.seq_length",
    "ddp.use_distributed_optimizer": "parallel.use_distributed_optimizer",
    "optimizer.use_distributed_optimizer": "parallel.use_distributed_optimizer",
    "rng.seed": "data.seed",
}
TRAINING_ALIASES = {  # Bridge key -> field of the stage's TrainStageConfig
    "train.train_iters": "steps",
    "train.global_batch_size": "global_batch_size",
    "train.micro_batch_size": "micro_batch_size",
    "optimizer.lr": "lr",
    "optimizer.min_lr": "min_lr",
    "optimizer.weight_decay": "weight_decay",
    "optimizer.clip_grad": "clip_grad",
    "scheduler.lr_warmup_iters": "warmup_steps",
    "train.eval_interval": "eval_interval",
    "validation.eval_interval": "eval_interval",
    "checkpoint.save_interval": "save_interval",
}
STAGE_SECTIONS = {"distill": "distill", "correct-teacher": "correct"}


def _recipe_keys(node, prefix: str = "") -> list[str]:
    """Every leaf key of the recipe schema, dotted."""
    keys = []
    for name in node:
        value = node[name] if not OmegaConf.is_missing(node, name) else None
        path = f"{prefix}{name}"
        keys.extend(_recipe_keys(value, path + ".") if OmegaConf.is_dict(value) else [path])
    return keys


def _nearest(key: str, candidates) -> str:
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else ""


def split_overrides(overrides: list[str], command: str) -> tuple[list[str], list[str]]:
    """(recipe overrides, Bridge overrides) of ``command`` (a stage, run or demo). Aliases of recipe settings are
    rewritten to the recipe's keys; a key under a recipe-only section (data, parallel, distill, ...) that the recipe
    lacks raises ValueError naming the nearest recipe key."""
    from nemo_minitron.config import RecipeConfig

    schema = OmegaConf.structured(RecipeConfig)
    keys = _recipe_keys(schema)
    recipe, bridge = [], []
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not of the form key=value")
        path = key.lstrip("+~")
        if path in TRAINING_ALIASES:
            if command not in STAGE_SECTIONS:
                raise ValueError(f"{path}: {command!r} is not one training stage; set the training stage's own key "
                                 f"instead (distill.{TRAINING_ALIASES[path]} or correct.{TRAINING_ALIASES[path]})")
            recipe.append(f"{STAGE_SECTIONS[command]}.{TRAINING_ALIASES[path]}={value}")
        elif path in ALIASES:
            recipe.append(f"{ALIASES[path]}={value}")
        elif path.split(".")[0] == "prune" or OmegaConf.select(schema, path, default="__missing__") != "__missing__":
            recipe.append(item)
        elif path.split(".")[0] in schema and path.split(".")[0] != "model":  # only the recipe has this section
            raise ValueError(f"{path}: not a recipe setting{_nearest(path, keys)}")
        else:
            bridge.append(item)
    return recipe, bridge


def check_bridge_keys(config, overrides) -> None:
    """Raise ValueError for the first override whose key is not a field of the ConfigContainer ``config`` (keys
    written ``+key`` add a field and are left to Bridge), naming the nearest recipe or Bridge key."""
    from nemo_minitron.config import RecipeConfig

    for item in overrides:
        key = item.partition("=")[0]
        if key.startswith(("+", "~")):
            continue
        node, parts = config, key.split(".")
        for depth, part in enumerate(parts):
            names = ([f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node)
                     else list(node) if isinstance(node, dict) else [])
            if part not in names:
                prefix = ".".join(parts[:depth])
                known = [f"{prefix}.{name}" if prefix else name for name in names]
                known += [*_recipe_keys(OmegaConf.structured(RecipeConfig)), *ALIASES, *TRAINING_ALIASES]
                raise ValueError(f"{key}: neither a recipe setting nor a field of Bridge's ConfigContainer"
                                 f"{_nearest(key, known)}")
            node = node[part] if isinstance(node, dict) else getattr(node, part)
