"""Run folders: one mechanism for every command that writes into `--out`.

A run folder is checked (not a file, writable), created, locked against a second process, cleaned of temporaries
a killed run left, and given `config.json` (the command, ballad's version and the resolved config). Whether a
folder that already holds results may be written into is decided here, once:

- it holds none of the command's finished markers (a run that only started, or nothing): go ahead;
- it holds them and the caller resumes (`finetune --resume`), or `compatible(old config.json)` says the new run
  continues the old one (a sweep whose grid contains the old grid): go ahead, keeping what is there;
- it holds them and `overwrite` is set: the files in `clean` are removed first, then go ahead;
- otherwise: refuse with one line naming the marker and the fix.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from ..atomic import LOCK_FILE, RunLock, read_json, remove_stale_temps, write_json
from ..errors import BalladError, setting

CONFIG = "config.json"
SUMMARY = "summary.json"  # a finished run's result (phase A; the demo's report), written last


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

    def prepare(self) -> Path:
        """Check and create the folder; decide whether its results may be written over (see the module docstring).
        Nothing is removed here: `overwrite` cleans only once the lock is held (on entering the `with` block).

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
            else:
                what = f"another {self.command} run" if self.compatible is not None else "a run"
                raise BalladError(
                    f"{out} already holds {what} ({held[0]}); pass {setting('overwrite', True)} or pick another "
                    f"{setting('out')}"
                )
        out.mkdir(parents=True, exist_ok=True)
        return out

    def _clean(self) -> None:
        """With `overwrite`, remove the old run's `clean` files (the lock is held)."""
        if not (self._held and self.overwrite):
            return
        for name in self.clean:
            target = self.path / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                with contextlib.suppress(FileNotFoundError):
                    target.unlink()

    def write_config(self, config: Any = None, **extra: Any) -> None:
        """Write `config.json`: the command, ballad's version, `extra` and the config (a dataclass or a dict)."""
        if not self.main:
            return
        from .. import __version__

        body = asdict(config) if is_dataclass(config) and not isinstance(config, type) else config
        write_json(self.path / CONFIG, {"command": self.command, "ballad": __version__, **extra, "config": body})

    def __enter__(self) -> RunFolder:
        self.prepare()
        if self._lock is not None:
            self._lock.acquire()
        if self.main:
            self._clean()
            remove_stale_temps(self.path)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._lock is not None:
            self._lock.release()


def _read_config(folder: Path) -> dict[str, Any] | None:
    try:
        body = read_json(folder / CONFIG)
    except BalladError:
        return None
    return body if isinstance(body, dict) else None
