"""`pipelines/plots.py`: what each figure draws (read back from the figure before it is saved) and the PNG it writes."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ballad_cache.pipelines import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def figures(monkeypatch):
    """The figures the module saves, kept for inspection (they are still written, then closed)."""
    kept = []
    save = plots._save

    def keep(plt, fig, path):
        kept.append(fig)
        return save(plt, fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return kept


def assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == PNG_MAGIC
    assert [p.name for p in path.parent.iterdir() if p.name.startswith(".")] == []  # no temporary left
    Image.open(path).verify()


def _bars(ax) -> list:
    return [bar for container in ax.containers for bar in container]


def test_per_class_bars_are_named_banded_and_the_legend_covers_no_bar(tmp_path, figures):
    """Classes sorted by training count, most first (stable for ties), each named on the x axis; one bar per class
    and head at its accuracy; the many (> 100) / medium / few (< 20) bands shaded and labelled with each head's
    mean; a 0% class marked; the counts on a log axis and in the legend, which sits below the axes over no bar."""
    counts = [30, 500, 5, 120, 30, 19]
    result = {
        "split": "test",
        "train_class_counts": counts,
        "classnames": ["cat", "dog", "owl", "cow", "eel", "ant"],
        "thresholds": {"many": 100, "few": 20},
        "heads": {
            "zero-shot": {"per_class": [10.0, 20.0, 30.0, 40.0, 50.0, 0.0]},
            "adapter": {"per_class": [15.0, 25.0, 35.0, 45.0, 55.0, 65.0]},
        },
    }
    path = plots.plot_per_class(result, tmp_path / "per_class.png")
    assert path == tmp_path / "per_class.png"
    assert_png(path)
    fig = figures[0]
    ax, twin = fig.axes[0], fig.axes[1]
    order = [1, 3, 0, 4, 5, 2]  # 500, 120, 30, 30 (in class order), 19, 5
    assert [bar.get_height() for bar in _bars(ax)] == [result["heads"]["zero-shot"]["per_class"][c] for c in order] + [
        result["heads"]["adapter"]["per_class"][c] for c in order
    ]
    assert [t.get_text() for t in ax.get_xticklabels()] == [result["classnames"][c] for c in order]
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["many (mean)\nzero-shot 30.0\nadapter 35.0", "medium (mean)\nzero-shot 30.0\nadapter 35.0",
                      "few (mean)\nzero-shot 15.0\nadapter 50.0"]  # fmt: skip
    spans = [p for p in ax.patches if p not in _bars(ax)]
    assert [round(p.get_x() + p.get_width(), 1) for p in spans] == [1.5, 3.5, 5.5]  # 2 above 100, 4 at or above 20
    zero = [line for line in ax.lines if line.get_marker() == "^"]
    assert len(zero) == 1 and len(zero[0].get_xdata()) == 1  # the one 0% class, visible
    assert twin.lines[0].get_ydata().tolist() == [counts[c] for c in order] and twin.get_yscale() == "log"
    assert ax.get_ylim() == (0.0, 100.0) and ax.get_ylabel() == "test accuracy (%)"
    legend = fig.legends[0]
    assert [t.get_text() for t in legend.get_texts()] == ["zero-shot", "adapter", "training images (right axis)"]
    fig.canvas.draw()
    box = legend.get_window_extent()
    assert not any(box.overlaps(bar.get_window_extent()) for bar in _bars(ax))


def test_per_class_points_and_rolling_means_past_60_classes(tmp_path, figures):
    counts = list(range(1200, 200, -1))  # 1,000 classes: no tick labels, points and a rolling mean per head
    accs = np.linspace(0, 100, 1000).tolist()
    result = {
        "split": "val",
        "train_class_counts": counts,
        "thresholds": {"many": 100, "few": 20},
        "heads": {"zero-shot": {"per_class": accs}, "adapter": {"per_class": accs[::-1]}},
    }
    plots.plot_per_class(result, tmp_path / "p.png", heads=["adapter"])
    fig = figures[0]
    ax = fig.axes[0]
    assert _bars(ax) == [] and [t.get_text() for t in ax.get_xticklabels()] == []
    points = [line for line in ax.lines if line.get_marker() == "."]
    assert len(points) == 1 and points[0].get_ydata().tolist() == accs[::-1]
    means = [line for line in ax.lines if line.get_label().startswith("adapter (rolling mean")]
    assert len(means) == 1 and abs(means[0].get_ydata()[500] - accs[::-1][500]) < 1.0
    assert [t.get_text() for t in fig.legends[0].get_texts()][0] == "adapter (rolling mean of 20)"


def test_heatmap_panels_share_a_scale_digits_read_on_every_cell_and_the_best_is_outlined(tmp_path, figures):
    left = np.array([[71.25, np.nan], [68.04, 70.0]])
    right = np.array([[50.0, 60.0], [55.0, 72.5]])
    path = plots.plot_heatmap(
        [("sampler class-aware", left), ("sampler sqrt", right)],
        ["0.1", "0.2"],
        ["0.05", "0.2"],
        "val top1; epochs 10",
        tmp_path / "h.png",
        "ratio",
        "lr",
        best=(1, 1, 1),
    )
    assert_png(path)
    fig = figures[0]
    a, b = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in a.texts] == ["71.2", "68.0", "70.0"]  # NaN: no label; row-major
    assert np.array_equal(np.ma.filled(a.images[0].get_array(), np.nan), left, equal_nan=True)
    assert (a.get_title(), b.get_title(), fig._suptitle.get_text()) == (
        "sampler class-aware", "sampler sqrt", "val top1; epochs 10"
    )  # fmt: skip
    assert a.images[0].get_clim() == b.images[0].get_clim() == (50.0, 72.5)  # one colour scale
    inks = {t.get_color() for t in [*a.texts, *b.texts]}
    assert inks == {"black", "white"}  # dark cells white digits, light cells black
    outlined = [p for p in b.patches if p.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]
    assert len(outlined) == 1 and outlined[0].get_xy() == (0.5, 0.5) and len(a.patches) == 0
    assert [t.get_text() for t in a.get_xticklabels()] == ["0.05", "0.2"]


def test_a_sweep_heatmap_draws_one_panel_per_sampler_and_names_the_fixed_settings(tmp_path, figures):
    from ballad_cache.heads.config import AdapterConfig
    from ballad_cache.pipelines.phase_b import _heatmap

    ranked = []
    for k, (sampler, ratio, lr) in enumerate(
        (s, r, lr) for s in ("sqrt", "class-aware") for r in (0.1, 0.2, 0.4) for lr in (0.05, 0.2)
    ):
        config = AdapterConfig(sampler=sampler, ratio=ratio, lr=lr).to_dict()
        ranked.append({"config": config, "val": {"top1": 80.0 - k}})
    _heatmap(tmp_path, ranked, "top1")
    fig = figures[0]
    panels = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["sampler sqrt", "sampler class-aware"]  # every point shown
    assert sum(len(ax.texts) for ax in panels) == 12
    assert "epochs 10" in fig._suptitle.get_text() and "batch_size 512" in fig._suptitle.get_text()
    ranked.append({"config": AdapterConfig(head="cosine", ratio=0.1, lr=0.05).to_dict(), "val": {"top1": 1.0}})
    _heatmap(tmp_path, ranked, "top1")
    assert "other heads (cosine) in results.csv" in figures[1]._suptitle.get_text()  # never dropped silently
    assert len([p for p in panels[0].patches if p.get_edgecolor()[:3] == (1.0, 0.0, 0.0)]) == 1


def test_prediction_grid_titles_right_green_wrong_red_unknown_black(tmp_path, figures):
    images = [Image.new("RGB", (8, 8)), Image.new("L", (8, 8)), Image.new("RGB", (8, 8))]
    path = plots.plot_prediction_grid(
        images, ["cat", "dog", "cow"], ["cat", "cat", None], tmp_path / "g.png", columns=2
    )
    assert_png(path)
    fig = figures[0]
    assert len(fig.axes) == 4  # 2 rows of 2; the fourth cell blank
    titles = [(ax.get_title(), ax.title.get_color()) for ax in fig.axes[:3]]
    assert titles == [("cat\n(true: cat)", "green"), ("dog\n(true: cat)", "red"), ("cow", "black")]
    assert fig.axes[1].images[0].get_cmap().name == "gray"
    assert len(fig.axes[3].images) == 0


def test_a_family_sweep_heatmap_draws_its_own_axes(tmp_path, figures):
    """A grid that sweeps neither ratio nor lr (gda's alpha × shrinkage, one panel per adjust_tau) draws those axes,
    not ratio × lr panels of single cells."""
    from ballad_cache.heads.config import AdapterConfig
    from ballad_cache.pipelines.phase_b import _heatmap

    base = AdapterConfig(head="gda").to_dict()
    grid = [(a, s, t) for t in (1.0, 0.0) for a in (0.01, 0.1, 1.0) for s in (0.001, 0.1)]
    ranked = [{"config": {**base, "alpha": a, "shrinkage": s, "adjust_tau": t}, "val": {"top1": 90.0 - k}}
              for k, (a, s, t) in enumerate(grid)]  # fmt: skip
    _heatmap(tmp_path, ranked, "top1")
    panels = [ax for ax in figures[0].axes if ax.images]
    assert [ax.get_title() for ax in panels] == ["adjust_tau 1.0", "adjust_tau 0.0"]
    assert (panels[0].get_ylabel(), panels[0].get_xlabel()) == ("alpha", "shrinkage")
    assert panels[0].images[0].get_array().shape == (3, 2) and sum(len(ax.texts) for ax in panels) == 12
