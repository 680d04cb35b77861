"""Atomic writes and locks (ballad_cache.atomic)."""

from __future__ import annotations

import os

import pytest

from ballad_cache.atomic import RunLock, atomic_path, read_json, remove_stale_temps, write_json
from ballad_cache.errors import BalladError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert read_json(target) == {"v": 1} and sorted(os.listdir(tmp_path)) == ["a.json"]


def test_stale_temporaries_are_removed_and_bad_json_is_one_line(tmp_path):
    (tmp_path / ".x.123.tmp").write_text("left by a killed run")
    assert remove_stale_temps(tmp_path, tmp_path / "missing") == 1
    (tmp_path / "b.json").write_text("{not json")
    with pytest.raises(BalladError, match="b.json is not valid JSON"):
        read_json(tmp_path / "b.json")


def test_a_lock_is_exclusive_and_released(tmp_path):
    with RunLock(tmp_path):
        with pytest.raises(BalladError, match="in use by another ballad process"):
            RunLock(tmp_path).acquire()
    with RunLock(tmp_path):
        pass
    assert not (tmp_path / ".ballad.lock").exists()
