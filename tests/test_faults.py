"""Failing well: unreadable images, broken caches, interruption, concurrent runs, a full disk."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from typer.testing import CliRunner

from ballad_cache.errors import BalladError
from ballad_cache.models.clip import load_model
from ballad_cache.store.cache import FeatureCache
from cli.main import app
from tests.conftest import ROOT, longtail_features, make_cache, run_ballad

runner = CliRunner()
BAD_KINDS = {
    "missing": None,
    "zero-byte": b"",
    "truncated": "truncate",
    "not-an-image": b"this is not a JPEG at all",
}


def _image_dataset(root: Path, bad: list[str]) -> tuple[Path, dict[str, str]]:
    """A YAML dataset of 2 classes x 6 JPEGs (train) and 2 x 2 (test), with `bad` train files broken."""
    lines: dict[str, list[str]] = {"train": [], "test": []}
    for split, n in (("train", 6), ("test", 2)):
        for c in range(2):
            for j in range(n):
                rel = f"{split}/{c}/{j}.jpg"
                (root / "imgs" / split / str(c)).mkdir(parents=True, exist_ok=True)
                rgb = np.full((16, 16, 3), 60 + 120 * c, np.uint8)
                rgb[:, : 2 + 2 * j] = 255
                Image.fromarray(rgb).save(root / "imgs" / rel, quality=95)
                lines[split].append(f"{rel} {c}")
    broken = {}
    for k, kind in enumerate(bad):
        rel = f"train/{k % 2}/bad-{kind}.jpg"
        path = root / "imgs" / rel
        payload = BAD_KINDS[kind]
        if payload == "truncate":
            path.write_bytes((root / "imgs/train/0/0.jpg").read_bytes()[:200])
        elif payload is not None:
            path.write_bytes(payload)
        lines["train"].insert(3 + k, f"{rel} {k % 2}")
        broken[kind] = str(path)
    (root / "names.txt").write_text("dark\nlight\n")
    for split, rows in lines.items():
        (root / f"{split}.txt").write_text("\n".join(rows) + "\n")
    (root / "d.yaml").write_text("root: imgs\nclassnames: names.txt\nsplits:\n  train: train.txt\n  test: test.txt\n")
    return root / "d.yaml", broken


def _leftovers(folder: Path) -> list[str]:
    """Files that must not survive a failed run: shards, manifests, checkpoints, temporaries."""
    if not folder.exists():
        return []
    pats = ("*.h5", "manifest.json", "checkpoint.pt", ".*.tmp", "model/*")
    return sorted(str(p.relative_to(folder)) for pat in pats for p in folder.glob(pat))


@pytest.mark.parametrize("kind", list(BAD_KINDS))
def test_extraction_stops_at_an_unreadable_image_with_path_and_index(tmp_path, kind):
    spec, broken = _image_dataset(tmp_path, [kind])
    out = tmp_path / "cache"
    args = ["extract-features", "--data", str(spec), "--model", "ballad-micro", "--out", str(out), "--train-views", "0"]
    r = runner.invoke(app, [*args, "--workers", "0", "--batch-size", "4", "--device", "cpu"])
    assert r.exit_code == 1, r.output
    assert broken[kind] in r.output and "(index 3)" in r.output and "--skip-bad" in r.output
    assert _leftovers(out) == []


def test_skip_bad_extraction_lists_every_skipped_image(tmp_path):
    spec, broken = _image_dataset(tmp_path, list(BAD_KINDS))
    out = tmp_path / "cache"
    args = ["extract-features", "--data", str(spec), "--model", "ballad-micro", "--out", str(out), "--skip-bad"]
    r = runner.invoke(app, [*args, "--train-views", "0", "--workers", "0", "--batch-size", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "skipped 4 bad image(s)" in " ".join(r.output.split())  # the console wraps long lines
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(s["path"] for s in manifest["skipped"]) == sorted(str(Path(p)) for p in broken.values())
    assert manifest["splits"]["train"]["rows"] == 12 and manifest["splits"]["test"]["rows"] == 4
    train = FeatureCache(out).load_split("train")
    assert sorted(train.index.tolist()) == [0, 1, 2, *range(7, 16)]  # rows 3..6 were the bad files


def test_finetune_stops_at_a_bad_image_or_skips_and_counts_it(tmp_path):
    spec, broken = _image_dataset(tmp_path, list(BAD_KINDS))
    base = ["finetune", "--data", str(spec), "--model", "ballad-micro", "--epochs", "1", "--batch-size", "4"]
    base += ["--workers", "0", "--device", "cpu", "--lr", "1e-4"]
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "ft")])
    assert r.exit_code == 1
    assert any(p in r.output for p in broken.values()) and "(index " in r.output
    assert _leftovers(tmp_path / "ft") == []
    r = runner.invoke(app, [*base, "--out", str(tmp_path / "ft"), "--skip-bad"])  # the same folder: nothing finished
    assert r.exit_code == 0, r.output
    assert "skipped 4 unreadable training image(s)" in r.output
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert sorted(s["path"] for s in summary["skipped"]) == sorted(broken.values())
    assert sorted(s["index"] for s in summary["skipped"]) == [3, 4, 5, 6]


def test_skip_bad_with_views_lists_each_image_once_and_counts_only_cached_images(tmp_path):
    spec, broken = _image_dataset(tmp_path, list(BAD_KINDS))
    out = tmp_path / "cache"
    args = ["extract-features", "--data", str(spec), "--model", "ballad-micro", "--out", str(out), "--skip-bad"]
    r = runner.invoke(app, [*args, "--train-views", "2", "--workers", "0", "--batch-size", "4", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "skipped 4 bad image(s)" in " ".join(r.output.split())  # the console wraps long lines
    cache = FeatureCache(out)
    assert len(cache.manifest["skipped"]) == 4
    assert cache.train_counts.tolist() == [6, 6]  # the list has 8 per class; the 4 bad files are not in the cache
    train = cache.load_split("train")
    assert np.bincount(train.labels[train.view == 0].numpy()).tolist() == cache.train_counts.tolist()


def test_a_dataset_yamls_templates_are_the_prompts_of_finetune_and_extraction(tmp_path):
    spec, _ = _image_dataset(tmp_path, [])
    spec.write_text(spec.read_text() + "template: 'a sketch of a {c}.'\n")
    out = tmp_path / "cache"
    r = runner.invoke(
        app,
        [
            "extract-features",
            "--data",
            str(spec),
            "--model",
            "ballad-micro",
            "--out",
            str(out),
            "--workers",
            "0",
            "--train-views",
            "0",
        ],
    )
    assert r.exit_code == 0, r.output
    cache = FeatureCache(out)
    assert cache.manifest["templates"] == ["a sketch of a {c}."]
    from ballad_cache.models.clip import PromptBank

    loaded = load_model("ballad-micro")
    bank = PromptBank(loaded, ["dark", "light"], ["a sketch of a {c}."])
    prompts = loaded.tokenizer(["a sketch of a dark.", "a sketch of a light."])
    assert torch.equal(bank.tokens, prompts[:, : bank.context_length])
    with torch.inference_mode():  # the prompt bank's ops, as extraction runs them: bitwise
        ref = F.normalize(bank.encode(loaded.model.eval(), per_template=True).float().mean(dim=1), dim=-1)
    assert torch.equal(cache.text_embeddings(), ref)
    base = ["finetune", "--data", str(spec), "--model", "ballad-micro", "--epochs", "1", "--batch-size", "4"]
    r = runner.invoke(app, [*base, "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "ft")])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "ft" / "summary.json").read_text())["templates"] == ["a sketch of a {c}."]
    r = runner.invoke(app, [*base, "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "ft")])
    assert r.exit_code == 1 and "already holds a run (summary.json)" in r.output  # a finished run is kept


# ---------------------------------------------------------------------------------------------- broken caches


@pytest.fixture
def cache(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    d = longtail_features(rng, [40, 20, 10, 5], dim=16, per_class_eval=10, tail_shift=1.0)
    return make_cache(tmp_path / "cache", d["train"], d["val"], d["test"], d["text"][0])


def _fit(cache: Path, out: Path) -> object:
    return runner.invoke(
        app,
        [
            "fit-adapter",
            "--cache",
            str(cache),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--batch-size",
            "32",
            "--device",
            "cpu",
        ],
    )


def test_nan_rows_are_refused_by_fit_adapter_and_evaluate_naming_the_shard(cache, tmp_path):
    import h5py

    r = _fit(cache, tmp_path / "ad")
    assert r.exit_code == 0, r.output
    for split in ("train", "test"):
        with h5py.File(cache / f"{split}-00000.h5", "r+") as f:
            f["features"][2] = np.inf if split == "test" else np.nan
    r = _fit(cache, tmp_path / "ad2")  # the changed bytes are caught first; the NaN check stands behind them
    assert r.exit_code == 1 and "train-00000.h5 does not match its sha256" in r.output
    r = runner.invoke(app, ["evaluate", "--cache", str(cache), "--adapter", str(tmp_path / "ad")])
    assert r.exit_code == 1 and "test-00000.h5 does not match its sha256" in r.output
    with pytest.raises(BalladError, match="train-00000.h5 holds NaN/Inf"):
        FeatureCache(cache, verify_reads=False).load_split("train")
    r = runner.invoke(app, ["cache", "verify", "--cache", str(cache)])
    assert r.exit_code == 1 and "train-00000.h5" in r.output


@pytest.mark.parametrize("damage", ["truncate", "delete", "format"])
def test_damaged_cache_is_refused_by_every_reader(cache, tmp_path, damage):
    shard = cache / "train-00000.h5"
    if damage == "truncate":
        shard.write_bytes(shard.read_bytes()[:1000])
        expected = "train-00000.h5"
    elif damage == "delete":
        shard.unlink()
        expected = "train-00000.h5 is missing"
    else:
        m = json.loads((cache / "manifest.json").read_text())
        m["format_version"] = 0
        (cache / "manifest.json").write_text(json.dumps(m))
        expected = "format version 0"
    for args in (
        ["cache", "verify", "--cache", str(cache)],
        ["fit-adapter", "--cache", str(cache), "--out", str(tmp_path / "ad"), "--device", "cpu"],
        ["evaluate", "--cache", str(cache), "--split", "train"],
    ):
        r = runner.invoke(app, args)
        assert r.exit_code == 1, (args, r.output)
        assert expected in r.output, (args, r.output)
        assert "Traceback" not in r.output
    assert not (tmp_path / "ad" / "adapter.safetensors").exists()


# ---------------------------------------------------------------------------------------------- interruption


def test_ctrl_c_during_a_sweep_keeps_finished_points_and_the_rerun_completes(cache, tmp_path, monkeypatch):
    import ballad_cache.heads.adapter as phase_b  # the adapter families train through its fit_adapters

    args = ["sweep", "--cache", str(cache), "--ratio", "0.1,0.4", "--sampler", "class-aware,sqrt,instance"]
    args += ["--epochs", "2", "--batch-size", "32", "--device", "cpu"]
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "whole")])
    assert r.exit_code == 0, r.output
    real, calls = phase_b.fit_adapters, []

    def interrupted(*a, **k):  # the second of three sampler groups is cut short
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(phase_b, "fit_adapters", interrupted)
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "cut")])
    assert r.exit_code == 130 and "interrupted" in r.output
    assert len(list((tmp_path / "cut" / "points").glob("*.safetensors"))) == 2
    assert list((tmp_path / "cut").rglob("*.tmp")) == []
    stale = tmp_path / "cut" / "points" / ".sqrt_r0.1.safetensors.4242.tmp"  # as a kill -9 mid-write leaves it
    stale.write_bytes(b"half")
    monkeypatch.setattr(phase_b, "fit_adapters", real)
    r = runner.invoke(app, [*args, "--out", str(tmp_path / "cut")])
    assert not stale.exists()
    assert r.exit_code == 0 and "2 already done, 4 to train" in r.output
    whole = json.loads((tmp_path / "whole" / "results.json").read_text())
    cut = json.loads((tmp_path / "cut" / "results.json").read_text())
    assert [p["val"] for p in cut["points"]] == [p["val"] for p in whole["points"]]


@pytest.fixture
def live_owner():
    """A running process on this host, to stand for a ballad run that holds a lock."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield f"{socket.gethostname()}:{proc.pid}"
    proc.kill()
    proc.wait()


