"""Run folders: one mechanism for every command that writes into `--out`.

A run folder is checked (not a file, writable), created, locked against a second process, cleaned of temporaries
a killed run left, and given `config.json` (the command, ballad's version and the resolved config). Whether a
folder that already holds results may be written into is decided here, once:

- it holds none of the command's finished markers (a run that only started, or nothing): go ahead;
- it holds them and the caller resumes (`finetune --resume`), or `compatible(old config.json)` says the new run
  continues the old one (a sweep whose grid contains the old grid): go ahead, keeping what is there;
- it holds them and `overwrite` is set: the files in `clean` are removed first, then go ahead;
- it holds them and a `config.json`: decided when this run's config is known (`write_config`, which every command
  calls before it writes anything else): the same config raises `RunDone` (the folder already holds this very run:
  the demo reuses it, a command stops saying so), another config is refused naming each field that differs with
  both values;
- otherwise (a finished run with no readable `config.json`): refuse with one line naming the marker and the fix.

A run that is refused or fails before it wrote any result leaves the folder as it found it: the folders it created
are removed, and a `config.json` it wrote is removed (or the one it replaced put back).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from ..atomic import LOCK_FILE, TMP_SUFFIX, RunLock, read_json, remove_stale_temps, write_bytes, write_json
from ..errors import BalladError, setting
from ..tracking import REPORT_OUTPUTS

CONFIG = "config.json"
SUMMARY = "summary.json"  # a finished run's result (phase A; the demo's report), written last
NOT_COMPARED = ("ballad",)  # config.json fields that record who wrote it, not what the run computes


class RunDone(BalladError):
    """The folder already holds a finished run made with this run's `config.json`: nothing to redo. A command
    reports it as an error (pass `overwrite` to redo); the demo catches it and reuses the step's output."""


