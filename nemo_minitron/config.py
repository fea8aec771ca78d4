"""Typed recipe configuration: dataclasses are the one source of defaults, YAML (OmegaConf) is their face.

A recipe file sets any subset of the fields below; `key=value` overrides from the command line win over the
file. Everything is validated before any compute, with errors that name the field and the allowed values.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from nemo_minitron.data.corpus import SHAKESPEARE
from nemo_minitron.distillation.intermediate import KINDS as INTERMEDIATE_LOSSES
from nemo_minitron.distillation.losses import KINDS as KD_LOSSES
from nemo_minitron.models.arch import PARAMS_DTYPES, RECOMPUTE_GRANULARITIES, check_transformer_impl
from nemo_minitron.pruning.plan import PruneTarget
from nemo_minitron.runtime.distributed import ParallelConfig

EMBEDDED_MODEL = "smollm2-135m"


@dataclass
class ModelConfig:
    """The teacher: the embedded SmolLM2-135M, or a local Hugging Face checkpoint directory (Llama/Mistral/Qwen2)."""

    source: str = EMBEDDED_MODEL
    transformer_impl: str = "local"  # "transformer_engine" on GPU (FP8 needs it)
    fp8: Optional[str] = None  # null | delayed | tensorwise
    # fp32 | bf16 | fp16: the dtype of weights and activations; 16-bit runs in Megatron's mixed precision (float32
    # master weights and gradient reduction in the optimizer, loss scaling for fp16)
    params_dtype: str = "fp32"
    recompute_granularity: Optional[str] = None  # null | full (every layer) | selective (core attention)


@dataclass
class DataConfig:
    """Text -> token windows [seq_length + 1], split deterministically (data/splits.py).

    source: "shakespeare" | a .txt file or folder | a .jsonl/.json/.parquet/.csv file | a Megatron indexed dataset
    PREFIX, or a blend of these: a list of {path: ..., weight: ...} entries (weights > 0, normalised to sum to 1).
    """

    source: Any = "shakespeare"
    text_field: str = "text"
    seq_length: int = 256
    num_calibration: int = 1024
    num_train: int = -1  # -1: every sequence not held out for calibration, validation or selection
    num_validation: int = 64
    num_selection: int = 8  # held out for lm_loss_drop and the block search, disjoint from validation
    seed: int = 1234

    def sources(self) -> list[tuple[str, float]]:
        """(path, weight) of every source, the weights normalised to sum to 1."""
        if isinstance(self.source, str):
            return [(self.source, 1.0)]
        if not isinstance(self.source, list) or not self.source:
            raise ValueError(f"data.source must be a path, {SHAKESPEARE!r}, or a non-empty list of "
                             f"{{path: ..., weight: ...}} entries, got {self.source!r}")
        for i, entry in enumerate(self.source):
            if not isinstance(entry, dict) or set(entry) != {"path", "weight"}:
                raise ValueError(f"data.source[{i}] must have exactly the keys path and weight, got {entry!r}")
            if not isinstance(entry["path"], str):
                raise ValueError(f"data.source[{i}].path must be a string, got {entry['path']!r}")
            weight = entry["weight"]
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 < weight < float("inf"):
                raise ValueError(f"data.source[{i}].weight must be a finite number > 0, got {weight!r}")
        total = sum(entry["weight"] for entry in self.source)
        return [(entry["path"], entry["weight"] / total) for entry in self.source]


@dataclass
class ScoreConfig:
    """Importance scoring on the calibration split (width statistics, depth metrics, block search)."""

    micro_batch_size: int = 4
    seq_agg: str = "mean"
    batch_agg: str = "l2"
    depth_metrics: list[str] = field(default_factory=lambda: ["block_influence"])
    block_sizes: list[int] = field(default_factory=list)  # contiguous blocks to search (on data.num_selection)
    # null: every block's loss on whole windows; n: screen on the first n tokens of each window, then re-measure
    # the screen_keep best blocks of each size on whole windows and pick among those
    screen_tokens: Optional[int] = None
    screen_keep: int = 3
    # an lm_eval task (e.g. winogrande) to choose the block by, as the paper did: the blocks left after screening
    # (all blocks without it) are scored on it with the block removed and the highest block_task_metric wins
    block_task: Optional[str] = None
    block_task_metric: str = "acc"
    block_task_limit: Optional[int] = None  # first N documents of the task (eval.task_path: local task YAMLs)


@dataclass
class TrainStageConfig:
    """Optimisation settings shared by teacher correction and distillation (cosine schedule with warmup)."""

    steps: int = 100
    micro_batch_size: int = 4
    global_batch_size: int = 16
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    weight_decay: float = 0.01
    clip_grad: float = 1.0
    eval_interval: int = 0  # 0: evaluate only at the end
    save_interval: int = 0  # 0: checkpoint only at the end
    skip_nonfinite_steps: int = 0  # steps of non-finite loss skipped (logged) before one stops the run

    def train_config(self, seed: int, use_distributed_optimizer: bool = False):
        """The trainer's TrainConfig for these settings (it validates them)."""
        from nemo_minitron.distillation.trainer import TrainConfig

        return TrainConfig(steps=self.steps, micro_batch_size=self.micro_batch_size,
                           global_batch_size=self.global_batch_size, lr=self.lr, min_lr=self.min_lr,
                           warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, clip_grad=self.clip_grad,
                           eval_interval=self.eval_interval, save_interval=self.save_interval, seed=seed,
                           use_distributed_optimizer=use_distributed_optimizer,
                           skip_nonfinite_steps=self.skip_nonfinite_steps)


