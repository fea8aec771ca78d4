"""The Minitron stages in order. Each stage reads and writes files in one run folder, so any stage can be
re-run alone (`minitron score|prune|distill|eval|report --run DIR`).

run folder:
  recipe.yaml                 the recipe, interpolations such as ${oc.env:VAR} kept as written
  data/                       windows.json + {calibration,validation,selection,train}.npy: the splits as window
                              indices into token files memory-mapped from the cache folder (data/splits.py)
  tokenizer/                  the teacher's tokenizer (for export)
  teacher/                    Megatron-Core checkpoint of the teacher (arch.json + dist checkpoint)
  teacher_corrected/          the teacher after correction (if enabled), + history.json
  scores/                     importance scores (safetensors + json) and their plots
  pruned/<target>/            pruned Megatron-Core checkpoint + plan.json
  distilled/<target>/         distilled student checkpoint + history.json; hf/ its Hugging Face export
  rounds/<source>/scores/     with ``rounds``: importance scores of a round's distilled student (next round's source)
  eval.json, timings.json, report.md, plots/
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

from nemo_minitron.config import EMBEDDED_MODEL, RecipeConfig, save_recipe
from nemo_minitron.runtime.distributed import is_rank0, on_rank0


def log(message: str) -> None:
    if is_rank0():
        print(message, flush=True)


class RunDir:
    """Paths of one run folder (see module docstring)."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.data = self.root / "data"
        self.tokenizer = self.root / "tokenizer"
        self.teacher = self.root / "teacher"
        self.teacher_corrected = self.root / "teacher_corrected"
        self.scores = self.root / "scores"
        self.plots = self.root / "plots"
        self.eval = self.root / "eval.json"
        self.timings = self.root / "timings.json"
        self.report = self.root / "report.md"

    def pruned(self, name: str) -> Path:
        return self.root / "pruned" / name

    def distilled(self, name: str) -> Path:
        return self.root / "distilled" / name

    def split(self, name: str):
        """The split ``name`` (calibration, validation, selection or train) as a data.splits.PackedSplit: rows
        [n, seq_length + 1] read on demand from memory-mapped tokens (slicing it gives an int64 tensor)."""
        from nemo_minitron.data.splits import load_split

        path = self.data / f"{name}.npy"
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `minitron prepare --run {self.root}` first")
        return load_split(path)

    def active_teacher(self) -> Path:
        """The corrected teacher if correction ran, else the converted one."""
        return self.teacher_corrected if (self.teacher_corrected / "arch.json").exists() else self.teacher

    def require(self, path: Path, stage: str) -> Path:
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: run `minitron {stage} --run {self.root}` first")
        return path


@contextmanager
def timed(run: RunDir, stage: str):
    """Record a stage's wall time in timings.json. Ends with a barrier: files that rank 0 alone writes (scores,
    plots, json) exist before any rank starts the next stage."""
    start = time.perf_counter()
    yield
    if dist.is_initialized():
        dist.barrier()
    seconds = time.perf_counter() - start
    if is_rank0():
        timings = json.loads(run.timings.read_text()) if run.timings.exists() else {}
        timings[stage] = round(seconds, 1)
        run.timings.write_text(json.dumps(timings, indent=2) + "\n")
    log(f"[{stage}] done in {seconds:.0f} s")


def _write_json(path: Path, payload) -> None:
    if is_rank0():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(payload, indent=2) + "\n")


def _local_split(sequences: torch.Tensor) -> torch.Tensor:
    """This data-parallel rank's contiguous share of ``sequences``."""
    from megatron.core import parallel_state

    rank, size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    if sequences.shape[0] % size:
        raise ValueError(f"{sequences.shape[0]} sequences cannot be split evenly over {size} data-parallel ranks")
    share = sequences.shape[0] // size
    return sequences[rank * share:(rank + 1) * share]


def build_kwargs(recipe: RecipeConfig, local: bool = False) -> dict:
    """build_gpt_model's options from the recipe; scoring and pruning hook / slice the modules of the local
    (non-Transformer-Engine) layer spec, so they ask for it with ``local`` (and need no activation recompute)."""
    from nemo_minitron.models.arch import params_dtype

    m = recipe.model
    impl = dict(transformer_impl="local") if local else dict(
        transformer_impl=m.transformer_impl, fp8=m.fp8, recompute_granularity=m.recompute_granularity)
    return dict(impl, params_dtype=params_dtype(m.params_dtype), sequence_parallel=recipe.parallel.sequence_parallel)


