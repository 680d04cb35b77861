"""Watching runs in TensorBoard and Weights & Biases (`--report-to tensorboard,wandb`, open_clip's spelling).

A `Tracker` sends what a run records to the backends asked for, the same for each: the run's config, scalars at
a step (loss, learning rate, images or rows per second; val top-1 and many/medium/few per epoch), images (the
per-class plot, the sweep heatmap), a sweep's points as one record each (config fields and metrics, the kept best
marked: TensorBoard's HParams dashboard, a wandb table), and a final summary (test metrics, the output folder).

Reporting never changes a result: the trackers only read what the run computed, draw no random numbers and write
nothing the run reads. Only rank 0 of a torchrun reports. A resumed run continues its curves: TensorBoard purges
events at or after the resumed step (`SummaryWriter(purge_step=)`), wandb resumes the same run id (kept in the
run folder) and is given only steps after the last it logged. A backend that fails (a full disk, no network) is
said once and dropped; the run goes on.

TensorBoard events go under `RUN/tb/` (a sweep's points under `RUN/tb/points/KEY/`); wandb writes under
`RUN/wandb/` and honours its own environment (`WANDB_MODE=offline`, `WANDB_PROJECT`, `WANDB_ENTITY`, ...).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from .errors import BalladError
from .progress import NullProgress, Progress
from .registry import Registry

TB_DIR = "tb"
WANDB_DIR = "wandb"
WANDB_STATE = "wandb-run.json"  # the run id a resumed run reports to again, and the last step it logged
CURVE_POINTS = 500  # at most this many logged steps of a curve (every k-th step, the last included)
REPORT_OUTPUTS = (TB_DIR, WANDB_DIR, WANDB_STATE)  # a run folder's files that only the viewers read


class Backend:
    """One viewer a run reports to. Subclasses implement what their library can show."""

    module = ""  # the Python module the backend needs
    extra = ""  # the `pip install 'ballad[EXTRA]'` that brings it

    def __init__(self, folder: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        self.folder, self.run_name = folder, run_name

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars at `step`."""

    def image(self, tag: str, path: Path, step: int) -> None:
        """A PNG file at `step`."""

    def points(self, records: list[dict[str, Any]], metrics: Sequence[str]) -> None:
        """A sweep's points: one record each of config fields and `metrics` (and `best`)."""

    def summary(self, values: dict[str, Any], step: int) -> None:
        """The run's final numbers and facts (test metrics, the output folder), at the run's last step."""

    def close(self, failed: bool = False) -> None:
        """Flush and close (`failed`: the run stopped on an error)."""


def _plain(value: Any) -> Any:
    """A value a viewer's hparams accept: numbers, strings and booleans as they are, anything else as text."""
    if isinstance(value, bool | int | str) or value is None:
        return "none" if value is None else value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return json.dumps(value) if isinstance(value, list | tuple | dict) else str(value)