@dataclass
class CorrectConfig(TrainStageConfig):
    """Teacher correction: a short LM fine-tune of the teacher on the distillation data (off by default)."""

    enabled: bool = False
    lr: float = 2e-5  # the papers: 1/5 of the original peak LR
    min_lr: float = 2e-6


@dataclass
class DistillConfig(TrainStageConfig):
    """Logit distillation of one pruned student from the (corrected) teacher."""

    student: str = "width"  # a key of prune.targets
    loss: str = "forward_kl"
    temperature: float = 1.0
    top_k: Optional[int] = None  # for loss=topk_forward_kl
    # K: distil from the teacher's top-K log-probs over the sequences this run trains on, computed once and kept
    # in the cache folder under a name made of the teacher's content, K and the sequences (reused by any run with
    # the same three); the loss is then forward KL to the teacher renormalised over its top K. null: live teacher.
    cached_teacher_top_k: Optional[int] = None
    chunk_size: Optional[int] = None  # tokens per chunk of the KD loss (bounds float32 probability memory)
    fuse_output_layer: bool = False  # compute the logits inside the chunked loss: full logits never exist
    lm_loss_weight: float = 0.0
    # Intermediate hidden-state losses (off by default; the papers use them when many layers are removed):
    # [student_layer, teacher_layer] pairs of 0-based layer indices whose outputs are compared.
    intermediate_pairs: list[list[int]] = field(default_factory=list)
    intermediate_loss: str = "cosine"  # cosine | mse
    intermediate_weight: float = 1.0  # fixed weight of each pair's loss (unless balance_losses)
    balance_losses: bool = False  # rescale the intermediate losses to the logit loss per micro-batch


@dataclass
class EvalConfig:
    """Validation loss of every model in the run folder, and optionally lm-evaluation-harness tasks (needs
    `pip install 'nemo-minitron[eval]'`)."""

    micro_batch_size: int = 4  # also the batch size of the task requests
    tasks: list[str] = field(default_factory=list)  # lm_eval task or group names, e.g. [hellaswag, arc_easy]
    num_fewshot: Optional[int] = None  # null: each task's own setting (else 0)
    task_limit: Optional[int] = None  # evaluate only the first N documents of each task
    task_path: Optional[str] = None  # a folder of extra task YAMLs (e.g. local tasks on an offline machine)


@dataclass
class RoundConfig:
    """One round of multi-round compression: prune ``target`` (a key of prune) from the previous round's student
    (the teacher for round 1) and distil it from that model for ``steps`` steps (other settings: distill)."""

    target: str = ""
    steps: int = 100


