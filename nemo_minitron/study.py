"""`minitron study`: does Minitron pay on this model and data? Arms of the same student size trained on the same
token budget (distill.steps x distill.global_batch_size x data.seq_length tokens, the same train sequences in the
same order), each evaluated on the validation split, which no arm selects on (scores and the block search use the
calibration and selection splits):

  minitron_width               width target pruned by importance from the corrected teacher, KD from it
  minitron_width_uncorrected   the same from the original teacher (its own scores), KD from it
  depth_block_search           depth target, the contiguous block of least loss dropped, KD
  depth_block_influence        depth target, the layers of least Block Influence dropped, KD
  width_random_importance      the width target's shape with random importance scores, KD
  scratch_lm                   the width target's shape from random initialisation, LM loss
  scratch_kd                   the same initialisation, KD
  sdg_lm                       the minitron_width student, LM loss on text sampled from the teacher instead of KD
  two_rounds                   round 1 prunes study.round_target from the teacher and distils it for half the steps;
                               round 2 prunes the width target from that student and distils from it (rest)

KD = forward KL to the corrected teacher (its cached top-K log-probs when distill.cached_teacher_top_k is set).
Every finished arm is kept in <run>/study/arms/<arm>.json, so an interrupted study resumes at the next arm (and a
half-trained arm from its last checkpoint). Writes <run>/study/quality.json and plots; tokens-to-match = tokens
the scratch_lm arm needs to reach the minitron_width arm's final loss / tokens minitron_width used. With
search.params set, the study ends with `minitron search` on its teacher and scores and reports whether the short KD
changed the candidates' ranking.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from nemo_minitron import pipeline
from nemo_minitron.config import RecipeConfig, RoundConfig
from nemo_minitron.pipeline import RunDir, log

ARMS = ("minitron_width", "minitron_width_uncorrected", "depth_block_search", "depth_block_influence",
        "width_random_importance", "scratch_lm", "scratch_kd", "sdg_lm", "two_rounds")


class Study:
    """The arms of one study over one run folder (see module docstring)."""

    def __init__(self, recipe: RecipeConfig):
        if dist.get_world_size() > 1:
            raise ValueError("minitron study runs in one process: start it without torchrun")
        s = recipe.study
        for key in ("width_target", "depth_target", "round_target"):
            if getattr(s, key) not in recipe.prune:
                raise ValueError(f"study.{key}: {getattr(s, key)!r} is not a prune target; allowed: "
                                 f"{sorted(recipe.prune)}")
        unknown = sorted(set(s.arms) - set(ARMS))
        if unknown:
            raise ValueError(f"study.arms: unknown {unknown}; allowed: {list(ARMS)}")
        if not recipe.correct.enabled:
            raise ValueError("minitron study compares arms with and without teacher correction: set "
                             "correct.enabled=true")
        self.recipe, self.run = recipe, RunDir(recipe.run_dir)
        self.out = self.run.root / "study"
        self.tokens_per_step = recipe.distill.global_batch_size * recipe.data.seq_length

    # ------------------------------------------------------------------------------------------ shared stages

    def prepare(self) -> None:
        """prepare, correct-teacher and score, each skipped when its output exists."""
        run = self.run
        if not (run.teacher / "arch.json").exists():
            pipeline.prepare(self.recipe)
        if not (run.teacher_corrected / "arch.json").exists():
            pipeline.correct(self.recipe)
        if not (run.scores / "scores.safetensors").exists():
            pipeline.score(self.recipe)

    def _scores(self, teacher: Path):
        from nemo_minitron.importance.scores import ImportanceScores

        if teacher == self.run.teacher_corrected:
            return ImportanceScores.load(self.run.scores)
        folder = self.out / "scores_uncorrected"
        if (folder / "scores.safetensors").exists():
            return ImportanceScores.load(folder)
        return pipeline.score_model(self.recipe, teacher, folder)

    def _random_scores(self):
        """Scores of the teacher's shapes drawn uniformly at random (seeded by data.seed)."""
        from nemo_minitron.importance.scores import ImportanceScores

        real = ImportanceScores.load(self.run.scores)
        generator = torch.Generator().manual_seed(self.recipe.data.seed)
        rand = {name: torch.rand(getattr(real, name).shape, generator=generator)
                for name in ("hidden", "ffn", "heads", "groups")}
        return ImportanceScores(**rand, layers=real.layers, blocks=real.blocks, meta=real.meta)

    def _sdg_split(self, teacher: Path) -> torch.Tensor:
        """Teacher-generated training text: for each train row that distillation reads, its first
        study.sdg_prompt_tokens tokens continued by sampling from the teacher (temperature study.sdg_temperature)
        to a window of data.seq_length + 1 tokens; cached in study/sdg_train.npy."""
        from transformers import AutoModelForCausalLM
        from tqdm import tqdm

        from nemo_minitron.data.order import rows_read
        from nemo_minitron.models.hf_convert import save_hf_checkpoint

        path = self.out / "sdg_train.npy"
        if path.exists():
            return torch.from_numpy(np.load(path))
        r, s, d = self.recipe, self.recipe.study, self.recipe.distill
        train = self.run.split("train")
        prompts = train[rows_read(train.shape[0], d.steps, d.global_batch_size, r.data.seed)][:, :s.sdg_prompt_tokens]
        model, arch = pipeline._load(teacher, r)
        hf_dir = self.out / "teacher_hf"
        save_hf_checkpoint(model, arch, hf_dir)
        del model
        hf = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
        new_tokens = r.data.seq_length + 1 - s.sdg_prompt_tokens
        torch.manual_seed(r.data.seed)
        rows = []
        with torch.no_grad():
            for start in tqdm(range(0, prompts.shape[0], s.sdg_batch_size), desc="sampling teacher text"):
                batch = prompts[start:start + s.sdg_batch_size]
                rows.append(hf.generate(batch, attention_mask=torch.ones_like(batch), do_sample=True, top_k=0,
                                        temperature=s.sdg_temperature, max_new_tokens=new_tokens,
                                        min_new_tokens=new_tokens, pad_token_id=0))
        sequences = torch.cat(rows)
        self.out.mkdir(parents=True, exist_ok=True)
        np.save(path, sequences.numpy())
        return sequences

    # ------------------------------------------------------------------------------------------------- arms

    def _pruned_student(self, arm: str, teacher: Path, scores, target):
        """Prune ``target`` from ``teacher`` by ``scores`` into pruned/<arm>; (model, arch) to train."""
        pipeline.prune_model(self.recipe, teacher, scores, target, self.run.pruned(arm))
        return pipeline._load(self.run.pruned(arm), self.recipe)

    def _random_student(self):
        from nemo_minitron.models.build import build_gpt_model
        from nemo_minitron.models.checkpoint import load_arch
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        arch = self.recipe.prune[self.recipe.study.width_target].new_arch(load_arch(self.run.teacher))
        torch.manual_seed(self.recipe.data.seed)  # Megatron's initialisation draws from these generators
        model_parallel_cuda_manual_seed(self.recipe.data.seed)
        return build_gpt_model(arch, **pipeline.build_kwargs(self.recipe)), arch

    def run_arm(self, arm: str) -> dict:
        """Train one arm; its record: params, arch, tokens / val_loss curve (step 0 included), seconds."""
        from nemo_minitron.evaluation.loss import validation_loss
        from nemo_minitron.models.checkpoint import fingerprint

        r, run, s = self.recipe, self.run, self.recipe.study
        corrected, original = run.teacher_corrected, run.teacher
        width, depth = r.prune[s.width_target], r.prune[s.depth_target]
        teacher, train = corrected, None
        start = time.perf_counter()
        if arm == "two_rounds":
            return self._two_rounds(start)
        if arm == "minitron_width":
            model, arch = self._pruned_student(arm, corrected, self._scores(corrected), width)
        elif arm == "minitron_width_uncorrected":
            teacher = original
            model, arch = self._pruned_student(arm, original, self._scores(original), width)
        elif arm == "depth_block_search":
            model, arch = self._pruned_student(arm, corrected, self._scores(corrected),
                                               replace(depth, layer_metric="block_search"))
        elif arm == "depth_block_influence":
            model, arch = self._pruned_student(arm, corrected, self._scores(corrected),
                                               replace(depth, layer_metric="block_influence"))
        elif arm == "width_random_importance":
            model, arch = self._pruned_student(arm, corrected, self._random_scores(), width)
        elif arm in ("scratch_lm", "scratch_kd"):
            model, arch = self._random_student()
            teacher = corrected if arm == "scratch_kd" else None
        else:  # sdg_lm
            train = self._sdg_split(corrected)
            model, arch = self._pruned_student(arm, corrected, self._scores(corrected), width)
            teacher = None
        d = r.distill
        if arm.startswith("scratch") and s.scratch_lr is not None:
            d = replace(d, lr=s.scratch_lr, min_lr=d.min_lr * s.scratch_lr / d.lr)
        initial = validation_loss(model, run.split("validation")[:], r.eval.micro_batch_size)
        source = (f"random initialisation, seed {r.data.seed}" if arm.startswith("scratch")
                  else fingerprint(run.pruned(arm)))
        history = pipeline.distill_model(r, model, arch, run.distilled(arm), d, teacher, source, train)
        return self._record(arch, [(0, initial)] + _evals(history), start, str(run.distilled(arm)))

    def _two_rounds(self, start: float) -> dict:
        from nemo_minitron.evaluation.loss import validation_loss
        from nemo_minitron.models.checkpoint import load_arch

        r, s = self.recipe, self.recipe.study
        first = r.distill.steps // 2
        rounds_recipe = replace(r, rounds=[RoundConfig(target=s.round_target, steps=first),
                                           RoundConfig(target=s.width_target, steps=r.distill.steps - first)])
        pipeline.compress_rounds(rounds_recipe)
        model, _ = pipeline._load(self.run.pruned(s.round_target), r)
        curve = [(0, validation_loss(model, self.run.split("validation")[:], r.eval.micro_batch_size))]
        for i, target in enumerate((s.round_target, s.width_target)):
            history = json.loads((self.run.distilled(target) / "history.json").read_text())
            curve += [(step + i * first, loss) for step, loss in _evals(history)]
        arch = load_arch(self.run.distilled(s.width_target))
        return self._record(arch, curve, start, str(self.run.distilled(s.width_target)))

    def _record(self, arch, curve, start: float, path: str) -> dict:
        return {"params": arch.num_parameters(), "arch": arch.to_dict(),
                "tokens": [step * self.tokens_per_step for step, _ in curve], "val_loss": [v for _, v in curve],
                "final_val_loss": curve[-1][1], "seconds": round(time.perf_counter() - start, 1), "checkpoint": path}

    # ------------------------------------------------------------------------------------------------ study

    def run_all(self) -> dict:
        self.prepare()
        arms_dir = self.out / "arms"
        arms_dir.mkdir(parents=True, exist_ok=True)
        records = {}
        for i, arm in enumerate(self.recipe.study.arms):
            path = arms_dir / f"{arm}.json"
            if path.exists():
                records[arm] = json.loads(path.read_text())
                log(f"[study] arm {i + 1}/{len(self.recipe.study.arms)} {arm}: done before, kept")
                continue
            log(f"\n[study] arm {i + 1}/{len(self.recipe.study.arms)}: {arm}")
            records[arm] = self.run_arm(arm)
            path.write_text(json.dumps(records[arm], indent=1) + "\n")
            log(f"[study] {arm}: final val loss {records[arm]['final_val_loss']:.4f} "
                f"({records[arm]['seconds']:.0f} s)")
        return self.summarise(records, self.search())

    def search(self) -> dict | None:
        """With search.params set: `minitron search` on the study's teacher and scores (kept when it ran before from
        the same settings); every candidate's pruned loss and the top_k's loss after search.steps of KD, and whether
        KD changed the ranking (candidate losses are on the selection split, as the search selects on it)."""
        from nemo_minitron.search import finished, run_search

        if self.recipe.search.params is None:
            return None
        out = self.run.root / "search"
        choice = finished(self.recipe)
        if choice is not None:
            log("[study] architecture search: done before from the same settings, kept")
        else:
            log(f"\n[study] architecture search within {self.recipe.search.params / 1e6:.1f}M parameters")
            choice = run_search(self.recipe)
        table = json.loads((out / "candidates.json").read_text())
        return {"params_budget": self.recipe.search.params, "candidates": len(table),
                "top_k": sorted((r for r in table if "distilled_loss" in r), key=lambda r: r["pruned_rank"]),
                "steps": self.recipe.search.steps, "chosen": choice["chosen"]["name"],
                "ranking_changed": choice["ranking_changed"]}

    def summarise(self, records: dict, search: dict | None = None) -> dict:
        from nemo_minitron.evaluation.loss import validation_loss

        teacher = {}
        for label, path in (("teacher", self.run.teacher), ("teacher (corrected)", self.run.teacher_corrected)):
            model, arch = pipeline._load(path, self.recipe)
            teacher[label] = {"params": arch.num_parameters(), "val_loss": validation_loss(
                model, self.run.split("validation")[:], self.recipe.eval.micro_batch_size)}
        d = self.recipe.distill
        quality = {"budget_tokens": d.steps * self.tokens_per_step, "seq_length": self.recipe.data.seq_length,
                   "global_batch_size": d.global_batch_size, "steps": d.steps,
                   "correction_tokens": self.recipe.correct.steps * self.recipe.correct.global_batch_size
                   * self.recipe.data.seq_length,
                   "validation_sequences": self.run.split("validation").shape[0],
                   "teachers": teacher, "arms": records}
        if "minitron_width" in records and "scratch_lm" in records:
            quality["tokens_to_match"] = tokens_to_match(records["scratch_lm"], records["minitron_width"])
        if search is not None:
            quality["search"] = search
        (self.out / "quality.json").write_text(json.dumps(quality, indent=1) + "\n")
        plot_study(quality, self.out)
        (self.out / "quality.md").write_text(quality_table(quality) + "\n")
        log("\n" + quality_table(quality))
        return quality


