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


def test_per_class_bars_follow_the_training_counts_with_the_shot_group_cuts(tmp_path, figures):
    """Classes sorted by training count, most first (stable for ties); one bar per class and head at its accuracy;
    dashed cuts after the many-shot classes (> 100) and before the few-shot ones (< 20); the counts on a log axis."""
    counts = [30, 500, 5, 120, 30, 19]
    result = {
        "split": "test",
        "train_class_counts": counts,
        "thresholds": {"many": 100, "few": 20},
        "heads": {
            "zero-shot": {"per_class": [10.0, 20.0, 30.0, 40.0, 50.0, 60.0]},
            "adapter": {"per_class": [15.0, 25.0, 35.0, 45.0, 55.0, 65.0]},
        },
    }
    path = plots.plot_per_class(result, tmp_path / "per_class.png")
    assert path == tmp_path / "per_class.png"
    assert_png(path)
    fig = figures[0]
    ax, twin = fig.axes[0], fig.axes[1]
    order = [1, 3, 0, 4, 5, 2]  # 500, 120, 30, 30 (in class order), 19, 5
    bars = [p.get_height() for p in ax.patches]
    assert bars == [result["heads"]["zero-shot"]["per_class"][c] for c in order] + [
        result["heads"]["adapter"]["per_class"][c] for c in order
    ]
    cuts = sorted(line.get_xdata()[0] for line in ax.lines)
    assert cuts == [1.5, 3.5]  # 2 classes above 100; 4 classes at or above 20
    assert twin.lines[0].get_ydata().tolist() == [counts[c] for c in order] and twin.get_yscale() == "log"
    assert ax.get_ylim() == (0.0, 100.0) and ax.get_ylabel() == "test accuracy (%)"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["zero-shot", "adapter"]


def test_per_class_points_past_60_classes_and_a_chosen_head(tmp_path, figures):
    counts = list(range(200, 130, -1))  # 70 classes
    accs = np.linspace(0, 100, 70).tolist()
    result = {
        "split": "val",
        "train_class_counts": counts,
        "thresholds": {"many": 100, "few": 20},
        "heads": {"zero-shot": {"per_class": accs}, "adapter": {"per_class": accs[::-1]}},
    }
    plots.plot_per_class(result, tmp_path / "p.png", heads=["adapter"])
    ax = figures[0].axes[0]
    assert len(ax.patches) == 0
    points = [line for line in ax.lines if line.get_marker() == "."]
    assert len(points) == 1 and points[0].get_ydata().tolist() == accs[::-1]


def test_heatmap_writes_each_finite_value_with_one_decimal(tmp_path, figures):
    values = np.array([[71.25, np.nan], [68.04, 70.0]])
    path = plots.plot_heatmap(
        values, ["0.1", "0.2"], ["class-aware", "sqrt"], "val top-1", tmp_path / "h.png", "ratio", "sampler"
    )
    assert_png(path)
    ax = figures[0].axes[0]
    assert [t.get_text() for t in ax.texts] == ["71.2", "68.0", "70.0"]  # NaN: no label; row-major
    image = ax.images[0].get_array()
    assert np.array_equal(np.ma.filled(image, np.nan), values, equal_nan=True)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["class-aware", "sqrt"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0.1", "0.2"]
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == ("sampler", "ratio", "val top-1")


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