def _load(path: Path, recipe: RecipeConfig, local: bool = False):
    """(model, arch) from a Megatron-Core checkpoint folder (see build_kwargs for ``local``)."""
    from nemo_minitron.models.checkpoint import load_checkpoint

    return load_checkpoint(path, **build_kwargs(recipe, local))


def _check_model(recipe: RecipeConfig, arch) -> None:
    """``arch`` against this run's tensor-parallel size, and every prune target against ``arch`` (before any
    compute): ValueError naming the target and field."""
    from megatron.core import parallel_state

    from nemo_minitron.pruning.plan import validate

    tp = parallel_state.get_tensor_model_parallel_world_size()
    arch.check_tensor_parallel(tp)
    for name, target in recipe.prune.items():
        try:
            validate(arch, target, tp_size=tp)
        except ValueError as err:
            raise ValueError(str(err).replace("prune.", f"prune.{name}.")) from None


# --------------------------------------------------------------------------------------------------- stages


def prepare(recipe: RecipeConfig) -> None:
    """Tokenise the corpus (cached) and split its windows; convert the teacher to a Megatron-Core checkpoint. The
    model folder (config, weight headers, tokenizer) and the prune targets are checked first, on every rank."""
    from nemo_minitron.data.splits import write_splits
    from nemo_minitron.models.build import build_gpt_model
    from nemo_minitron.models.checkpoint import save_checkpoint
    from nemo_minitron.models.hf_convert import load_hf_checkpoint, load_hf_state_dict, load_hf_tokenizer

    run = RunDir(recipe.run_dir)
    with timed(run, "prepare"):
        if recipe.model.source == EMBEDDED_MODEL:
            from nemo_minitron.models.embedded import embedded_teacher_dir

            hf_dir = on_rank0(embedded_teacher_dir)
        else:
            hf_dir = Path(recipe.model.source)
        arch, state_dict = load_hf_checkpoint(hf_dir)
        tokenizer = load_hf_tokenizer(hf_dir)
        if len(tokenizer) > arch.vocab_size:
            raise ValueError(f"model.source {hf_dir}: its tokenizer has {len(tokenizer)} tokens, more than the "
                             f"vocab_size {arch.vocab_size} of its config.json: is it another model's tokenizer?")
        _check_model(recipe, arch)
        d = recipe.data

        def write_data():
            run.root.mkdir(parents=True, exist_ok=True)
            save_recipe(recipe, run.root / "recipe.yaml")
            tokenizer.save_pretrained(run.tokenizer)
            return write_splits(run.data, d.sources(), tokenizer, seq_length=d.seq_length, seed=d.seed,
                                num_calibration=d.num_calibration, num_validation=d.num_validation,
                                num_selection=d.num_selection, num_train=d.num_train, text_field=d.text_field)

        sizes = on_rank0(write_data)  # a bad data source fails every rank
        log(f"[prepare] {sizes['windows']} sequences of {d.seq_length} tokens: " + ", ".join(
            f"{name} {sizes[name]}" for name in ("calibration", "validation", "selection", "train")))
        model = build_gpt_model(arch, **build_kwargs(recipe))
        try:
            load_hf_state_dict(model, state_dict, arch)
        except ValueError as err:  # missing tensors or other shapes
            raise ValueError(f"model.source {hf_dir}: its weights do not match its config.json: {err}") from None
        save_checkpoint(model, arch, run.teacher)
        log(f"[prepare] teacher {arch.num_parameters() / 1e6:.1f}M parameters -> {run.teacher}")


def _data_key(run: RunDir, train_split=None) -> str:
    """A digest of the training data: the run's split files (window indices into content-addressed token files), or
    the tokens of ``train_split``."""
    import hashlib

    digest = hashlib.blake2b(digest_size=16)
    if train_split is None:
        for name in ("windows.json", "train.npy"):
            digest.update((run.data / name).read_bytes())
    else:
        digest.update(torch.as_tensor(train_split[:], dtype=torch.int64).numpy().tobytes())
    return digest.hexdigest()


