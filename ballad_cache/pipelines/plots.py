"""Figures: per-class accuracy against training count, and the sweep heatmap (matplotlib, Agg, imported late)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: str | Path) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_per_class(result: dict[str, Any], path: str | Path, heads: list[str] | None = None) -> Path:
    """Per-class accuracy against training count (log x), shot-group boundaries marked, heads side by side."""
    plt = _pyplot()
    counts = np.asarray(result["train_class_counts"])
    heads = heads or list(result["heads"])
    order = np.argsort(-counts, kind="stable")
    fig, ax = plt.subplots(figsize=(8, 4.5))
    x = np.arange(len(order))
    width = 0.8 / len(heads)
    for j, head in enumerate(heads):
        acc = np.asarray(result["heads"][head]["per_class"])[order]
        if len(order) <= 60:
            ax.bar(x + (j - (len(heads) - 1) / 2) * width, acc, width=width, label=head)
        else:
            ax.plot(x, acc, ".", ms=3, label=head)
    t = result["thresholds"]
    for bound in (t["many"], t["few"]):
        cut = int((counts[order] > bound).sum()) if bound == t["many"] else int((counts[order] >= bound).sum())
        ax.axvline(cut - 0.5, color="grey", ls="--", lw=1)
    ax2 = ax.twinx()
    ax2.plot(x, counts[order], color="black", lw=1, label="train count")
    ax2.set_yscale("log")
    ax2.set_ylabel("training images (log)")
    ax.set_xlabel("classes, most to fewest training images  |  many | medium | few")
    ax.set_ylabel(f"{result['split']} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Per-class accuracy vs training count")
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_heatmap(
    values: np.ndarray,
    rows: list[str],
    cols: list[str],
    title: str,
    path: str | Path,
    row_label: str,
    col_label: str,
) -> Path:
    """A labelled heatmap (sweep metric over two hyperparameters)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 2, 0.8 * len(rows) + 1.5))
    im = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)), cols)
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    for i in range(len(rows)):
        for j in range(len(cols)):
            if np.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color="white", fontsize=8)
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    fig.tight_layout()
    return _save(plt, fig, path)


def plot_prediction_grid(
    images: list[Any], predicted: list[str], true: list[str | None], path: str | Path, columns: int = 5
) -> Path:
    """A grid of images titled with the predicted class (and the true one, green when right, red when wrong)."""
    plt = _pyplot()
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.0 * columns, 2.3 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, pred, label in zip(axes.ravel(), images, predicted, true, strict=False):
        ax.imshow(image, cmap="gray" if getattr(image, "mode", "") == "L" else None)
        colour = "black" if label is None else ("green" if pred == label else "red")
        ax.set_title(pred if label is None else f"{pred}\n(true: {label})", fontsize=8, color=colour)
    fig.tight_layout()
    return _save(plt, fig, path)
