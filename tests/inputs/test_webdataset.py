"""`wds:` datasets (inputs/sources/webdataset): webdataset tar shards read by seeking, equal to the folder they were
packed from."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ballad_cache.errors import BalladError
from ballad_cache.inputs.datasets import BadImageError, load_dataset
from cli.main import app

runner = CliRunner()
COUNTS = {"train": [24, 12, 6], "val": [3, 3, 3], "test": [3, 3, 3]}


def folder_dataset(root: Path) -> Path:
    """ROOT/{train,val,test}/<class>/<image>.png: 3 classes of small coloured images."""
    rng = np.random.default_rng(0)
    for split, counts in COUNTS.items():
        for c, n in enumerate(counts):
            (root / split / f"class_{c}").mkdir(parents=True)
            for i in range(n):
                pixels = np.clip(rng.normal(80 * c, 40, (24, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(root / split / f"class_{c}" / f"{i:03d}.png")
    return root


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def pack(folder: Path, out: Path, shards: int = 4, corrupt: str | None = None) -> Path:
    """The folder dataset as webdataset tars, samples in the folder dataset's row order, dealt into `shards` tars
    per split in runs; `corrupt` names a key whose image bytes are replaced by garbage."""
    ds = load_dataset(f"folder:{folder}")
    out.mkdir(parents=True)
    (out / "classnames.txt").write_text("\n".join(ds.classnames) + "\n")
    for name, split in ds.splits.items():
        (out / name).mkdir()
        n = len(split)
        bounds = np.linspace(0, n, shards + 1).astype(int)
        for s in range(shards):
            with tarfile.open(out / name / f"{name}-{s:03d}.tar", "w") as tar:
                for i in range(bounds[s], bounds[s + 1]):
                    key = f"{name}/{i:06d}"
                    image = Path(split.files[i]).read_bytes()
                    if key == corrupt:
                        image = b"not an image at all" * 10
                    add_member(tar, f"{key}.png", image)
                    add_member(tar, f"{key}.cls", str(int(split.labels[i])).encode())
    return out


def rows(cache: Path, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    manifest = json.loads((cache / "manifest.json").read_text())
    feats, labels, views = [], [], []
    for entry in manifest["splits"][split]["shards"]:
        with h5py.File(cache / entry["file"]) as h:
            feats.append(h["features"][()])
            labels.append(h["labels"][()])
            views.append(h["view"][()])
    return np.concatenate(feats), np.concatenate(labels), np.concatenate(views)


def extract(data: str, out: Path, *extra: str):
    args = ["extract-features", "--data", data, "--model", "ballad-micro", "--pretrained", "none", "--out", str(out)]
    return runner.invoke(app, [*args, "--train-views", "2", "--batch-size", "16", "--workers", "0", *extra])


def test_wds_shards_give_the_folders_rows_bitwise_and_a_bad_member_is_skipped(tmp_path):
    """Catches a wds: reader whose samples come out of order, lose or double a sample at a tar boundary, read the
    wrong bytes (offsets), mislabel one (.cls), or seed its views otherwise than a folder's: the features of the
    same images packed into four tars per split equal the folder's bit for bit. Then a member that is not an image
    is skipped and listed with --skip-bad, and stops the run without it."""
    folder = folder_dataset(tmp_path / "folder")
    shards = pack(folder, tmp_path / "wds")
    a = extract(f"folder:{folder}", tmp_path / "cache-folder")
    assert a.exit_code == 0, a.output
    b = extract(f"wds:{shards}", tmp_path / "cache-wds")
    assert b.exit_code == 0, b.output
    for split in ("train", "val", "test"):
        fa, la, va = rows(tmp_path / "cache-folder", split)
        fb, lb, vb = rows(tmp_path / "cache-wds", split)
        assert len(fa) == (sum(COUNTS[split]) * (3 if split == "train" else 1))
        assert np.array_equal(la, lb) and np.array_equal(va, vb)
        assert np.array_equal(fa, fb), split
    ds = load_dataset(f"wds:{shards}")
    assert ds.split("train").paths[:2] == ["train/000000", "train/000001"]  # the key is the row's path

    broken = pack(folder, tmp_path / "wds-bad", corrupt="train/000030")
    stop = extract(f"wds:{broken}", tmp_path / "cache-stop")
    assert stop.exit_code == 1 and "train/000030" in stop.output and "--skip-bad" in stop.output
    skip = extract(f"wds:{broken}", tmp_path / "cache-skip", "--skip-bad", "--augment-on", "worker")
    assert skip.exit_code == 0, skip.output
    manifest = json.loads((tmp_path / "cache-skip" / "manifest.json").read_text())
    assert [(s["split"], s["path"]) for s in manifest["skipped"]] == [("train", "train/000030")]
    # views made on the device: the same rows skipped, the other rows where the worker path put them
    device = extract(f"wds:{broken}", tmp_path / "cache-device", "--skip-bad", "--augment-on", "device")
    assert device.exit_code == 0, device.output
    manifest = json.loads((tmp_path / "cache-device" / "manifest.json").read_text())
    assert [(s["split"], s["path"]) for s in manifest["skipped"]] == [("train", "train/000030")]
    fs, ls, vs = rows(tmp_path / "cache-skip", "train")
    fd, ld, vd = rows(tmp_path / "cache-device", "train")
    assert np.array_equal(ls, ld) and np.array_equal(vs, vd) and np.array_equal(fs[vs == 0], fd[vd == 0])


def test_bad_shards_stop_with_one_line_naming_the_file(tmp_path):
    """Catches a tar with no usable sample, a .cls that is not a class index, counts that differ from sizes.json,
    or a split folder without tars passing silently (an empty split would give an empty cache)."""
    shards = pack(folder_dataset(tmp_path / "folder"), tmp_path / "wds")
    (shards / "val" / "sizes.json").write_text(json.dumps({"val-000.tar": 99}))
    with pytest.raises(BalladError, match=r"val-000.tar holds 2 samples, .*sizes.json says 99"):
        load_dataset(f"wds:{shards}")
    (shards / "val" / "sizes.json").unlink()
    with tarfile.open(shards / "test" / "test-001.tar", "w") as tar:
        add_member(tar, "x/readme.txt", b"hi")
    with pytest.raises(BalladError, match=r"test-001.tar holds no sample with both an image"):
        load_dataset(f"wds:{shards}")
    for tar in (shards / "test").glob("*.tar"):
        tar.unlink()
    with pytest.raises(BalladError, match=r"test holds no .tar shards") as info:
        load_dataset(f"wds:{shards}")
    assert "\n" not in str(info.value)


def test_finetune_and_predict_read_wds_data(tmp_path):
    """Catches a command that takes `--data` but cannot read tar shards (finetune's epoch sampler, predict's split
    reader): both run on `wds:` and predict scores every test sample under its key."""
    shards = pack(folder_dataset(tmp_path / "folder"), tmp_path / "wds")
    data = f"wds:{shards}"
    common = ["--model", "ballad-micro", "--pretrained", "none", "--workers", "0", "--device", "cpu"]
    r = runner.invoke(
        app,
        ["finetune", "--data", data, *common, "--out", str(tmp_path / "a"), "--epochs", "2", "--batch-size", "8"],
    )
    assert r.exit_code == 0, r.output
    assert extract(data, tmp_path / "cache").exit_code == 0
    fit = ["fit-adapter", "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "ad"), "--batch-size", "8"]
    assert runner.invoke(app, [*fit, "--epochs", "2"]).exit_code == 0
    out = tmp_path / "preds.csv"
    args = ["predict", "--data", data, "--split", "test", *common, "--adapter", str(tmp_path / "ad")]
    r = runner.invoke(app, [*args, "--out", str(out)])
    assert r.exit_code == 0, r.output
    lines = out.read_text().splitlines()
    assert len(lines) == 1 + 9 and lines[1].startswith("test/000000,")


def test_a_key_in_two_tars_is_refused(tmp_path):
    """Catches two samples under one key (a key is a row's id in the cache: resume and --skip-bad name rows by it)."""
    shards = pack(folder_dataset(tmp_path / "folder"), tmp_path / "wds")
    with tarfile.open(shards / "val" / "val-000.tar") as tar:
        first = tar.getmembers()[:2]
        data = [tar.extractfile(m).read() for m in first]
    with tarfile.open(shards / "val" / "val-003.tar", "a") as tar:
        for member, payload in zip(first, data, strict=True):
            tar.addfile(member, io.BytesIO(payload))
    with pytest.raises(BalladError, match=r"key 'val/000000' is in both .*val-000.tar and .*val-003.tar"):
        load_dataset(f"wds:{shards}")


def test_a_key_twice_in_one_tar_and_a_bad_member_name_the_tar(tmp_path):
    """Catches one tar's repeated key becoming one sample (the first image with the last label), and an
    undecodable member reported without its tar."""
    shards = pack(folder_dataset(tmp_path / "folder"), tmp_path / "wds", corrupt="test/000004")
    with pytest.raises(BadImageError, match=r"test/000004.*member of .*test-002.tar: cannot identify image file;"):
        load_dataset(f"wds:{shards}").split("test").load(4)
    with tarfile.open(shards / "val" / "val-001.tar", "a") as tar:
        add_member(tar, "val/000002.cls", b"0")
    with pytest.raises(BalladError, match=r"val-001.tar: sample 'val/000002' has two .cls members"):
        load_dataset(f"wds:{shards}")


def test_brace_ranges_lists_and_globs_expand_as_webdataset_specs_do(tmp_path):
    """Catches a brace range read as one file name, lost zero padding, a descending range or nested list expanded
    wrongly, a glob matched out of name order, and a shard named twice read twice."""
    from ballad_cache.inputs.sources.webdataset import expand_braces, shard_paths

    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{0..10}")[9:] == ["9", "10"] and expand_braces("{00..10}")[9:] == ["09", "10"]
    assert expand_braces("{8..10}") == ["8", "9", "10"] and expand_braces("{2..0}") == ["2", "1", "0"]
    assert expand_braces("{a,b}/{0..1}") == ["a/0", "a/1", "b/0", "b/1"]
    assert expand_braces("{x,{y,z}}") == ["x", "y", "z"] and expand_braces("a{,-1}") == ["a", "a-1"]
    with pytest.raises(BalladError, match="neither a range"):
        expand_braces("s-{0...3}.tar")
    with pytest.raises(BalladError, match="without its"):
        expand_braces("s-{0..3.tar")
    tmp_path = tmp_path / "shards[1]*"  # the folder's own name holds glob characters: only the pattern's count
    tmp_path.mkdir()
    for name in ("b-1.tar", "a-0.tar", "a-1.tar", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in shard_paths("*", tmp_path)] == ["a-0.tar", "a-1.tar", "b-1.tar"]
    assert [p.name for p in shard_paths("{b,a}-1.tar", tmp_path)] == ["b-1.tar", "a-1.tar"]
    assert [p.name for p in shard_paths("{a-*,a-0.tar}", tmp_path)] == ["a-0.tar", "a-1.tar"]
    with pytest.raises(BalladError, match=r"shard .*a-2.tar \(from the pattern 'a-\{0..2\}.tar'\) does not exist"):
        shard_paths("a-{0..2}.tar", tmp_path)
    with pytest.raises(BalladError, match="matches no .tar file"):
        shard_paths("c-*.tar", tmp_path)


def test_a_webdataset_yaml_reads_shard_patterns_and_counts_are_recorded_once(tmp_path):
    """Catches `format: webdataset` descriptions read as list files, patterns that pick other tars or another order
    than `wds:DIR`, a missing sizes.json not recorded after the first count, and a later change to a tar not caught
    against the recorded count."""
    shards = pack(folder_dataset(tmp_path / "folder"), tmp_path / "wds")
    desc = tmp_path / "shards.yaml"
    desc.write_text(
        f"format: webdataset\nroot: {shards}\nclassnames: {shards}/classnames.txt\ntemplates: '{{c}}.'\n"
        "splits:\n  train: train/train-{000..003}.tar\n  val: val/*.tar\n  test: test\n"
    )
    assert not (shards / "train" / "sizes.json").exists()
    from_yaml, from_dir = load_dataset(str(desc)), load_dataset(f"wds:{shards}")
    assert from_yaml.templates == ["{c}."] and from_yaml.classnames == from_dir.classnames
    for split in ("train", "val", "test"):
        a, b = from_yaml.split(split), from_dir.split(split)
        assert a.paths == b.paths and np.array_equal(a.labels, b.labels) and a.members == b.members
        sizes = json.loads((shards / split / "sizes.json").read_text())
        assert sizes == {
            f"{split}-{s:03d}.tar": n for s, n in enumerate(np.diff(np.linspace(0, len(a), 5).astype(int)))
        }
    with tarfile.open(shards / "train" / "train-001.tar", "w") as tar:  # the shard rewritten with one sample
        add_member(tar, "train/999999.png", (tmp_path / "folder" / "train" / "class_0" / "000.png").read_bytes())
        add_member(tar, "train/999999.cls", b"0")
    with pytest.raises(BalladError, match=r"train-001.tar holds 1 samples, .*sizes.json says 11"):
        load_dataset(str(desc))
    desc.write_text(desc.read_text().replace("format: webdataset", "format: tfrecord"))
    with pytest.raises(BalladError, match="unknown format 'tfrecord'"):
        load_dataset(str(desc))


def test_sizes_json_that_cannot_be_written_or_read(tmp_path, monkeypatch):
    """Catches a read-only shard folder (sizes.json cannot be recorded) stopping the load, and a sizes.json that is
    a folder or holds fractional counts passing or giving a traceback instead of one line."""
    from ballad_cache.inputs.sources import webdataset as wds

    shards = pack(folder_dataset(tmp_path / "folder"), tmp_path / "wds")

    def read_only(path, obj):
        raise BalladError(f"cannot write {path}: Read-only file system; free space or pick another --out")

    monkeypatch.setattr(wds, "write_json", read_only)
    assert len(load_dataset(f"wds:{shards}").split("train")) == 42
    assert not (shards / "train" / "sizes.json").exists()
    monkeypatch.undo()
    (shards / "val" / "sizes.json").mkdir()
    with pytest.raises(BalladError, match=r"val/sizes.json is not a JSON object of sample counts"):
        load_dataset(f"wds:{shards}")
    (shards / "val" / "sizes.json").rmdir()
    (shards / "val" / "sizes.json").write_text(json.dumps({"val-000.tar": 2.5}))
    with pytest.raises(BalladError, match=r"val/sizes.json is not a JSON object of sample counts"):
        load_dataset(f"wds:{shards}")


def test_an_image_without_a_label_or_a_label_without_an_image_stops_with_one_line(tmp_path):
    """Catches an image member with no .cls, or a .cls member with no image, dropped without a word (the split would
    silently lose the sample), and a key with two image members reported as two members of one type."""
    shards = pack(folder_dataset(tmp_path / "folder"), tmp_path / "wds")
    png = (tmp_path / "folder" / "val" / "class_0" / "000.png").read_bytes()
    with tarfile.open(shards / "val" / "val-002.tar", "a") as tar:
        add_member(tar, "val/extra.png", png)
    with pytest.raises(BalladError, match=r"val-002.tar: 1 image\(s\) have no .cls label \(first: 'val/extra'\)"):
        load_dataset(f"wds:{shards}")
    with tarfile.open(shards / "val" / "val-002.tar", "w") as tar:
        add_member(tar, "val/x.jpg", png)
        add_member(tar, "val/x.png", png)
    with pytest.raises(BalladError, match=r"sample 'val/x' has two image members"):
        load_dataset(f"wds:{shards}")
    with tarfile.open(shards / "val" / "val-002.tar", "w") as tar:  # two whole samples, then a label alone
        for key in ("val/x", "val/y"):
            add_member(tar, f"{key}.png", png)
            add_member(tar, f"{key}.cls", b"1")
        add_member(tar, "val/lost.cls", b"2")
    with pytest.raises(BalladError) as info:
        load_dataset(f"wds:{shards}")
    message = str(info.value)
    assert "val-002.tar: 1 .cls label(s) have no image member (first: 'val/lost')" in message and "\n" not in message