class TensorBoardBackend(Backend):
    """TensorBoard event files through `torch.utils.tensorboard` (the `tensorboard` package)."""

    module, extra = "tensorboard", "tensorboard"

    def __init__(self, folder: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        super().__init__(folder, run_name, config, resume_step)
        self.writer = SummaryWriter(log_dir=str(folder / TB_DIR), purge_step=resume_step)
        if not resume_step:  # a new run, or one that reports afresh (a sweep's grid)
            text = json.dumps({"run_name": run_name, **config}, indent=2, default=str)
            self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def scalars(self, values: dict[str, float], step: int) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def image(self, tag: str, path: Path, step: int) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"))
        self.writer.add_image(tag, pixels, step, dataformats="HWC")

    def points(self, records: list[dict[str, Any]], metrics: Sequence[str]) -> None:
        from torch.utils.tensorboard.summary import hparams

        # the HParams table shows the settings that tell the points apart (and `best`, `key`); a setting every
        # point shares is in the run's config text, not a column
        fields = [k for k in records[0] if k not in metrics and k not in ("key", "label", "rank")] if records else []
        varying = [k for k in fields if len({json.dumps(_plain(r[k])) for r in records}) > 1 or k == "best"]
        keys = [*varying, "key"]
        for record in records:  # one HParams session a point (its trial: rank and label), its metrics as scalars
            trial = f"{int(record.get('rank', 0)):02d}_{record.get('label') or record['key']}"
            writer = self._point_writer(trial)
            metric_tags = {f"point/{m}": float(record[m]) for m in metrics if record.get(m) is not None}
            exp, ssi, sei = hparams({k: _plain(record[k]) for k in keys}, metric_tags)
            for event in (exp, ssi, sei):
                writer.file_writer.add_summary(event)
            for tag, value in metric_tags.items():
                writer.add_scalar(tag, value, 0)
            writer.close()

    def _point_writer(self, key: str) -> Any:
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(self.folder / TB_DIR / "points" / key))

    def summary(self, values: dict[str, Any], step: int) -> None:
        for tag, value in values.items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                self.writer.add_scalar(tag, value, step)
            else:
                self.writer.add_text(tag, str(value), step)

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbBackend(Backend):
    """A Weights & Biases run (`wandb`); `WANDB_MODE=offline` keeps it in `RUN/wandb/` until `wandb sync`.

    `RUN/wandb-run.json` keeps the run's id and the last step it logged: a resumed run reports to the same run and
    skips the steps it already holds (a run resumed from a checkpoint older than its last log repeats those
    steps, with the same values)."""

    module, extra = "wandb", "wandb"

    def __init__(self, folder: Path, run_name: str, config: dict[str, Any], resume_step: int | None) -> None:
        import os

        import wandb

        super().__init__(folder, run_name, config, resume_step)
        self.state_file = folder / WANDB_STATE
        state = _read_state(self.state_file) if resume_step is not None else {}
        (folder / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        run_id = state.get("id")
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ballad"),
            name=run_name,
            dir=str(folder),
            config=json.loads(json.dumps(config, default=str)),
            id=run_id,
            resume="allow" if run_id else None,
            settings=wandb.Settings(silent=True, console="off"),
        )
        self.logged = int(state.get("last_step", -1))  # steps up to here are in the run already
        self.last_step = max(self.logged + 1, resume_step or 0)
        self._save()

    def _save(self) -> None:
        from .atomic import write_json

        write_json(self.state_file, {"id": self.run.id, "last_step": self.logged})

    def scalars(self, values: dict[str, float], step: int) -> None:
        if step < self.last_step:  # wandb keeps one row a step, in order: a resumed run skips what it holds
            return
        self.run.log(dict(values), step=step)
        self.last_step = step
        if step > self.logged:
            self.logged = step
            self._save()

    def image(self, tag: str, path: Path, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Image(str(path))}, step=max(step, self.last_step))
        self.last_step = max(step, self.last_step)

    def points(self, records: list[dict[str, Any]], metrics: Sequence[str]) -> None:
        import wandb

        names = list(records[0]) if records else []
        columns: list[str | int] = list(names)
        table = wandb.Table(columns=columns, data=[[_plain(r[c]) for c in names] for r in records])
        self.run.log({"sweep/points": table}, step=max(self.last_step, 0))
        self.last_step = max(self.last_step, 0)

    def summary(self, values: dict[str, Any], step: int) -> None:
        self.run.summary.update({k: v if isinstance(v, int | float | str) else str(v) for k, v in values.items()})

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


REPORTERS: Registry[type[Backend]] = Registry("reporter")
REPORTERS.register("none", Backend, help="no viewer (turns off a --config file's report_to)")
REPORTERS.register("tensorboard", TensorBoardBackend, help="TensorBoard event files under RUN/tb/")
REPORTERS.register("wandb", WandbBackend, help="a Weights & Biases run (WANDB_MODE=offline: files under RUN/wandb/)")


