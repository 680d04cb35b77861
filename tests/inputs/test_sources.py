"""Dataset sources are registrations: a tiny random-access source defined in this file alone is loaded by its spec
kind and by a YAML `format:`, listed among the known specs, and read by `ballad data info`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from ballad_cache.errors import BalladError
from ballad_cache.inputs.datasets import load_dataset
from ballad_cache.inputs.splits import DATASET_FORMATS, DATASETS, ImageSplit, LTDataset
from cli.main import app

runner = CliRunner()


def toy_dataset(counts: list[int], name: str) -> LTDataset:
    """`counts[c]` random 6×5 RGB images of class c in train; every other train row again as test."""
    labels = np.repeat(np.arange(len(counts)), counts)
    pixels = np.random.default_rng(0).integers(0, 256, (len(labels), 6, 5, 3), dtype=np.uint8)
    train = ImageSplit("train", labels, [f"toy/{i}" for i in range(len(labels))], pixels=pixels)
    test = train.subset(np.arange(0, len(labels), 2))
    test.name = "test"
    classnames = [f"shape {c}" for c in range(len(counts))]
    return LTDataset(name, classnames, {"train": train, "test": test}, source="generated")


def _toy_spec(arg: str | None) -> LTDataset:
    """`toy:N0,N1,...`: a malformed count is a ValueError, which load_dataset reports as a bad spec."""
    return toy_dataset([int(n) for n in (arg or "").split(",")], f"toy:{arg}")


def _toy_format(desc: dict[str, Any], path: Path) -> LTDataset:
    """`format: toy` with `counts: [N0, N1, ...]`."""
    counts = desc.get("counts")
    if not isinstance(counts, list) or not all(isinstance(n, int) for n in counts):
        raise BalladError(f"{path}: counts must be a list of integers")
    return toy_dataset(counts, path.stem)


@pytest.fixture
def toy_source():
    DATASETS.register("toy", _toy_spec, help="toy:N0,N1,..., generated images")
    DATASET_FORMATS.register("toy", _toy_format, help="generated images")
    yield
    DATASETS.unregister("toy")
    DATASET_FORMATS.unregister("toy")


def test_the_shipped_sources_register_their_kinds_and_formats_in_order():
    """Catches a source module not imported by `load_dataset` (its kind unknown) or registered out of order (the
    embedded default first in every listing)."""
    assert DATASETS.names()[:4] == ["fmnist-lt", "cifar100-lt", "folder", "wds"]
    assert DATASET_FORMATS.names()[:2] == ["list", "webdataset"]


def test_a_source_registered_in_a_test_loads_by_spec_kind_and_by_yaml_format(toy_source, tmp_path):
    """Catches a spec kind or a `format:` dispatched through a fixed list instead of the registries, a loader's
    ValueError escaping as a traceback, and rows decoded from the wrong pixels."""
    ds = load_dataset("toy:120,30,5")
    assert ds.name == "toy:120,30,5" and ds.class_counts("train").tolist() == [120, 30, 5]
    assert ds.class_counts("test").tolist() == [60, 15, 3]
    expected = toy_dataset([120, 30, 5], "expected").split("train").pixels
    assert np.array_equal(np.asarray(ds.split("train").load(151)), expected[151])
    assert np.array_equal(np.asarray(ds.split("test").load(76)), expected[152])
    with pytest.raises(BalladError, match=r"bad dataset spec 'toy:3,x': invalid literal"):
        load_dataset("toy:3,x")

    desc = tmp_path / "shapes.yaml"
    desc.write_text("format: toy\ncounts: [7, 2]\n")
    from_yaml = load_dataset(str(desc))
    assert from_yaml.name == "shapes" and from_yaml.class_counts("train").tolist() == [7, 2]
    desc.write_text("format: toy\ncounts: seven\n")
    with pytest.raises(BalladError, match=r"shapes.yaml: counts must be a list of integers"):
        load_dataset(str(desc))
    desc.write_text("format: tfrecord\n")
    with pytest.raises(BalladError) as info:
        load_dataset(str(desc))
    assert str(info.value).endswith(
        "unknown format 'tfrecord'; use list (OLTR list files), webdataset (tar shards) or toy (generated images)"
    )


def test_data_info_reads_a_registered_source_and_lists_it_among_the_known_specs(toy_source):
    """Catches a CLI that knows only the shipped kinds: `ballad data info` reads the registered one and an unknown
    spec's message names it."""
    r = runner.invoke(app, ["data", "info", "--data", "toy:120,30,5"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # rich wraps lines at the terminal's width
    assert "3 classes, 155 train images (120 ... 5), imbalance factor 24.0" in text
    assert "1 many / 1 medium / 1 few" in text and "splits: train 155, test 78" in text
    r = runner.invoke(app, ["data", "info", "--data", "nope:1"])
    text = " ".join(r.output.split())
    assert r.exit_code == 1 and "unknown dataset 'nope:1'; known: fmnist-lt, cifar100-lt, folder, wds, toy," in text


def test_an_unregistered_kind_is_unknown_again():
    """Catches a registration leaking past its fixture (the other tests would depend on their order)."""
    assert "toy" not in DATASETS and "toy" not in DATASET_FORMATS
    with pytest.raises(BalladError, match="unknown dataset 'toy:1'"):
        load_dataset("toy:1")