def _train(recipe: RecipeConfig, stage_cfg, model, arch, run: RunDir, out_dir: Path, forward_step=None,
           train_split=None, inputs: dict | None = None):
    """Megatron-Core training of ``model`` on ``train_split`` (default: the run's train split) with
    ``forward_step`` (default: LM loss); state (for resume) in out_dir/train_state, which records ``inputs`` and the
    data's digest: resuming from other inputs is refused."""
    from nemo_minitron.distillation.trainer import train

    cfg = stage_cfg.train_config(seed=recipe.data.seed,
                                 use_distributed_optimizer=recipe.parallel.use_distributed_optimizer)
    inputs = {**(inputs or {}), "data": _data_key(run, train_split)}
    train_split = run.split("train") if train_split is None else train_split
    return train(model, train_split, cfg, forward_step, validation=run.split("validation"), arch=arch,
                 checkpoint_dir=out_dir / "train_state", inputs=inputs)


def correct(recipe: RecipeConfig) -> None:
    """Teacher correction: fine-tune the teacher on the distillation data with the LM loss."""
    from nemo_minitron.models.checkpoint import fingerprint, save_checkpoint

    run = RunDir(recipe.run_dir)
    with timed(run, "correct-teacher"):
        model, arch = _load(run.require(run.teacher, "prepare"), recipe)
        history = _train(recipe, recipe.correct, model, arch, run, run.teacher_corrected,
                         inputs={"model": fingerprint(run.teacher)})
        save_checkpoint(model, arch, run.teacher_corrected)
        _write_json(run.teacher_corrected / "history.json", history)


def score_model(recipe: RecipeConfig, model_dir: Path, out_dir: Path):
    """ImportanceScores of the checkpoint ``model_dir`` (see ``score``), saved with their plots in ``out_dir``."""
    from nemo_minitron.importance.compute import compute_importance
    from nemo_minitron.importance.plots import plot_importance
    from nemo_minitron.models.checkpoint import fingerprint

    run = RunDir(recipe.run_dir)
    model, arch = _load(model_dir, recipe, local=True)
    s = recipe.score
    scores = compute_importance(
        model, arch, _local_split(run.split("calibration")), _local_split(run.split("selection")),
        seq_length=recipe.data.seq_length, micro_batch_size=s.micro_batch_size, seq_agg=s.seq_agg,
        batch_agg=s.batch_agg, depth_metrics=tuple(s.depth_metrics), block_sizes=tuple(s.block_sizes),
        screen_tokens=s.screen_tokens, screen_keep=s.screen_keep,
    )
    if s.block_task is not None:
        _score_blocks_on_task(recipe, model, scores)
    scores.check_finite(str(model_dir))
    scores.meta["model"] = fingerprint(model_dir)  # what prune checks its source against
    if is_rank0():
        scores.save(out_dir)
        plot_importance(scores, out_dir)
    log(f"[score] scores of {model_dir} and plots -> {out_dir}")
    return scores


def _score_blocks_on_task(recipe: RecipeConfig, model, scores) -> None:
    """meta["block_task"]: score.block_task's metric with each candidate block removed (the blocks confirmed after
    screening, else every block of each score.block_sizes); ImportanceScores.best_block then follows it."""
    from transformers import AutoTokenizer

    from nemo_minitron.importance.depth import block_task_metrics

    s, run = recipe.score, RunDir(recipe.run_dir)
    tokenizer = AutoTokenizer.from_pretrained(run.require(run.tokenizer, "prepare"))
    values = {}
    for k in s.block_sizes:
        confirmed = scores.meta.get("block_confirmed", {}).get(str(k))
        starts = sorted(map(int, confirmed)) if confirmed else range(len(scores.blocks[k]))
        values[str(k)] = {str(start): v for start, v in block_task_metrics(
            model, tokenizer, k, starts, s.block_task, s.block_task_metric, limit=s.block_task_limit,
            batch_size=recipe.eval.micro_batch_size, include_path=recipe.eval.task_path).items()}
        log(f"[score] {s.block_task} {s.block_task_metric} without {k} layers from each start: {values[str(k)]}")
    scores.meta["block_task"] = {"task": s.block_task, "metric": s.block_task_metric, "values": values}