def _evals(history: list[dict]) -> list[tuple[int, float]]:
    return [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]


def tokens_to_reach(arm: dict, target: float) -> float | None:
    """Tokens at which ``arm``'s validation curve first reaches ``target`` (linear interpolation between its
    evaluations); None when it never does."""
    points = list(zip(arm["tokens"], arm["val_loss"]))
    if points[0][1] <= target:
        return points[0][0]
    for (t0, l0), (t1, l1) in zip(points, points[1:]):
        if l1 <= target:
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def tokens_to_match(scratch: dict, minitron: dict) -> dict:
    """Tokens the scratch curve needs to reach minitron's final loss / minitron's tokens. When the scratch arm never
    gets there within its budget the ratio is only a lower bound (its budget / minitron's tokens), and the converse
    is measured: scratch's tokens / the tokens minitron needed to reach scratch's final loss."""
    target, used = minitron["final_val_loss"], minitron["tokens"][-1]
    tokens = tokens_to_reach(scratch, target)
    if tokens is not None:
        return {"reached": True, "scratch_tokens": tokens, "minitron_tokens": used, "ratio": tokens / used}
    budget = scratch["tokens"][-1]
    converse = tokens_to_reach(minitron, scratch["final_val_loss"])
    return {"reached": False, "scratch_tokens_at_least": budget, "minitron_tokens": used,
            "ratio_at_least": budget / used, "scratch_final_val_loss": scratch["final_val_loss"],
            "minitron_final_val_loss": target, "minitron_tokens_to_scratch_final": converse,
            "converse_ratio": None if converse is None else budget / max(converse, 1)}