@pytest.mark.slow
@pytest.mark.parametrize("command", ["fit-adapter", "sweep", "extract-features"])
def test_a_second_run_into_a_locked_folder_refuses_and_touches_nothing(cache, tmp_path, live_owner, command):
    out = tmp_path / "run"
    out.mkdir()
    lock = out / (".ballad.rank0.lock" if command == "extract-features" else ".ballad.lock")
    lock.write_text(live_owner)
    (out / "precious.txt").write_text("the first run's output")
    if command == "extract-features":
        args = [command, "--data", "fmnist-lt", "--model", "ballad-micro", "--out", str(out), "--device", "cpu"]
    else:
        args = [command, "--cache", str(cache), "--out", str(out), "--epochs", "1", "--device", "cpu"]
    before = sorted(p.name for p in out.iterdir())
    r = runner.invoke(app, args, env={"BALLAD_DATA": os.environ.get("BALLAD_DATA", "")})
    assert r.exit_code == 1 and "in use by another ballad process" in r.output and live_owner in r.output
    assert sorted(p.name for p in out.iterdir()) == before
    assert (out / "precious.txt").read_text() == "the first run's output" and lock.read_text() == live_owner


@pytest.mark.slow
def test_a_lock_left_by_a_dead_process_is_taken_over(cache, tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    out = tmp_path / "run"
    out.mkdir()
    (out / ".ballad.lock").write_text(f"{socket.gethostname()}:{proc.pid}")
    r = _fit(cache, out)
    assert r.exit_code == 0, r.output
    assert not (out / ".ballad.lock").exists()


# ---------------------------------------------------------------------------------------------- full disk


def test_full_disk_while_writing_a_shard_leaves_no_partial_file(ballad_data, tmp_path, monkeypatch):
    from ballad_cache.store.cache import ShardWriter

    real, calls = ShardWriter.write, []

    def fill_up(self, *a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(self, *a, **k)

    monkeypatch.setattr(ShardWriter, "write", fill_up)
    out = tmp_path / "cache"
    args = [
        "extract-features",
        "--data",
        "fmnist-lt",
        "--model",
        "ballad-micro",
        "--out",
        str(out),
        "--train-views",
        "0",
    ]
    r = runner.invoke(app, [*args, "--splits", "train", "--shard-size", "512", "--batch-size", "256"])
    assert r.exit_code == 1
    assert "No space left on device" in r.output and "train-00001.h5" in r.output
    assert sorted(p.name for p in out.glob("*.h5")) == ["train-00000.h5"]  # the finished shard is kept
    assert list(out.glob(".*.tmp")) == [] and not (out / "manifest.json").exists()
    monkeypatch.setattr(ShardWriter, "write", real)
    r = runner.invoke(app, [*args, "--splits", "train", "--shard-size", "512", "--batch-size", "256"])
    assert r.exit_code == 0 and "2 shard(s) computed, 1 already complete" in r.output


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(ballad_data, tmp_path, monkeypatch):
    out = tmp_path / "ft"
    args = ["finetune", "--data", "fmnist-lt", "--model", "ballad-micro", "--out", str(out), "--batch-size", "64"]
    args += ["--workers", "0", "--device", "cpu", "--checkpoint-every", "3", "--max-steps", "8", "--epochs", "1"]
    real, calls = torch.save, []

    def fill_up(obj, f, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            Path(f).write_bytes(b"PK\x03\x04 half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", fill_up)
    r = runner.invoke(app, args)
    assert r.exit_code == 1 and "No space left on device" in r.output and "checkpoint.pt" in r.output
    state = torch.load(out / "checkpoint.pt", weights_only=True)  # the step-3 checkpoint, whole
    assert state["step"] == 3
    assert list(out.glob(".*.tmp")) == []


def test_too_little_free_space_for_a_checkpoint_is_refused_before_writing(tmp_path, monkeypatch):
    import shutil

    from ballad_cache.errors import BalladError
    from ballad_cache.pipelines.phase_a import save_checkpoint as _save_checkpoint

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 2**20, 2**20))
    with pytest.raises(BalladError, match="checkpoint.pt: 3.8 MiB needed, 1.0 MiB free"):
        _save_checkpoint(tmp_path / "checkpoint.pt", {"model": {"w": torch.zeros(1_000_000)}})
    from ballad_cache.store.cache import ShardWriter

    with pytest.raises(BalladError, match="train-00000.h5: 2.4 MiB needed"):
        ShardWriter(tmp_path, "train", 0, capacity=4096, dim=256, fingerprint="x")
    assert list(tmp_path.iterdir()) == []


def test_hdf5_full_disk_reports_become_one_line_errors():
    from ballad_cache.atomic import disk_error

    h5_text = "Can't decrement id ref count (file write failed: ..., errno = 28, error message = 'No space left'"
    assert "No space left on device" in str(disk_error(RuntimeError(h5_text), "/c/train-00000.h5"))
    assert "/c/x.json: Read-only file system" in str(disk_error(OSError(errno.EROFS, "ro"), "/c/x.json"))
    assert disk_error(RuntimeError("shape mismatch"), "/c/x") is None
    assert disk_error(KeyError("errno = 28,"), "/c/x") is None


@pytest.mark.slow
def test_kill_9_during_finetune_then_resume_ends_with_the_uninterrupted_weights(ballad_data, tmp_path):
    import time

    from safetensors.torch import load_file

    env = {**os.environ, "BALLAD_DATA": str(ballad_data), "OMP_NUM_THREADS": "1"}
    base = ["finetune", "--data", "fmnist-lt", "--model", "ballad-micro", "--epochs", "2", "--batch-size", "64"]
    base += ["--lr", "1e-3", "--optimizer", "adamw", "--workers", "0", "--device", "cpu", "--checkpoint-every", "4"]
    ref = run_ballad([*base, "--out", str(tmp_path / "ref")], env)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    out = tmp_path / "cut"
    cli = [sys.executable, "-m", "cli.main"]
    proc = subprocess.Popen([*cli, *base, "--out", str(out)], cwd=ROOT, env=env, stdout=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (out / "checkpoint.pt").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # somewhere after the first checkpoint, mid-step
    proc.kill()
    assert proc.wait() == -9
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert 4 <= step < 38  # killed part-way (2 epochs of 19 steps)
    again = run_ballad([*base, "--out", str(out), "--resume"], env)
    assert again.returncode == 0, again.stdout + again.stderr
    a = load_file(str(tmp_path / "ref" / "model-last" / "open_clip_model.safetensors"))
    b = load_file(str(out / "model-last" / "open_clip_model.safetensors"))
    # the resumed run replays the same batches through the same ops from an exact checkpoint: bitwise
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list(out.glob(".*.tmp")) == [] and list(out.rglob(".*.tmp")) == []
