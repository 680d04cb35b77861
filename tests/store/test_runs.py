"""Run folders (ballad_cache.store.runs): one guard for every command's --out."""

from __future__ import annotations

import json

import pytest

from ballad_cache.errors import BalladError
from ballad_cache.store.runs import RunFolder, check_writable


def test_a_finished_run_is_refused_unless_overwrite_resume_or_compatible(tmp_path):
    out = tmp_path / "run"
    with RunFolder(out, "fit", ("done.txt",)) as folder:
        folder.write_config({"a": 1}, points=["k1"])
        (out / "done.txt").write_text("result")
    assert json.loads((out / "config.json").read_text())["command"] == "fit"
    with pytest.raises(BalladError, match="already holds a run \\(done.txt\\); pass `overwrite=True`"):
        RunFolder(out, "fit", ("done.txt",)).prepare()
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