def quality_table(quality: dict) -> str:
    rows = ["| arm | params (M) | val loss at 0 tokens | final val loss | train time (s) |",
            "|---|---:|---:|---:|---:|"]
    for label, t in quality["teachers"].items():
        rows.append(f"| {label} | {t['params'] / 1e6:.1f} | | {t['val_loss']:.3f} | |")
    for arm, r in sorted(quality["arms"].items(), key=lambda item: item[1]["final_val_loss"]):
        rows.append(f"| {arm} | {r['params'] / 1e6:.1f} | {r['val_loss'][0]:.3f} | {r['final_val_loss']:.3f} | "
                    f"{r['seconds']:.0f} |")
    match = quality.get("tokens_to_match")
    if match:
        line = (f"{match['ratio']:.1f}x" if match["reached"] else
                f"more than {match['ratio_at_least']:.1f}x (scratch_lm never reached "
                f"{match['minitron_final_val_loss']:.3f} within its budget: {match['scratch_final_val_loss']:.3f})")
        if not match["reached"] and match["converse_ratio"] is not None:
            line += (f"; minitron_width reached scratch_lm's final loss after "
                     f"{match['minitron_tokens_to_scratch_final']:,.0f} tokens, {match['converse_ratio']:.1f}x fewer "
                     f"than scratch_lm's {match['scratch_tokens_at_least']:,}")
        rows.append(f"\nTokens to match (scratch_lm tokens to reach minitron_width's final loss / its tokens): {line}")
    search = quality.get("search")
    if search:
        rows += [f"\nArchitecture search within {search['params_budget'] / 1e6:.1f}M parameters: "
                 f"{search['candidates']} candidates ranked by pruned selection loss; the best "
                 f"{len(search['top_k'])} after {search['steps']} KD steps (the ranking "
                 f"{'changed' if search['ranking_changed'] else 'did not change'}; chosen: {search['chosen']})\n",
                 "| candidate | hidden / ffn / heads / layers | params (M) | pruned loss (rank) | "
                 "after KD (rank) |", "|---|---|---:|---:|---:|"]
        for r in search["top_k"]:
            t = r["target"]
            rows.append(f"| {r['name']} | {t['hidden_size']} / {t['ffn_hidden_size']} / "
                        f"{t['num_attention_heads']} / {t['num_layers']} | {r['params'] / 1e6:.1f} | "
                        f"{r['pruned_loss']:.3f} ({r['pruned_rank']}) | {r['distilled_loss']:.3f} "
                        f"({r['distilled_rank']}) |")
    return "\n".join(rows)