def score(recipe: RecipeConfig) -> None:
    """Importance of every width axis and of layers, from forward passes over the calibration split; the
    loss-based depth metrics on the selection split (held out from the validation split that eval reports)."""
    run = RunDir(recipe.run_dir)
    with timed(run, "score"):
        score_model(recipe, run.require(run.active_teacher(), "prepare"), run.scores)


def prune_model(recipe: RecipeConfig, source_dir: Path, scores, target, out_dir: Path):
    """Prune a fresh copy of the checkpoint ``source_dir`` to ``target`` by ``scores``; saves the pruned
    checkpoint, plan.json and made_from.json (the source's fingerprint and the scores' digest) in ``out_dir``;
    returns the pruned ModelArch."""
    from nemo_minitron.models.checkpoint import fingerprint, save_checkpoint
    from nemo_minitron.pruning.apply import apply_plan
    from nemo_minitron.pruning.plan import make_plan

    model, arch = _load(source_dir, recipe, local=True)
    plan = make_plan(arch, scores, target)
    new_arch = apply_plan(model, arch, plan)
    save_checkpoint(model, new_arch, out_dir)
    _write_json(out_dir / "plan.json", plan.to_dict())
    _write_json(out_dir / MADE_FROM, {"model": fingerprint(source_dir), "scores": scores.digest()})
    log(f"[prune] {out_dir.name}: {arch.num_parameters() / 1e6:.1f}M -> {new_arch.num_parameters() / 1e6:.1f}M "
        f"parameters (layers {new_arch.num_layers}, hidden {new_arch.hidden_size}, ffn {new_arch.ffn_hidden_size}, "
        f"heads {new_arch.num_attention_heads}, groups {new_arch.num_query_groups})")
    return new_arch


MADE_FROM = "made_from.json"


def _check_made_from(run: RunDir, pruned_dir: Path) -> None:
    """ValueError when the pruned checkpoint ``pruned_dir`` was made from another teacher or other scores than the
    run's current ones (a stage re-run after pruning); a folder without made_from.json passes."""
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.models.checkpoint import fingerprint

    path = pruned_dir / MADE_FROM
    if not path.is_file():
        return
    made_from = json.loads(path.read_text())
    if made_from["model"] != fingerprint(run.active_teacher()):
        raise ValueError(f"{pruned_dir} was pruned from another model than the teacher {run.active_teacher()} (it "
                         "changed after pruning, e.g. correct-teacher ran again): run `minitron score` and "
                         "`minitron prune` again")
    if made_from["scores"] != ImportanceScores.load(run.scores).digest():
        raise ValueError(f"{pruned_dir} was pruned by other importance scores than those in {run.scores} (scored "
                         "again after pruning): run `minitron prune` again")


def prune(recipe: RecipeConfig) -> None:
    """Apply every prune target to a fresh copy of the teacher and save each pruned model; refused when the scores
    were computed from another model than the teacher."""
    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.models.checkpoint import fingerprint, load_arch

    run = RunDir(recipe.run_dir)
    if not recipe.prune:
        raise ValueError("prune: the recipe has no targets; add e.g. prune.width.hidden_size=...")
    with timed(run, "prune"):
        _check_model(recipe, load_arch(run.require(run.active_teacher(), "prepare")))
        scores, teacher = ImportanceScores.load(run.scores), fingerprint(run.active_teacher())
        if scores.meta.get("model", teacher) != teacher:
            raise ValueError(f"the scores in {run.scores} were computed from another model than the teacher "
                             f"{run.active_teacher()} (it changed after scoring, e.g. correct-teacher ran again): "
                             "run `minitron score` again")
        for name, target in recipe.prune.items():
            prune_model(recipe, run.active_teacher(), scores, target, run.pruned(name))