@dataclass
class StudyConfig:
    """`minitron study` (nemo_minitron/study.py): which arms, which prune targets they use, and the text sampling
    of the sdg_lm arm. The token budget of every arm is distill.steps x distill.global_batch_size x seq_length."""

    arms: list[str] = field(default_factory=lambda: [
        "minitron_width", "minitron_width_uncorrected", "depth_block_search", "depth_block_influence",
        "width_random_importance", "scratch_lm", "scratch_kd", "sdg_lm", "two_rounds"])
    width_target: str = "width"
    depth_target: str = "depth"
    round_target: str = "width70"  # round 1 of the two_rounds arm (round 2 prunes width_target from it)
    sdg_prompt_tokens: int = 16
    sdg_temperature: float = 1.0
    sdg_batch_size: int = 16
    scratch_lr: Optional[float] = None  # peak lr of the scratch arms (min_lr scaled alike); null: distill.lr


@dataclass
class SearchConfig:
    """`minitron search` (nemo_minitron/search.py): candidates from a grid within a parameter budget, ranked by
    pruned loss, the top_k re-ranked after a short distillation."""

    params: Optional[float] = None  # the budget: most parameters of the student
    tolerance: float = 0.05  # candidates have at least (1 - tolerance) x params parameters
    fractions: list[float] = field(default_factory=lambda: [0.5, 0.625, 0.75, 0.875, 1.0])
    multiple_of: int = 64  # hidden_size and ffn_hidden_size candidates are multiples of it
    top_k: int = 3
    steps: int = 20  # distillation steps of each of the top_k