def check_reporters(names: Sequence[str]) -> None:
    """Refuse, before any work, a backend whose library is not installed.

    Raises:
        BalladError: one line naming the backend and the install command.
    """
    for name in names:
        backend = REPORTERS.get(name)
        if backend.module and importlib.util.find_spec(backend.module) is None:
            raise BalladError(
                f"--report-to {name} needs the {backend.module} package: pip install 'ballad[{backend.extra}]'"
            )


def curve_steps(total: int, points: int = CURVE_POINTS) -> list[int]:
    """The steps of a `total`-step curve that are logged: every k-th (at most `points`), the last one included."""
    if total <= 0:
        return []
    every = max(1, math.ceil(total / points))
    steps = list(range(every - 1, total, every))
    return steps if steps and steps[-1] == total - 1 else [*steps, total - 1]


class Tracker:
    """What a run reports, sent to every backend asked for (see the module docstring); a no-op without backends or
    off rank 0. Use as a context manager, or call `close()`."""

    def __init__(
        self,
        names: Sequence[str],
        folder: str | Path,
        run_name: str | None,
        config: dict[str, Any],
        resume_step: int | None = None,
        progress: Progress | None = None,
        main: bool = True,
    ) -> None:
        self.progress = progress or NullProgress()
        self.backends: dict[str, Backend] = {}
        if not main:
            return
        folder = Path(folder)
        name = run_name or folder.name
        for backend_name in dict.fromkeys(n for n in names if n != "none"):  # each viewer once

            def start(n: str = backend_name) -> None:
                self.backends[n] = REPORTERS.get(n)(folder, name, config, resume_step)

            self._call(backend_name, start)

    def _call(self, name: str, action: Callable[[], Any]) -> None:
        """Run one backend's action; a failure is said once and the backend dropped: the run goes on."""
        try:
            action()
        except Exception as exc:  # any failure of a viewer library must not stop the run
            self.backends.pop(name, None)
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            self.progress.log(f"--report-to {name} failed ({reason}); the run goes on without it")

    def _each(self, method: str, *args: Any) -> None:
        for name, backend in list(self.backends.items()):
            self._call(name, functools.partial(getattr(backend, method), *args))

    def scalars(self, values: dict[str, float], step: int) -> None:
        """Scalars at `step` (non-finite values are sent as they are: a NaN loss is worth seeing)."""
        self._each("scalars", {k: float(v) for k, v in values.items() if v is not None}, int(step))

    def image(self, tag: str, path: str | Path, step: int = 0) -> None:
        """A PNG at `step` (skipped when the file is not there)."""
        if Path(path).is_file():
            self._each("image", tag, Path(path), int(step))

    def points(self, records: list[dict[str, Any]], metrics: Sequence[str]) -> None:
        """A sweep's points, one record each (config fields, `metrics`, `best`, `key`)."""
        if records:
            self._each("points", records, list(metrics))

    def summary(self, values: dict[str, Any], step: int = 0) -> None:
        """The run's final numbers and facts, at its last step (a resumed run purges and rewrites them there)."""
        self._each("summary", values, int(step))

    def close(self, failed: bool = False) -> None:
        """Flush and close every backend (`failed`: a wandb run is marked failed)."""
        self._each("close", failed)
        self.backends.clear()

    def __enter__(self) -> Tracker:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc: object) -> None:
        self.close(failed=kind is not None)


def _read_state(path: Path) -> dict[str, Any]:
    """A run folder's wandb state (empty when absent or unreadable: a new run starts)."""
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def report_metrics(prefix: str, report: dict[str, Any] | None) -> dict[str, float]:
    """`{prefix}/top1`, `/top5`, `/many`, `/medium`, `/few` of a report (the finite ones)."""
    if not report:
        return {}
    keys = ("top1", "top5", "many", "medium", "few")
    return {f"{prefix}/{k}": float(report[k]) for k in keys if k in report and report[k] == report[k]}