def distill_model(recipe: RecipeConfig, student, arch, out_dir: Path, d, teacher_dir: Path | None,
                  student_source: str, train_split=None) -> list[dict]:
    """Train ``student`` (a model of ``arch``) with the settings ``d`` (a DistillConfig) into ``out_dir``: logit
    distillation from the checkpoint ``teacher_dir`` (live, or its cached top-K log-probs with
    d.cached_teacher_top_k), or the LM loss alone when ``teacher_dir`` is None; on ``train_split`` (default: the
    run's train split). ``student_source`` names the initial student (the fingerprint of its checkpoint, or how it
    was initialised): with the teacher's fingerprint, the data and the loss settings it guards resuming. Saves the
    checkpoint, history.json and the Hugging Face export (hf/); returns the history."""
    from transformers import AutoTokenizer

    from nemo_minitron.data.order import rows_read
    from nemo_minitron.distillation.forward_step import ForwardStep
    from nemo_minitron.distillation.intermediate import IntermediateLoss
    from nemo_minitron.distillation.losses import VocabParallelKDLoss
    from nemo_minitron.distillation.teacher import CachedTopKKLLoss, Teacher, cached_teacher
    from nemo_minitron.models.checkpoint import fingerprint, save_checkpoint
    from nemo_minitron.models.hf_convert import save_hf_checkpoint

    run = RunDir(recipe.run_dir)
    inputs = {"student": student_source, "teacher": None if teacher_dir is None else fingerprint(teacher_dir),
              "loss": {k: getattr(d, k) for k in ("loss", "temperature", "top_k", "cached_teacher_top_k",
                                                  "lm_loss_weight", "intermediate_pairs", "intermediate_loss",
                                                  "intermediate_weight", "balance_losses")}}
    split_given = train_split
    train_split = run.split("train") if train_split is None else train_split
    if teacher_dir is None:
        forward_step = ForwardStep()
    else:
        if d.cached_teacher_top_k is None:
            teacher = Teacher(_load(teacher_dir, recipe)[0])
            loss = VocabParallelKDLoss(kind=d.loss, temperature=d.temperature, top_k=d.top_k,
                                       chunk_size=d.chunk_size)
        else:
            rows = rows_read(train_split.shape[0], d.steps, d.global_batch_size, recipe.data.seed)
            teacher = cached_teacher(teacher_dir, train_split[rows], d.cached_teacher_top_k,
                                     lambda: _load(teacher_dir, recipe)[0], d.micro_batch_size)
            loss = CachedTopKKLLoss(temperature=d.temperature)
        intermediate = None
        if d.intermediate_pairs:  # pair indices are checked against both models when training starts
            intermediate = IntermediateLoss(d.intermediate_pairs, kind=d.intermediate_loss,
                                            weight=d.intermediate_weight, balance=d.balance_losses)
        forward_step = ForwardStep(teacher, loss, lm_loss_weight=d.lm_loss_weight, intermediate=intermediate,
                                   fuse_output_layer=d.fuse_output_layer)
    history = _train(recipe, d, student, arch, run, out_dir, forward_step, split_given, inputs)
    save_checkpoint(student, arch, out_dir)
    _write_json(out_dir / "history.json", history)
    tokenizer = AutoTokenizer.from_pretrained(run.tokenizer) if run.tokenizer.exists() else None
    save_hf_checkpoint(student, arch, out_dir / "hf", tokenizer=tokenizer)
    return history


def distill(recipe: RecipeConfig) -> None:
    """Logit distillation of the chosen pruned student from the teacher (live, or its cached top-K log-probs:
    distill.cached_teacher_top_k); exports the result to Hugging Face."""
    from nemo_minitron.models.checkpoint import fingerprint

    run = RunDir(recipe.run_dir)
    d = recipe.distill
    with timed(run, "distill"):
        _check_made_from(run, run.require(run.pruned(d.student), "prune"))
        student, arch = _load(run.pruned(d.student), recipe)
        out = run.distilled(d.student)
        distill_model(recipe, student, arch, out, d, run.active_teacher(), fingerprint(run.pruned(d.student)))
        log(f"[distill] {d.student} student -> {out} (Hugging Face export in {out / 'hf'})")


