"""Run folders (ballad_cache.store.runs): one guard for every command's --out."""

from __future__ import annotations

import json

import pytest

from ballad_cache.errors import BalladError
from ballad_cache.store.runs import RunDone, RunFolder, check_writable


def test_a_finished_run_is_refused_unless_overwrite_resume_or_compatible(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, "fit", ("done.txt",)) as folder:
        folder.write_config({"a": 1}, points=["k1"])
        (out / "done.txt").write_text("result")
    assert json.loads((out / "config.json").read_text())["command"] == "fit"
    (out / "config.json").rename(out / "kept.json")  # a finished run of unknown config: refused before any work
    with pytest.raises(BalladError, match="already holds a run \\(done.txt\\); pass `overwrite=True`"):
        RunFolder(out, "fit", ("done.txt",)).prepare()
    (out / "kept.json").rename(out / "config.json")
    RunFolder(out, "fit", ("done.txt",), resume=True).prepare()
    same = RunFolder(out, "fit", ("done.txt",), compatible=lambda old: set(old["points"]) <= {"k1", "k2"})
    same.prepare()
    assert same.continues
    with pytest.raises(BalladError, match="another fit run"):
        RunFolder(out, "fit", ("done.txt",), compatible=lambda old: False).prepare()
    folder = RunFolder(out, "fit", ("done.txt",), overwrite=True, clean=("done.txt",))
    folder.prepare()
    assert (out / "done.txt").exists()  # nothing is removed before the lock is held
    with folder:
        assert not (out / "done.txt").exists()


def test_a_finished_run_is_done_when_its_config_is_this_runs_and_refused_naming_each_field_otherwise(tmp_path):
    """Catches a finished folder reused for a run of another config (the demo reporting one model over another's
    files), a refusal that does not name what differs with both values, and a refusal that touches the folder."""
    out = tmp_path / "run"
    with RunFolder(out, "fit", ("done.txt",)) as folder:
        folder.write_config({"lr": 0.2, "sampler": "class-aware"}, model="ballad-tiny", cache="c1")
        (out / "done.txt").write_text("result")
    written = (out / "config.json").read_bytes()
    with pytest.raises(RunDone, match="already holds a run \\(done.txt\\) made with this same config"):
        with RunFolder(out, "fit", ("done.txt",)) as folder:
            folder.write_config({"lr": 0.2, "sampler": "class-aware"}, model="ballad-tiny", cache="c1")
            (out / "done.txt").write_text("overwritten")  # never reached
    with pytest.raises(BalladError) as info:
        with RunFolder(out, "fit", ("done.txt",)) as folder:
            folder.write_config({"lr": 0.4, "sampler": "class-aware"}, model="ballad-lite", cache="c1")
    assert not isinstance(info.value, RunDone)
    message = str(info.value)
    assert "model 'ballad-tiny' -> 'ballad-lite'" in message and "config.lr 0.2 -> 0.4" in message
    assert "sampler" not in message and "cache" not in message and "pass `overwrite=True`" in message
    assert (out / "done.txt").read_text() == "result" and (out / "config.json").read_bytes() == written
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "done.txt"]  # no lock or temporary left
    with RunFolder(out, "fit", ("done.txt",), overwrite=True, clean=("done.txt",)) as folder:  # redone
        assert not (out / "done.txt").exists()
        folder.write_config({"lr": 0.4, "sampler": "class-aware"}, model="ballad-lite", cache="c1")
    assert json.loads((out / "config.json").read_text())["model"] == "ballad-lite"


def test_a_refused_or_failed_run_leaves_the_folder_as_it_found_it(tmp_path):
    """Catches an empty folder or a stray config.json left by a run that failed before writing any result, and a
    user's files or config.json lost by one."""
    out = tmp_path / "new" / "run"
    with pytest.raises(BalladError, match="bad cache"):
        with RunFolder(out, "fit", ("done.txt",)) as folder:
            folder.write_config({"lr": 0.2})
            assert (out / "config.json").exists() and (out / ".ballad.lock").exists()
            (out / ".done.txt.tmp").write_text("half")  # a temporary of the result being written
            raise BalladError("bad cache")
    assert list(tmp_path.iterdir()) == []  # both folders it created are gone
    with pytest.raises(KeyboardInterrupt):
        with RunFolder(out, "fit", ("done.txt",)) as folder:
            folder.write_config({"lr": 0.2})
            (out / "metrics.jsonl").write_text("{}")  # a result: the run's folder is kept to resume or read
            raise KeyboardInterrupt
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.jsonl"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    (mine / "config.json").write_text('{"command": "fit", "config": {"lr": 0.1}}')
    with pytest.raises(BalladError, match="bad cache"):
        with RunFolder(mine, "fit", ("done.txt",)) as folder:
            folder.write_config({"lr": 0.2})
            raise BalladError("bad cache")
    assert sorted(p.name for p in mine.iterdir()) == ["config.json", "notes.txt"]
    assert json.loads((mine / "config.json").read_text())["config"] == {"lr": 0.1}  # the one it replaced, back


def test_a_started_run_is_reused_and_outputs_are_checked_before_work(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, "fit", ("done.txt",)) as folder:
        folder.write_config(None)
    RunFolder(out, "fit", ("done.txt",)).prepare()  # config.json alone is not a finished run
    (tmp_path / "file").write_text("x")
    with pytest.raises(BalladError, match="not a directory"):
        RunFolder(tmp_path / "file", "fit").prepare()
    with pytest.raises(BalladError, match="is a file"):
        check_writable(tmp_path / "file" / "preds.csv")
    with pytest.raises(BalladError, match="is a directory"):
        check_writable(tmp_path)


def test_overwrite_removes_nothing_while_another_process_holds_the_folder(tmp_path, monkeypatch):
    """--overwrite into a folder another run is writing must not delete that run's files before the lock refuses."""
    from ballad_cache.atomic import RunLock

    out = tmp_path / "sweep"
    out.mkdir()
    (out / "results.csv").write_text("the running sweep's results")
    monkeypatch.setattr(RunLock, "_is_stale", staticmethod(lambda owner: False))
    (out / ".ballad.lock").write_text("otherhost:1")
    with pytest.raises(BalladError, match="in use"):
        with RunFolder(out, "sweep", ("results.csv",), overwrite=True, clean=("results.csv",)):
            pass
    assert (out / "results.csv").read_text() == "the running sweep's results"


def test_a_refused_export_or_a_fit_on_a_bad_cache_leaves_no_folder(lt_cache, tmp_path):
    """Catches the empty folder and the stray config.json that a refused `export` (an adapter fitted on another
    model's features) or a `fit-adapter` stopped by a damaged shard leaves behind."""
    from typer.testing import CliRunner

    from cli.main import app

    runner = CliRunner()
    adapter = tmp_path / "adapter"
    r = runner.invoke(app, ["fit-adapter", "--cache", str(lt_cache.path), "--out", str(adapter), "--epochs", "1"])
    assert r.exit_code == 0, r.output
    out = tmp_path / "exports" / "e"
    r = runner.invoke(app, ["export", "--model", "ballad-micro", "--adapter", str(adapter), "--out", str(out)])
    assert r.exit_code == 1 and "synthetic" in r.output, r.output  # the adapter's features are another model's
    assert not (tmp_path / "exports").exists()
    shard = lt_cache.path / "train-00000.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated: found when the fit reads it
    r = runner.invoke(app, ["fit-adapter", "--cache", str(lt_cache.path), "--out", str(tmp_path / "fit")])
    assert r.exit_code == 1 and "train-00000.h5" in r.output, r.output
    assert not (tmp_path / "fit").exists()