def check_writable(path: str | os.PathLike[str], kind: str = setting("out")) -> Path:
    """Refuse, before any work, an output path that cannot be written: a directory given for a file, or a parent
    that is a file or not writable (`kind`: the setting the messages name). Returns the path.

    Raises:
        BalladError: one line naming the path and the fix.
    """
    path = Path(path)
    if path.is_dir():
        raise BalladError(f"{path} is a directory; give a file name for {kind}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise BalladError(f"cannot create {path}: {parent} is a file; pick another {kind}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BalladError(f"cannot write under {parent}: permission denied; pick another {kind}")
    return path


class RunFolder:
    """A command's output folder, prepared and locked for the duration of a `with` block.

    Args:
        path: the folder (`--out`).
        command: the command's name, recorded in `config.json`.
        finished: files whose presence means the folder holds a run's results.
        overwrite: write over a finished run (removing `clean` first).
        resume: continue the run the folder holds.
        compatible: given the old `config.json`, whether the new run may continue it without `overwrite`.
        clean: files and folders removed before overwriting a finished run.
        main: whether this process prepares the folder and writes `config.json` (rank 0 under torchrun).
        lock: lock file name (None: no lock, for ranks other than 0 of a run that locks per rank elsewhere).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        command: str,
        finished: Sequence[str] = (),
        *,
        overwrite: bool = False,
        resume: bool = False,
        compatible: Callable[[dict[str, Any]], bool] | None = None,
        clean: Sequence[str] = (),
        main: bool = True,
        lock: str | None = LOCK_FILE,
    ) -> None:
        self.path = Path(path)
        self.command = command
        self.finished = tuple(finished)
        self.overwrite, self.resume, self.compatible = overwrite, resume, compatible
        self.clean = tuple(clean)
        self.main = main
        self._lock = RunLock(self.path, lock) if lock else None
        self.continues = False  # set on entry: the folder held a finished run this one continues
        self._held: list[str] | None = None  # finished markers found by prepare()
        self._finished_config: dict[str, Any] | None = None  # a finished run's config.json, compared by write_config
        # what the folder was before this run, so that a run that fails before any result leaves it so
        self._made: Path | None = None  # the topmost folder this run creates (None: `path` existed)
        self._before: set[str] | None = None  # names in the folder before the run
        self._old_config: bytes | None = None  # the config.json this run may replace
        self._wrote_config = False

    def prepare(self) -> Path:
        """Check the folder and decide whether its results may be written over (see the module docstring). Nothing
        is created or removed here: the folder is created, and `overwrite` cleans, once the `with` block is entered
        (under the lock).

        Raises:
            BalladError: `path` is a file, or holds a finished run this one may not replace.
        """
        out = self.path
        if out.exists() and not out.is_dir():
            raise BalladError(f"{out} exists and is not a directory; pick another {setting('out')}")
        if not self.main or self._held is not None:
            return out
        check_writable(out / CONFIG)
        held = self._held = [name for name in self.finished if (out / name).exists()]
        if held and not (self.overwrite or self.resume):
            old = _read_config(out)
            if self.compatible is not None and old is not None and self.compatible(old):
                self.continues = True
            elif self.compatible is None and old is not None:
                self._finished_config = old  # this run's config decides (write_config)
            else:
                what = f"another {self.command} run" if self.compatible is not None else "a run"
                raise BalladError(
                    f"{out} already holds {what} ({held[0]}); pass {setting('overwrite', True)} or pick another "
                    f"{setting('out')}"
                )
        self._made = _topmost_missing(out)
        self._before = {p.name for p in out.iterdir()} if self._made is None else set()
        self._old_config = (out / CONFIG).read_bytes() if (out / CONFIG).is_file() else None
        return out

    def _clean(self) -> None:
        """With `overwrite`, remove the old run's `clean` files (the lock is held)."""
        if not (self._held and self.overwrite):
            return
        for name in (*self.clean, *REPORT_OUTPUTS):  # the viewers' files of the run replaced go with it
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()

    def write_config(self, config: Any = None, **extra: Any) -> None:
        """Write `config.json`: the command, ballad's version, `extra` and the config (a dataclass or a dict).

        Raises:
            RunDone: the folder holds a finished run with this same config (nothing is written).
            BalladError: it holds a finished run with another config, named field by field (nothing is written).
        """
        if not self.main:
            return
        from .. import __version__

        body = asdict(config) if is_dataclass(config) and not isinstance(config, type) else config
        new = {"command": self.command, "ballad": __version__, **extra, "config": body}
        if self._finished_config is not None:
            self._refuse_or_done(self._finished_config, new)
        write_json(self.path / CONFIG, new)
        self._wrote_config = True

    def _refuse_or_done(self, old: dict[str, Any], new: dict[str, Any]) -> None:
        """Compare a finished run's config.json with this run's: RunDone when equal, else refuse naming fields."""
        held = f"a run ({self._held[0]})" if self._held else "a run"
        redo = f"pass {setting('overwrite', True)} to redo it or pick another {setting('out')}"
        changed = config_changes(old, new)
        if not changed:
            raise RunDone(f"{self.path} already holds {held} made with this same config; {redo}")
        raise BalladError(f"{self.path} already holds {held} made with another config ({'; '.join(changed)}); {redo}")

    def __enter__(self) -> RunFolder:
        self.prepare()
        if self.main:
            self.path.mkdir(parents=True, exist_ok=True)
        try:
            if self._lock is not None:
                self._lock.acquire()
        except BaseException:
            self._remove_made()  # another process holds a folder this run did not make: nothing is removed
            raise
        if self.main:
            self._clean()
            remove_stale_temps(self.path)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        undo = exc_type is not None and self.main and not self._has_results()
        if undo:
            self._restore_config()
            remove_stale_temps(self.path)
        if self._lock is not None:
            self._lock.release()
        if undo:
            self._remove_made()

    def _has_results(self) -> bool:
        """Whether the folder holds anything this run wrote besides config.json, its lock and temporaries."""
        if self._before is None or not self.path.is_dir():
            return False
        # the viewers' files are no result: a failed run leaves the folder as it would without reporting
        ours = {CONFIG, *REPORT_OUTPUTS, *([self._lock.path.name] if self._lock is not None else [])}
        return any(
            p.name not in self._before and p.name not in ours and not p.name.endswith(TMP_SUFFIX)
            for p in self.path.iterdir()
        )

    def _restore_config(self) -> None:
        """Put the folder's config.json back as it was before this run wrote one."""
        if not self._wrote_config:
            return
        if self._old_config is None:
            (self.path / CONFIG).unlink(missing_ok=True)
        else:
            write_bytes(self.path / CONFIG, self._old_config)

    def _remove_made(self) -> None:
        """Remove the folders this run created, innermost first, as far as they are empty."""
        if self._made is None:
            return
        folder = self.path
        while True:
            try:
                folder.rmdir()
            except OSError:  # not empty (another process wrote there meanwhile) or already gone
                return
            if folder == self._made:
                return
            folder = folder.parent


def config_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The fields of two `config.json` bodies that differ, as `name old -> new` (nested fields dotted, values as
    JSON stores them, long ones shortened); fields in `NOT_COMPARED` are left out."""
    flat_old, flat_new = _flatten(old), _flatten(json.loads(json.dumps(new, default=str)))
    changed = []
    for key in [*flat_old, *(k for k in flat_new if k not in flat_old)]:
        if key.split(".")[0] in NOT_COMPARED:
            continue
        a, b = flat_old.get(key, MISSING), flat_new.get(key, MISSING)
        if a != b:
            changed.append(f"{key} {_short(a)} -> {_short(b)}")
    return changed


MISSING = "(absent)"


def _flatten(body: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(body, dict):
        return {prefix: body}
    flat: dict[str, Any] = {}
    for key, value in body.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def _short(value: Any, limit: int = 60) -> str:
    text = value if value is MISSING else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _topmost_missing(path: Path) -> Path | None:
    """The outermost of `path` and its parents that does not exist (what creating `path` creates), or None."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


def _read_config(folder: Path) -> dict[str, Any] | None:
    try:
        body = read_json(folder / CONFIG)
    except BalladError:
        return None
    return body if isinstance(body, dict) else None