def compress_rounds(recipe: RecipeConfig) -> None:
    """Multi-round compression (recipe ``rounds``): round 1 prunes its target from the teacher by the run's scores
    and distils it from the teacher; each later round scores the previous round's distilled student
    (rounds/<previous>/scores), prunes its own target from it and distils it from it, for the round's steps."""
    from dataclasses import replace

    from nemo_minitron.importance.scores import ImportanceScores
    from nemo_minitron.models.checkpoint import fingerprint

    run = RunDir(recipe.run_dir)
    source = run.active_teacher()
    with timed(run, "rounds"):
        for i, r in enumerate(recipe.rounds):
            if i == 0:
                scores = ImportanceScores.load(run.require(run.scores, "score"))
            else:
                scores = score_model(recipe, source, run.root / "rounds" / source.name / "scores")
            prune_model(recipe, source, scores, recipe.prune[r.target], run.pruned(r.target))
            student, arch = _load(run.pruned(r.target), recipe)
            d = replace(recipe.distill, steps=r.steps, student=r.target)
            distill_model(recipe, student, arch, run.distilled(r.target), d, source,
                          fingerprint(run.pruned(r.target)))
            log(f"[rounds] round {i + 1}: {r.target} ({arch.num_parameters() / 1e6:.1f}M) distilled from "
                f"{source.relative_to(run.root)}")
            source = run.distilled(r.target)


def evaluate(recipe: RecipeConfig) -> dict:
    """Validation loss of the teacher and of every pruned and distilled model present in the run folder, and their
    lm-evaluation-harness scores on eval.tasks (under "tasks"), if any."""
    from nemo_minitron.evaluation.loss import validation_loss

    run = RunDir(recipe.run_dir)
    ev = recipe.eval
    if ev.tasks:
        from transformers import AutoTokenizer

        from nemo_minitron.evaluation.lm_eval_adapter import evaluate_tasks

        tokenizer = AutoTokenizer.from_pretrained(run.require(run.tokenizer, "prepare"))
    results = {}
    with timed(run, "eval"):
        validation = _local_split(run.split("validation"))
        candidates = [("teacher", run.teacher)]
        if run.teacher_corrected.exists():
            candidates.append(("teacher (corrected)", run.teacher_corrected))
        candidates += [(f"pruned/{p.name}", p) for p in sorted((run.root / "pruned").glob("*"))]
        candidates += [(f"distilled/{p.name}", p) for p in sorted((run.root / "distilled").glob("*"))]
        for label, path in candidates:
            if not (path / "arch.json").exists():
                continue
            model, arch = _load(path, recipe)
            loss = validation_loss(model, validation, recipe.eval.micro_batch_size)
            results[label] = {"val_loss": loss, "perplexity": float(torch.tensor(loss).exp()),
                              "params": arch.num_parameters(), "arch": arch.to_dict()}
            log(f"[eval] {label:24s} val loss {loss:.4f}  ppl {results[label]['perplexity']:.1f}")
            if ev.tasks:
                results[label]["tasks"] = evaluate_tasks(
                    model, tokenizer, ev.tasks, num_fewshot=ev.num_fewshot, limit=ev.task_limit,
                    batch_size=ev.micro_batch_size, include_path=ev.task_path)
                for task, metrics in results[label]["tasks"].items():
                    log(f"[eval] {label:24s} {task}: " + "  ".join(
                        f"{name} {value:.4g}" for name, value in metrics.items() if not name.endswith("_stderr")))
            del model
        _write_json(run.eval, results)
    return results


def report(recipe: RecipeConfig) -> str:
    """Markdown table of the run (+ loss-curve plot) in report.md; returns the markdown."""
    from nemo_minitron.report import write_report

    run = RunDir(recipe.run_dir)
    return write_report(run, recipe) if is_rank0() else ""


STAGES = {"prepare": prepare, "correct-teacher": correct, "score": score, "prune": prune, "distill": distill,
          "rounds": compress_rounds, "eval": evaluate, "report": report}


def run_all(recipe: RecipeConfig) -> str:
    """Every stage in order (teacher correction only if enabled); with ``rounds``, the rounds stage replaces prune
    and distill; returns the report markdown."""
    skip = {correct} if not recipe.correct.enabled else set()
    skip |= {prune, distill} if recipe.rounds else {compress_rounds}
    for name, stage in STAGES.items():
        if stage in skip:
            continue
        log(f"\n=== {name} ===")
        result = stage(recipe)
    return result
