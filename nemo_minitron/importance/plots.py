"""PNG plots of ImportanceScores (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from nemo_minitron.importance.scores import ImportanceScores  # noqa: E402


def _heatmap(path: Path, values, title: str, xlabel: str) -> Path:
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.25 * values.shape[0]))
    image = ax.imshow(values.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(image, ax=ax)
    ax.set(title=title, xlabel=xlabel, ylabel="layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_importance(scores: ImportanceScores, out_dir: str | Path) -> list[Path]:
    """Write heads.png, groups.png, ffn.png (layers x heads / groups / neurons; neurons sorted descending per layer),
    hidden.png (hidden-channel scores sorted, log scale when positive) and, if depth scores exist, layers.png (one
    panel per layer metric, plus the block-search losses against the block's first layer). Returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [
        _heatmap(out_dir / "heads.png", scores.heads, "attention head importance", "head"),
        _heatmap(out_dir / "groups.png", scores.groups, "KV query group importance", "query group"),
        _heatmap(out_dir / "ffn.png", scores.ffn.sort(dim=1, descending=True).values,
                 "MLP neuron importance (sorted per layer)", "neuron rank"),
    ]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(scores.hidden.sort(descending=True).values.numpy())
    ax.set(title="hidden-channel importance (sorted)", xlabel="channel rank", ylabel="importance",
           yscale="log" if bool((scores.hidden > 0).all()) else "linear")
    fig.tight_layout()
    fig.savefig(out_dir / "hidden.png", dpi=100)
    plt.close(fig)
    paths.append(out_dir / "hidden.png")

    panels = len(scores.layers) + (1 if scores.blocks else 0)
    if panels:
        fig, axes = plt.subplots(panels, 1, figsize=(8, 3 * panels), squeeze=False)
        for ax, (metric, values) in zip(axes[:, 0], scores.layers.items()):
            ax.plot(values.numpy(), marker="o")
            ax.set(title=f"layer importance: {metric}", xlabel="layer", ylabel=metric)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if scores.blocks:
            ax = axes[-1, 0]
            for k, losses in sorted(scores.blocks.items()):
                ax.plot(losses.numpy(), marker="o", label=f"k={k}")
            ax.set(title="validation loss with layers start..start+k-1 removed", xlabel="start layer",
                   ylabel="loss")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "layers.png", dpi=100)
        plt.close(fig)
        paths.append(out_dir / "layers.png")
    return paths
