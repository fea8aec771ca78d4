"""The run report: a markdown table of every model's size and validation loss, stage timings, and plots."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def model_table(results: dict) -> str:
    """Markdown table: one row per evaluated model, loss change relative to the teacher."""
    base = results.get("teacher", {}).get("val_loss")
    rows = ["| model | params (M) | layers | hidden | ffn | heads / groups | val loss | ppl | vs teacher |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for label, r in results.items():
        a = r["arch"]
        delta = "" if base is None or label == "teacher" else f"{r['val_loss'] - base:+.3f}"
        rows.append(f"| {label} | {r['params'] / 1e6:.1f} | {a['num_layers']} | {a['hidden_size']} | "
                    f"{a['ffn_hidden_size']} | {a['num_attention_heads']} / {a['num_query_groups']} | "
                    f"{r['val_loss']:.3f} | {r['perplexity']:.1f} | {delta} |")
    return "\n".join(rows)


def plot_loss_curves(histories: dict[str, list[dict]], baselines: dict[str, float], path: Path) -> None:
    """Training objective per step and validation LM loss where measured, against the baselines' LM loss."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, history in histories.items():
        steps = [h["step"] for h in history]
        ax.plot(steps, [h["loss"] for h in history], marker=".", label=f"{label}: training objective")
        evals = [(h["step"], h["val_loss"]) for h in history if h.get("val_loss") is not None]
        if evals:
            ax.plot(*zip(*evals), marker="o", linestyle="--", label=f"{label}: validation LM loss")
    colors = ["tab:gray", "tab:red", "tab:purple", "tab:brown", "tab:olive", "tab:cyan"]
    for (label, value), color in zip(baselines.items(), colors * 4):
        ax.axhline(value, color=color, linestyle=":", linewidth=1.2, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / token)")
    ax.set_title("Training curves")
    ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_model_losses(results: dict, path: Path) -> None:
    """Validation loss against parameter count for every evaluated model."""
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, r in results.items():
        ax.scatter(r["params"] / 1e6, r["val_loss"], s=40)
        ax.annotate(label, (r["params"] / 1e6, r["val_loss"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("parameters (M)")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title("Size vs quality")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(run, recipe) -> str:
    """Write report.md and plots/ in the run folder from eval.json, timings.json and training histories."""
    if not run.eval.exists():
        raise FileNotFoundError(f"{run.eval} is missing: run `minitron eval --run {run.root}` first")
    results = json.loads(run.eval.read_text())
    timings = json.loads(run.timings.read_text()) if run.timings.exists() else {}
    run.plots.mkdir(parents=True, exist_ok=True)
    histories = {}
    for label, folder in [("teacher correction", run.teacher_corrected)] + [
            (f"distill {p.name}", p) for p in sorted((run.root / "distilled").glob("*"))]:
        if (folder / "history.json").exists():
            histories[label] = json.loads((folder / "history.json").read_text())
    baselines = {f"{k} val loss": v["val_loss"] for k, v in results.items() if not k.startswith("distilled")}
    lines = [f"# Minitron run: {recipe.name}", "", model_table(results), ""]
    plot_model_losses(results, run.plots / "size_vs_loss.png")
    lines.append("![size vs loss](plots/size_vs_loss.png)")
    if histories:
        plot_loss_curves(histories, baselines, run.plots / "loss_curve.png")
        lines.append("![loss curve](plots/loss_curve.png)")
    for png in sorted(run.scores.glob("*.png")):
        lines.append(f"![{png.stem}]({png.relative_to(run.root)})")
    if timings:
        lines += ["", "| stage | seconds |", "|---|---:|"]
        lines += [f"| {k} | {v:.0f} |" for k, v in timings.items()]
        lines.append(f"| total | {sum(timings.values()):.0f} |")
    d = recipe.data
    source = ", ".join(f"`{path}` ({weight:.0%})" for path, weight in d.sources()) if len(d.sources()) > 1 \
        else f"`{d.source}`"
    lines += ["", f"Data: {source}, sequences of {d.seq_length} tokens; calibration {d.num_calibration}, "
              f"selection (depth search) {d.num_selection}, validation (this table) {d.num_validation}. "
              f"Distillation: {recipe.distill.loss}, T={recipe.distill.temperature}, "
              f"{recipe.distill.steps} steps x {recipe.distill.global_batch_size} sequences, "
              f"lr {recipe.distill.lr} cosine to {recipe.distill.min_lr}."]
    markdown = "\n".join(lines) + "\n"
    run.report.write_text(markdown)
    return markdown