@dataclass
class RecipeConfig:
    name: str = "minitron"
    run_dir: str = "runs/minitron"
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    score: ScoreConfig = field(default_factory=ScoreConfig)
    prune: dict[str, PruneTarget] = field(default_factory=dict)
    correct: CorrectConfig = field(default_factory=CorrectConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    rounds: list[RoundConfig] = field(default_factory=list)  # multi-round compression (replaces prune + distill)
    study: StudyConfig = field(default_factory=StudyConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self, on_this_machine: bool = True) -> "RecipeConfig":
        """Check every setting that can be checked without loading the model or data (``on_this_machine``: also
        that this machine can run the chosen layer implementation)."""
        check_transformer_impl(self.model.transformer_impl, self.model.fp8, on_this_machine)
        _choice("model.params_dtype", self.model.params_dtype, PARAMS_DTYPES)
        _choice("model.recompute_granularity", self.model.recompute_granularity, RECOMPUTE_GRANULARITIES)
        if self.model.source != EMBEDDED_MODEL and not Path(self.model.source).is_dir():
            raise ValueError(f"model.source: {self.model.source!r} is neither {EMBEDDED_MODEL!r} nor a local "
                             "Hugging Face checkpoint directory")
        d = self.data
        _positive("data.seq_length", d.seq_length)
        _positive("data.num_calibration", d.num_calibration)
        _positive("data.num_validation", d.num_validation)
        d.sources()  # checks data.source
        if not isinstance(d.num_selection, int) or d.num_selection < 0:
            raise ValueError(f"data.num_selection must be an integer >= 0, got {d.num_selection!r}")
        if d.num_selection == 0 and ("lm_loss_drop" in self.score.depth_metrics or self.score.block_sizes):
            raise ValueError("score.depth_metrics lm_loss_drop and score.block_sizes are measured on held-out "
                             "sequences: set data.num_selection >= 1")
        tp = self.parallel.tensor_model_parallel_size
        _positive("parallel.tensor_model_parallel_size", tp)
        _positive("parallel.pipeline_model_parallel_size", self.parallel.pipeline_model_parallel_size)
        if self.parallel.sequence_parallel and (tp == 1 or d.seq_length % tp):
            raise ValueError(f"parallel.sequence_parallel=true needs tensor_model_parallel_size > 1 dividing "
                             f"data.seq_length ({d.seq_length}), got tensor_model_parallel_size={tp}")
        if d.num_train != -1:
            _positive("data.num_train", d.num_train)
        _positive("score.micro_batch_size", self.score.micro_batch_size)
        _positive("score.screen_keep", self.score.screen_keep)
        if self.score.screen_tokens is not None and not (isinstance(self.score.screen_tokens, int)
                                                         and 1 <= self.score.screen_tokens <= d.seq_length):
            raise ValueError(f"score.screen_tokens must be null or an integer in 1..data.seq_length={d.seq_length}, "
                             f"got {self.score.screen_tokens!r}")
        _positive("eval.micro_batch_size", self.eval.micro_batch_size)
        if self.score.block_task is not None:
            if not self.score.block_sizes:
                raise ValueError("score.block_task scores the blocks of score.block_sizes: set score.block_sizes")
            if self.score.block_task_limit is not None:
                _positive("score.block_task_limit", self.score.block_task_limit)
            if on_this_machine and importlib.util.find_spec("lm_eval") is None:
                raise ValueError("score.block_task needs lm-evaluation-harness: pip install 'nemo-minitron[eval]'")
        ev = self.eval
        if not all(ev.tasks):
            raise ValueError(f"eval.tasks must be lm_eval task names, got {ev.tasks}")
        if ev.num_fewshot is not None and ev.num_fewshot < 0:
            raise ValueError(f"eval.num_fewshot must be null or an integer >= 0, got {ev.num_fewshot}")
        if ev.task_limit is not None:
            _positive("eval.task_limit", ev.task_limit)
        if ev.task_path is not None and not Path(ev.task_path).is_dir():
            raise ValueError(f"eval.task_path: {ev.task_path!r} is not a folder (of lm_eval task YAMLs)")
        pp = self.parallel.pipeline_model_parallel_size
        if ev.tasks and pp != 1:
            raise ValueError(f"eval.tasks run on a single pipeline stage: they need "
                             f"parallel.pipeline_model_parallel_size=1, got {pp}")
        if ev.tasks and on_this_machine and importlib.util.find_spec("lm_eval") is None:
            raise ValueError("eval.tasks needs lm-evaluation-harness: pip install 'nemo-minitron[eval]'")
        for name, target in self.prune.items():
            if not name.isidentifier():
                raise ValueError(f"prune: target name {name!r} must be a plain identifier (it names a folder)")
        for stage in ("correct", "distill"):
            try:
                getattr(self, stage).train_config(seed=d.seed)
            except ValueError as err:  # TrainConfig names its own fields: say which section they came from
                raise ValueError(f"{stage}: {err}".replace("train.", f"{stage}.")) from None
        dist = self.distill
        if self.prune and dist.student not in self.prune:
            raise ValueError(f"distill.student: {dist.student!r} is not a prune target; allowed: {sorted(self.prune)}")
        _choice("distill.loss", dist.loss, KD_LOSSES)
        se = self.search
        if se.params is not None and not se.params > 0:
            raise ValueError(f"search.params must be a positive number of parameters, got {se.params!r}")
        if not 0 <= se.tolerance < 1:
            raise ValueError(f"search.tolerance must be in [0, 1), got {se.tolerance!r}")
        if not se.fractions or not all(0 < f <= 1 for f in se.fractions):
            raise ValueError(f"search.fractions must be numbers in (0, 1], got {se.fractions}")
        for name in ("multiple_of", "top_k", "steps"):
            _positive(f"search.{name}", getattr(se, name))
        for i, r in enumerate(self.rounds):
            if r.target not in self.prune:
                raise ValueError(f"rounds[{i}].target: {r.target!r} is not a prune target; allowed: "
                                 f"{sorted(self.prune)}")
            try:
                replace(dist, steps=r.steps).train_config(seed=d.seed)
            except ValueError as err:
                raise ValueError(f"rounds[{i}]: {err}".replace("train.", "distill.").replace(
                    "distill.steps", f"rounds[{i}].steps")) from None
        if (dist.loss == "topk_forward_kl") != (dist.top_k is not None):
            raise ValueError(f"distill.top_k is required by, and only used by, distill.loss: topk_forward_kl "
                             f"(loss={dist.loss!r}, top_k={dist.top_k!r})")
        if dist.top_k is not None:
            _positive("distill.top_k", dist.top_k)
        if dist.cached_teacher_top_k is not None:
            _positive("distill.cached_teacher_top_k", dist.cached_teacher_top_k)
            if (dist.loss not in ("forward_kl", "topk_forward_kl")
                    or dist.top_k not in (None, dist.cached_teacher_top_k)):
                raise ValueError(f"distill.cached_teacher_top_k distils forward KL over the cached top K: it needs "
                                 f"distill.loss forward_kl (or topk_forward_kl with top_k equal to it), got "
                                 f"loss={dist.loss!r}, top_k={dist.top_k!r}")
            if dist.intermediate_pairs or dist.fuse_output_layer:
                raise ValueError("distill.cached_teacher_top_k keeps only the teacher's log-probs: it cannot be "
                                 "combined with distill.intermediate_pairs or distill.fuse_output_layer")
        if dist.chunk_size is not None:
            _positive("distill.chunk_size", dist.chunk_size)
        if dist.temperature <= 0:
            raise ValueError(f"distill.temperature must be > 0, got {dist.temperature}")
        _choice("distill.intermediate_loss", dist.intermediate_loss, INTERMEDIATE_LOSSES)
        if any(len(pair) != 2 or min(pair) < 0 for pair in dist.intermediate_pairs):
            raise ValueError(f"distill.intermediate_pairs must be [student_layer, teacher_layer] pairs of layer "
                             f"indices >= 0, got {dist.intermediate_pairs}")
        if not 0 <= dist.intermediate_weight < float("inf"):
            raise ValueError(f"distill.intermediate_weight must be a finite number >= 0, got "
                             f"{dist.intermediate_weight}")
        if dist.balance_losses and not dist.intermediate_pairs:
            raise ValueError("distill.balance_losses balances intermediate losses: it needs distill.intermediate_pairs")
        return self


def _choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name}: {value!r} is not allowed; choose one of {list(allowed)}")


