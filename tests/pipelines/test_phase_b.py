"""Phase-B composers (ballad_cache.pipelines.phase_b): fit_on_cache and run_sweep on a synthetic cache."""

from __future__ import annotations

import json

import torch

from ballad_cache.heads.adapter import TrainRows, fit_adapters
from ballad_cache.heads.artifacts import load_adapter
from ballad_cache.heads.config import AdapterConfig
from ballad_cache.pipelines.phase_b import expand_grid, fit_on_cache, run_sweep


def test_fit_on_cache_writes_the_adapter_fit_adapters_trains(lt_cache, tmp_path):
    cfg = AdapterConfig(epochs=2, batch_size=64)
    meta = fit_on_cache(lt_cache, cfg, tmp_path / "a")
    val = lt_cache.load_split("val").eval_view()
    direct = fit_adapters(
        TrainRows.from_split(lt_cache.load_split("train")),
        lt_cache.text_embeddings(),
        [cfg],
        val=(val.features, val.labels),
    )
    assert torch.equal(load_adapter(tmp_path / "a", lt_cache).head.state()["weight"], direct.weights[0])
    assert meta["best_epoch"] == direct.best_epoch[0] and meta["config"]["precision"] == "fp32"


def test_a_sweep_ranks_on_val_keeps_the_best_and_resumes(lt_cache, tmp_path):
    grid = expand_grid(AdapterConfig(epochs=2, batch_size=64), ratio=[0.05, 0.4])
    result = run_sweep(lt_cache, grid, tmp_path / "s")
    vals = [p["val"]["top1"] for p in result.points]
    assert vals == sorted(vals, reverse=True)
    best = json.loads((tmp_path / "s" / "best" / "adapter.json").read_text())
    assert best["config"] == result.points[0]["config"] and best["val"] == result.points[0]["val"]
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s" / "points").iterdir()}
    again = run_sweep(lt_cache, grid, tmp_path / "s")
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "s" / "points").iterdir()} == mtimes  # not retrained
    assert [p["key"] for p in again.points] == [p["key"] for p in result.points]


def test_an_option_the_head_does_not_read_is_refused(lt_cache, tmp_path):
    """Catches an option accepted and ignored: `--neighbours` with the text head, `--ratio` with tip, `--la-tau` with
    the ce loss, in fit-adapter (one line, nothing written) and in a sweep where no point reads it (exit 2); where
    some points read it, the others keep its default."""
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    common = ["--cache", str(lt_cache.path), "--device", "cpu", "--epochs", "2", "--batch-size", "64"]
    for extra, named, applies in (
        (["--neighbours", "5"], "--neighbours", "tip"),
        (["--head", "tip", "--ratio", "0.5"], "--ratio", "text"),
        (["--la-tau", "0.5"], "--la-tau", "--loss la"),
    ):
        r = runner.invoke(app, ["fit-adapter", *common, "--out", str(tmp_path / "ad"), *extra])
        assert r.exit_code == 1, r.output
        line = " ".join(r.output.split())
        assert named in line and applies in line and "does not read" in line
        assert not (tmp_path / "ad").exists()
    r = runner.invoke(app, ["sweep", *common, "--out", str(tmp_path / "sw"), "--neighbours", "5,6"])
    assert r.exit_code == 2 and "--neighbours" in r.output, r.output
    r = runner.invoke(app, ["sweep", *common, "--out", str(tmp_path / "sw"), "--family", "tip", "--ratio", "0.3"])
    assert r.exit_code == 2 and "--ratio" in r.output, r.output
    points = expand_grid(AdapterConfig(epochs=2, batch_size=64), head=["text", "tip"], neighbours=[5])
    assert sorted((p.head, p.neighbours) for p in points) == [("text", 256), ("tip", 5)]


def test_a_damaged_sweep_point_is_one_line(lt_cache, tmp_path):
    """Catches a point file that is valid JSON but not a point record, or a winner's truncated .safetensors, ending
    the sweep in a traceback instead of one line naming the file."""
    import pytest

    from ballad_cache.errors import BalladError

    grid = expand_grid(AdapterConfig(epochs=2, batch_size=64), ratio=[0.05, 0.4])
    result = run_sweep(lt_cache, grid, tmp_path / "s")
    best = tmp_path / "s" / "points" / f"{result.best['key']}.safetensors"
    best.write_bytes(best.read_bytes()[:100])
    with pytest.raises(BalladError, match=f"{best.name} is not a valid tensor file"):
        run_sweep(lt_cache, grid, tmp_path / "s")
    best.unlink()  # as the message says: the point is trained again
    assert run_sweep(lt_cache, grid, tmp_path / "s").best["key"] == result.best["key"]
    point = tmp_path / "s" / "points" / f"{result.points[1]['key']}.json"
    point.write_text("[1, 2]")
    with pytest.raises(BalladError, match=f"{point.name} is not a sweep point record"):
        run_sweep(lt_cache, grid, tmp_path / "s")


def test_family_grids_take_a_single_value_for_their_own_axes(lt_cache):
    """Catches `sweep --family tip --beta 3` sweeping tip's own β grid as if 3 had not been given, and a --head that
    contradicts the family accepted without a word."""
    import pytest

    from ballad_cache.pipelines.phase_b import family_grid

    points = family_grid("tip", {"beta": [3.0]})
    assert {p.beta for p in points} == {3.0} and len(points) == 1008 // 6
    assert {(p.alpha, p.neighbours) for p in family_grid("tip", {"alpha": [2.0], "neighbours": [5]})} == {(2.0, 5)}
    with pytest.raises(ValueError, match="picks the head"):
        family_grid("ncm", {"head": ["gda"]})


def test_an_edited_or_moved_adapter_record_is_refused_or_found(lt_cache, tmp_path, monkeypatch):
    """Catches an adapter.json whose training counts were edited reaching the scoring as a shape error (a
    traceback), a sweep point JSON of another shape silently retrained, and the cache recorded relative to the
    working folder (export from elsewhere could not find it)."""
    import pytest

    from ballad_cache.errors import BalladError

    monkeypatch.chdir(lt_cache.path.parent)
    fit_on_cache(lt_cache.__class__("cache"), AdapterConfig(epochs=2, batch_size=64), tmp_path / "a")
    meta_path = tmp_path / "a" / "adapter.json"
    meta = json.loads(meta_path.read_text())
    assert meta["cache"] == str(lt_cache.path.resolve())
    meta["train_class_counts"] = [1, 2]
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(BalladError, match="train_class_counts is not 10 counts"):
        load_adapter(tmp_path / "a", lt_cache)
    grid = expand_grid(AdapterConfig(epochs=2, batch_size=64), ratio=[0.05, 0.4])
    result = run_sweep(lt_cache, grid, tmp_path / "s")
    point = tmp_path / "s" / "points" / f"{result.points[1]['key']}.json"
    point.write_text("{}")
    with pytest.raises(BalladError, match="is not a sweep point record"):
        run_sweep(lt_cache, grid, tmp_path / "s")


def test_written_files_have_a_plain_files_mode(lt_cache, tmp_path):
    """Catches adapters and weights written 0600 (safetensors' own mode), unreadable to the other users of a shared
    folder: every file fit-adapter writes has 0666 less the umask."""
    import os

    mask = os.umask(0)
    os.umask(mask)  # read it back as it was
    fit_on_cache(lt_cache, AdapterConfig(epochs=2, batch_size=64), tmp_path / "a")
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "a").iterdir()}
    assert modes == {"adapter.safetensors": 0o666 & ~mask, "adapter.json": 0o666 & ~mask}
