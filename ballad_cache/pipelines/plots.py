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


GROUP_COLOURS = {"many": "#4c72b0", "medium": "#dd8452", "few": "#55a868"}
LABELLED_CLASSES = 60  # up to this many classes the x axis names each one; past it, points and a rolling mean


def plot_per_class(result: dict[str, Any], path: str | Path, heads: list[str] | None = None) -> Path:
    """Per-class accuracy, classes sorted by training count, with the many/medium/few bands shaded and labelled with
    each head's mean in the band, and the training count (log) on its own axis; the legend sits below the axes, over
    no data.

    Up to 60 classes: bars side by side per head, each class named on the x axis, a 0% class marked with a small
    triangle at the axis so it does not vanish. More classes (ImageNet-LT's 1,000): each class a faint point and
    each head's rolling mean over about 2% of the classes as a line.
    """
    plt = _pyplot()
    counts = np.asarray(result["train_class_counts"])
    heads = heads or list(result["heads"])
    names = result.get("classnames") or [str(c) for c in range(len(counts))]
    order = np.argsort(-counts, kind="stable")
    x = np.arange(len(order))
    many_shot = len(order) <= LABELLED_CLASSES
    fig, ax = plt.subplots(figsize=(min(24.0, max(8.0, 0.35 * len(order) * len(heads))) if many_shot else 10.0, 5.2))
    t = result["thresholds"]
    sorted_counts = counts[order]
    bands = {
        "many": (0, int((sorted_counts > t["many"]).sum())),
        "medium": (int((sorted_counts > t["many"]).sum()), int((sorted_counts >= t["few"]).sum())),
        "few": (int((sorted_counts >= t["few"]).sum()), len(order)),
    }
    accs = {h: np.asarray(result["heads"][h]["per_class"], dtype=float)[order] for h in heads}
    for group, (lo, hi) in bands.items():
        if hi <= lo:
            continue
        ax.axvspan(lo - 0.5, hi - 0.5, color=GROUP_COLOURS[group], alpha=0.10, lw=0)
        means = "\n".join(f"{h} {np.nanmean(accs[h][lo:hi]):.1f}" for h in heads)  # a line per head: bands stay narrow
        ax.text((lo + hi - 1) / 2, 101, f"{group} (mean)\n{means}", ha="center", va="bottom", fontsize=7)
    width = 0.8 / len(heads)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    handles = []
    for j, head in enumerate(heads):
        colour = colours[j % len(colours)]
        if many_shot:
            offset = x + (j - (len(heads) - 1) / 2) * width
            handles.append(ax.bar(offset, accs[head], width=width, color=colour, label=head))
            zero = accs[head] == 0
            if zero.any():  # a 0% class: marked at the axis, not an invisible bar
                ax.plot(offset[zero], np.full(int(zero.sum()), 1.0), "^", color=colour, ms=5, mec="black", mew=0.5)
        else:
            ax.plot(x, accs[head], ".", ms=2, color=colour, alpha=0.25)
            window = max(5, len(order) // 50)
            kernel = np.ones(window)  # the mean of the classes the window covers (fewer at both ends; NaN skipped)
            valid = np.isfinite(accs[head])
            total = np.convolve(np.where(valid, accs[head], 0.0), kernel, mode="same")
            rolling = total / np.maximum(np.convolve(valid.astype(float), kernel, mode="same"), 1)
            zero = accs[head] == 0
            if zero.any():  # 0% classes: marked at the axis, as in the bar form
                ax.plot(x[zero], np.full(int(zero.sum()), 1.0), "^", color=colour, ms=3, alpha=0.6)
            (line,) = ax.plot(x, rolling, color=colour, lw=1.5, label=f"{head} (rolling mean of {window})")
            handles.append(line)
    ax2 = ax.twinx()
    (count_line,) = ax2.plot(x, sorted_counts, color="black", lw=1, label="training images (right axis)")
    ax2.set_yscale("log")
    ax2.set_ylabel("training images (log)")
    if many_shot:
        ax.set_xticks(x, [names[c] for c in order], rotation=60, ha="right", fontsize=8)
    else:
        ax.set_xticks([])
    ax.set_xlim(-0.6, len(order) - 0.4)
    ax.set_xlabel(f"classes, most to fewest training images (many > {t['many']}, few < {t['few']})")
    ax.set_ylabel(f"{result['split']} accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"Per-class {result['split']} accuracy", pad=14 + 9 * (len(heads) + 1))
    fig.legend(
        handles=[*handles, count_line],
        loc="lower center",
        ncol=min(len(handles) + 1, 4),
        fontsize=8,
        frameon=False,
        bbox_to_anchor=(0.5, 0.0),
    )
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return _save(plt, fig, path)


def _ink(value: float, lo: float, hi: float, cmap: Any) -> str:
    """Black or white digits, whichever reads on the cell's colour (its luminance)."""
    r, g, b, _ = cmap((value - lo) / (hi - lo) if hi > lo else 0.5)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def plot_heatmap(
    panels: list[tuple[str, np.ndarray]],
    rows: list[str],
    cols: list[str],
    title: str,
    path: str | Path,
    row_label: str,
    col_label: str,
    best: tuple[int, int, int] | None = None,
) -> Path:
    """Labelled heatmaps of a sweep metric over two hyperparameters, one panel per value of the grid's other axes
    (`panels`: (panel title, rows × cols values), NaN where the grid has no point), on one colour scale, digits in
    black or white by cell colour, the best point (panel, row, col) outlined in red."""
    import matplotlib.patches as patches

    plt = _pyplot()
    n = len(panels)
    ncols = min(n, 3)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(max(6.5, ncols * (1.1 * len(cols) + 1.6) + 1.2), nrows * (0.7 * len(rows) + 1.4) + 1.0),
        squeeze=False,
    )
    finite = np.concatenate([v[np.isfinite(v)] for _, v in panels]) if panels else np.array([0.0])
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    cmap = plt.get_cmap("viridis")
    im = None
    for k, ax in enumerate(axes.ravel()):
        if k >= n:
            ax.axis("off")
            continue
        name, values = panels[k]
        im = ax.imshow(values, cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
        ax.set_xticks(range(len(cols)), cols)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel(col_label)
        if k % ncols == 0:  # one row label per row of panels: none between them
            ax.set_ylabel(row_label)
        ax.set_title(name, fontsize=9)
        for i in range(len(rows)):
            for j in range(len(cols)):
                if np.isfinite(values[i, j]):
                    ink = _ink(values[i, j], lo, hi, cmap)
                    ax.text(j, i, f"{values[i, j]:.1f}", ha="center", va="center", color=ink, fontsize=8)
        if best is not None and best[0] == k:
            ax.add_patch(
                patches.Rectangle((best[2] - 0.5, best[1] - 0.5), 1, 1, fill=False, ec="red", lw=2.5, label="best")
            )
    top = 1 - (0.2 * (title.count("\n") + 1) + 0.45) / fig.get_size_inches()[1]  # the title's lines, in inches
    fig.subplots_adjust(top=top, hspace=0.45, wspace=0.35)
    if im is not None:
        fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
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
