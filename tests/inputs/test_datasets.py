"""Dataset specs (inputs/datasets, inputs/splits and the sources in inputs/sources: fmnist, cifar, folder,
description): loading, long-tail profiles, bad input."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ballad_cache.errors import BalladError
from ballad_cache.inputs.datasets import BadImageError, fashion_mnist_lt, load_dataset, read_idx
from cli.main import app
from tests.conftest import write_idx

runner = CliRunner()


def test_idx_reader_reads_what_the_test_wrote(tmp_path):
    images = np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5)
    write_idx(tmp_path / "x.gz", images)
    write_idx(tmp_path / "y", np.array([7, 8, 9]), compress=False)
    assert np.array_equal(read_idx(tmp_path / "x.gz"), images)
    assert read_idx(tmp_path / "y").tolist() == [7, 8, 9]
    (tmp_path / "bad").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(BalladError, match="truncated"):
        read_idx(tmp_path / "bad")


def test_fmnist_lt_profile_and_splits(ballad_data):
    ds = fashion_mnist_lt()
    assert ds.class_counts("train").tolist() == [500, 299, 179, 107, 64, 38, 23, 13, 8, 5]
    assert ds.class_counts("val").tolist() == [20] * 10
    train_rows = {p for p in ds.split("train").paths}
    assert not train_rows & set(ds.split("val").paths)  # val is held out from unused train images
    assert len(ds.split("test")) == 300
    assert ds.split("train").load(0).size == (28, 28)


def test_data_info_cli(ballad_data):
    result = runner.invoke(app, ["data", "info", "--data", "fmnist-lt"])
    assert result.exit_code == 0, result.output
    assert "10 classes, 1236 train images (500 ... 5)" in result.output
    assert "4 many / 3 medium / 3 few" in result.output


def _make_folder(root: Path, classes: dict[str, int]) -> None:
    for split in ("train", "test"):
        for i, (name, n) in enumerate(classes.items()):
            d = root / split / name
            d.mkdir(parents=True)
            for j in range(n):
                Image.new("RGB", (8, 8), (i * 40, j * 10, 0)).save(d / f"{j}.png")


def test_folder_spec_loads_real_images(tmp_path):
    _make_folder(tmp_path, {"cat": 3, "sea_lion": 2})
    ds = load_dataset(f"folder:{tmp_path}")
    assert ds.classnames == ["cat", "sea lion"]
    assert ds.class_counts("train").tolist() == [3, 2]
    img = ds.split("test").load(4)
    assert img.getpixel((0, 0)) == (40, 10, 0)
    assert "val" not in ds.splits


def test_yaml_spec_with_list_files(tmp_path):
    _make_folder(tmp_path / "imgs", {"a": 2, "b": 2})
    (tmp_path / "names.txt").write_text("alpha\nbeta\n")
    (tmp_path / "train.txt").write_text("train/a/0.png 0\ntrain/a/1.png 0\ntrain/b/0.png 1\n")
    (tmp_path / "test.txt").write_text("test/b/1.png 1\n")
    (tmp_path / "d.yaml").write_text(
        "root: imgs\nclassnames: names.txt\ntemplate: 'a sketch of a {c}.'\n"
        "splits:\n  train: train.txt\n  test: test.txt\n"
    )
    ds = load_dataset(str(tmp_path / "d.yaml"))
    assert ds.classnames == ["alpha", "beta"]
    assert ds.templates == ["a sketch of a {c}."]
    assert ds.class_counts("train").tolist() == [2, 1]
    assert ds.split("test").load(0).getpixel((0, 0)) == (40, 10, 0)


def test_bad_specs_exit_1_with_the_reason(tmp_path):
    r = runner.invoke(app, ["data", "info", "--data", "imagenet-nope"])
    assert r.exit_code == 1 and "unknown dataset" in r.output and "fmnist-lt" in r.output
    r = runner.invoke(app, ["data", "info", "--data", f"folder:{tmp_path / 'missing'}"])
    assert r.exit_code == 1 and str(tmp_path / "missing") in r.output
    _make_folder(tmp_path / "imgs", {"a": 1, "b": 1})
    (tmp_path / "names.txt").write_text("alpha\nbeta\n")
    (tmp_path / "train.txt").write_text("train/a/0.png 0\ntrain/b/0.png 7\n")
    (tmp_path / "d.yaml").write_text("root: imgs\nclassnames: names.txt\nsplits:\n  train: train.txt\n")
    r = runner.invoke(app, ["data", "info", "--data", str(tmp_path / "d.yaml")])
    assert r.exit_code == 1 and f"{tmp_path / 'train.txt'}:2" in r.output and "out of range" in r.output


def test_the_users_data_is_never_a_silent_default_and_a_bare_folder_is_named_as_one(tmp_path):
    for command in (["finetune", "--model", "ballad-micro", "--out", str(tmp_path / "a")], ["data", "info"]):
        r = runner.invoke(app, command)
        assert r.exit_code == 2 and "--data" in r.output, r.output  # required: no fmnist-lt behind the user's back
        assert not (tmp_path / "a").exists()
    _make_folder(tmp_path / "mine", {"cat": 2, "dog": 2})
    r = runner.invoke(app, ["data", "info", "--data", str(tmp_path / "mine")])
    assert r.exit_code == 1 and f"pass folder:{tmp_path / 'mine'}" in r.output, r.output


def test_a_folder_dataset_with_an_empty_class_folder_exits_1_naming_it(tmp_path):
    _make_folder(tmp_path, {"cat": 3, "dog": 2})
    (tmp_path / "train" / "empty_class").mkdir()
    r = runner.invoke(app, ["data", "info", "--data", f"folder:{tmp_path}"])
    assert r.exit_code == 1, r.output
    assert "empty_class" in r.output and "no training image" in r.output
    assert "imbalance factor" not in r.output


def test_class_list_problems_name_the_file(tmp_path):
    _make_folder(tmp_path / "imgs", {"a": 1, "b": 1})
    (tmp_path / "train.txt").write_text("train/a/0.png 0\ntrain/b/0.png 1\n")
    (tmp_path / "dup.txt").write_text("alpha\nalpha\n")
    (tmp_path / "three.txt").write_text("alpha\nbeta\ngamma\n")
    for names, pattern in (("dup.txt", "duplicate class name"), ("three.txt", "no training image")):
        (tmp_path / "d.yaml").write_text(f"root: imgs\nclassnames: {names}\nsplits:\n  train: train.txt\n")
        with pytest.raises(BalladError, match=pattern):
            load_dataset(str(tmp_path / "d.yaml"))


def test_unreadable_images_raise_with_path_and_index(tmp_path):
    _make_folder(tmp_path, {"a": 4})
    files = sorted((tmp_path / "train" / "a").iterdir())
    files[1].write_bytes(b"")  # zero bytes
    files[2].write_bytes(files[3].read_bytes()[:30])  # truncated PNG
    files[3].write_text("not an image")
    ds = load_dataset(f"folder:{tmp_path}")
    for i in (1, 2, 3):
        with pytest.raises(BadImageError) as info:
            ds.split("train").load(i)
        assert info.value.index == i and str(files[i]) in str(info.value)
    files[0].unlink()
    with pytest.raises(BadImageError, match="file not found"):
        ds.split("train").load(0)


def test_info_commands_print_json_for_scripts(ballad_data):
    """`data info --json`, `models --json`: plain JSON on standard output (every class, every model's tags)."""
    import json

    r = runner.invoke(app, ["data", "info", "--data", "fmnist-lt", "--json"])
    assert r.exit_code == 0, r.output
    facts = json.loads(r.stdout)
    assert len(facts["classes"]) == 10 and facts["classes"][0]["name"] == "t-shirt"
    assert sum(c["train"] for c in facts["classes"]) == facts["train_images"]
    assert facts["groups"] == {g: sum(c["group"] == g for c in facts["classes"]) for g in ("many", "medium", "few")}
    r = runner.invoke(app, ["models", "--json"])
    entries = {e["name"]: e for e in json.loads(r.stdout)}
    assert entries["ballad-lite"]["source"] == "ballad" and "openai" in entries["ViT-B-16"]["pretrained"]