def plot_study(quality: dict, out: Path) -> None:
    """study/loss_vs_tokens.png (validation loss per arm against training tokens) and study/params_vs_loss.png."""
    from nemo_minitron.report import plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for arm, r in quality["arms"].items():
        ax.plot(np.array(r["tokens"]) / 1e3, r["val_loss"], marker=".", label=arm)
    for label, t in quality["teachers"].items():
        ax.axhline(t["val_loss"], linestyle=":", color="gray", linewidth=1)
        ax.annotate(label, (0, t["val_loss"]), fontsize=7, color="gray", xytext=(2, 2), textcoords="offset points")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title("Same student size, same tokens: validation loss per arm")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "loss_vs_tokens.png", dpi=120)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(6, 4))
    points = {**{k: (t["params"], t["val_loss"]) for k, t in quality["teachers"].items()},
              **{k: (r["params"], r["final_val_loss"]) for k, r in quality["arms"].items()}}
    for label, (params, loss) in points.items():
        ax.scatter(params / 1e6, loss, s=30)
        ax.annotate(label, (params / 1e6, loss), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("final validation loss")
    ax.set_title("Size vs quality after the same token budget")
    fig.tight_layout()
    fig.savefig(out / "params_vs_loss.png", dpi=120)
    plt.close(fig)