def _positive(name, value):
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), on_this_machine: bool = True
                ) -> RecipeConfig:
    """RecipeConfig from defaults <- YAML file <- `a.b=value` overrides, validated (see RecipeConfig.validate)."""
    try:
        merged = OmegaConf.structured(RecipeConfig)
        if path is not None:
            if not Path(path).is_file():
                raise FileNotFoundError(f"recipe file not found: {path}")
            merged = OmegaConf.merge(merged, _read_yaml(path))
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        recipe = OmegaConf.to_object(merged)
        # as written, for save_recipe: interpolations such as ${oc.env:HF_TOKEN} stay unresolved (no secrets on disk)
        recipe._unresolved_yaml = OmegaConf.to_yaml(merged)
    except OmegaConfBaseException as err:  # unknown key or wrong type: OmegaConf names the full key
        raise ValueError(f"recipe {path or '(defaults)'}: {err}") from None
    return recipe.validate(on_this_machine)


def _read_yaml(path: str | Path):
    """The mapping in the YAML file ``path``; ValueError naming the file (and line) when it is not one."""
    try:
        config = OmegaConf.load(path)
    except yaml.MarkedYAMLError as err:
        where = [f"{what} at line {mark.line + 1} column {mark.column + 1}" for what, mark in
                 ((err.problem, err.problem_mark), (err.context, err.context_mark)) if what and mark]
        raise ValueError(f"recipe {path}: YAML syntax error: {'; '.join(where) or err}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ValueError(f"recipe {path} is not a YAML text file: {err}") from None
    if not isinstance(config, DictConfig):
        raise ValueError(f"recipe {path} must be a mapping of settings (section: ...), not a list")
    return config


def save_recipe(recipe: RecipeConfig, path: str | Path) -> None:
    """Write ``recipe`` as YAML; one from load_recipe keeps its interpolations (e.g. ${oc.env:VAR}) unresolved, so
    loading the file again resolves them then."""
    text = getattr(recipe, "_unresolved_yaml", None) or OmegaConf.to_yaml(OmegaConf.structured(recipe))
    Path(path).write_text(text)
