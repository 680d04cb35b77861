"""Atomic file writes, hashing and lock files (run folders built on them: `store.runs`).

Every file ballad writes goes to a temporary name in the destination folder first and is moved into place
with `os.replace`, so a crash, Ctrl-C or a full disk never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BalladError, setting

TMP_SUFFIX = ".tmp"
LOCK_FILE = ".ballad.lock"  # a run folder's lock (`RunLock`)


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask can only be read by setting it


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `final`; on success move it to `final`, on any error delete it.

    Args:
        final: where the finished file should end up.

    Raises:
        BalladError: when the disk is full or the folder is not writable (the temporary file is removed).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.{os.getpid()}{TMP_SUFFIX}")
    try:
        yield tmp
        _fsync(tmp)
        # a plain file's mode (0666 less the umask): some writers (safetensors) create their file 0600, which would
        # keep an exported model from the other users of a shared folder
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        disk = disk_error(exc, final)
        if disk is not None:
            raise disk from exc
        raise


DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS)


def disk_error(exc: BaseException, target: str | os.PathLike[str]) -> BalladError | None:
    """The one-line error for a full, read-only or forbidden disk behind `exc`, or None for other errors."""
    code = exc.errno if isinstance(exc, OSError) and exc.errno in DISK_ERRNOS else None
    if code is None and isinstance(exc, (OSError, RuntimeError)):  # HDF5 reports a failed write in its message
        text = str(exc)
        code = next((c for c in (errno.ENOSPC, errno.EDQUOT) if f"errno = {c}," in text), None)
    if code is None:
        return None
    return BalladError(f"cannot write {target}: {os.strerror(code)}; free space or pick another {setting('out')}")


def ensure_free_space(target: str | os.PathLike[str], needed: int) -> None:
    """Refuse before writing `needed` bytes to `target` when its disk has less free space (10% margin).

    For writers that fail badly on a full disk (torch.save raises an opaque RuntimeError there).
    """
    folder = Path(target).parent
    free = shutil.disk_usage(folder).free
    if free < needed * 1.1 + (1 << 20):
        raise BalladError(
            f"cannot write {target}: {needed / 2**20:.1f} MiB needed, {free / 2**20:.1f} MiB free on its disk; "
            f"free space or pick another {setting('out')}"
        )


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def write_bytes(final: str | os.PathLike[str], payload: bytes) -> None:
    """Write `payload` to `final` atomically."""
    with atomic_path(final) as tmp, open(tmp, "wb") as f:
        f.write(payload)


def write_json(final: str | os.PathLike[str], obj: Any) -> None:
    """Write `obj` as indented JSON to `final` atomically."""
    write_bytes(final, (json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n").encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, turning a missing or malformed file into a one-line BalladError."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise BalladError(f"{path} does not exist") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BalladError(f"{path} is not valid JSON ({exc}); delete it and rerun the command that writes it") from exc
    except OSError as exc:  # a path through a regular file, a directory named like the file, no permission
        raise BalladError(f"cannot read {path}: {exc.strerror or exc}") from None


def append_jsonl(path: str | os.PathLike[str], record: dict[str, Any]) -> None:
    """Append one JSON line (append-only metrics logs; a torn last line is skipped by readers)."""
    with open(path, "a") as f:
        f.write(json.dumps(record, default=str) + "\n")
        f.flush()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    """Stable hex sha256 of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def remove_stale_temps(*folders: str | os.PathLike[str]) -> int:
    """Delete temporary files that a killed process left in `folders` (missing ones are fine); returns the count."""
    removed = 0
    for p in (t for folder in folders for t in Path(folder).glob(f".*{TMP_SUFFIX}")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()
            removed += 1
    return removed


class RunLock:
    """An exclusive lock file in a run directory, so two commands never write into one folder at once.

    The file holds `host:pid`. A lock left by a process that no longer runs on this host is taken over.
    """

    def __init__(self, folder: str | os.PathLike[str], name: str = LOCK_FILE) -> None:
        self.path = Path(folder) / name
        self._held = False

    def acquire(self) -> RunLock:
        """Take the lock or raise BalladError naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{socket.gethostname()}:{os.getpid()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text().strip() if self.path.exists() else ""
                if self._is_stale(owner):
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                raise BalladError(
                    f"{self.path.parent} is in use by another ballad process ({owner or 'unknown'}); "
                    f"wait for it, or delete {self.path} if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                f.write(me)
            self._held = True
            return self
        raise BalladError(f"could not take the lock {self.path}; delete it and rerun")

    @staticmethod
    def _is_stale(owner: str) -> bool:
        host, _, pid = owner.partition(":")
        if host != socket.gethostname() or not pid.isdigit():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def release(self) -> None:
        """Remove the lock file if this object holds it."""
        if self._held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            self._held = False

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
