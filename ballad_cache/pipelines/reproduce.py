"""`ballad reproduce RECIPE`: a paper row's stages run in order into one folder, then achieved against expected.

Each stage runs the command a user would run (`run_finetune`, `run_extract`, `run_fit_adapter`, `run_grid`,
`run_evaluate`, `run_export`) into `OUT/STAGE/`, which then holds that command's `config.json`. A rerun resumes: a
stage whose folder holds a finished run of the same config is reused, an interrupted phase A continues from its
checkpoint and an interrupted extraction from its finished shards; a folder holding a run of another config (the
recipe changed) is refused naming each field that differs, unless `overwrite`, which redoes every stage.

The run ends with `OUT/report.json`: per expected metric the achieved and published value and whether it is within
the recipe's tolerance, each stage's wall time and whether it was reused, and the exact commands (also in
`OUT/commands.sh`), so the row can be run by hand. `dry_run` runs nothing: it checks the data against the published
split and that the weights resolve, and prints each stage's command with its estimated cost (`costs.py`).
"""

from __future__ import annotations

import shlex
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from ..atomic import read_json, write_bytes, write_json
from ..errors import BalladError
from ..heads.metrics import summary
from ..progress import NullProgress, Progress, Report
from ..store.runs import CONFIG, SUMMARY, RunDone, RunFolder
from ..tracking import TB_DIR, Tracker, check_reporters
from .configs import Reporting
from .recipes import Recipe, Stage, check_data, environment, load_data, load_recipe, model_stages, weights_status

REPORT = "report.json"
COMMANDS = "commands.sh"


@dataclass
class StageRun:
    """What one stage did: its result (the command's output record), whether it was reused, its wall time."""

    result: dict[str, Any]
    reused: bool
    seconds: float


def stage_command(recipe: Recipe, stage: Stage, data: str | None, out: str | Path, device: str = "auto") -> str:
    """The shell command that runs `stage` by hand, as `reproduce` runs it (environment the dataset reads first)."""
    places = recipe.places(data, out)
    options = stage.resolved(places)
    if stage.kind.takes_data and "data" not in options:
        options = {"data": recipe.dataset_spec(data), **options}
    words = ["ballad", stage.command]
    for key, value in {**options, "out": places[stage.name]}.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            words += _bool_flag(stage, key, value)
        elif value is None:
            continue
        else:
            text = ",".join(str(v) for v in value) if isinstance(value, (list, tuple)) else str(value)
            words += [flag, text]
    if stage.command in ("finetune", "extract-features", "fit-adapter", "sweep"):
        words += ["--device", device]
    env = [f"{k}={shlex.quote(v)}" for k, v in recipe.env(data).items() if v] if stage.kind.takes_data else []
    return " ".join(env + [shlex.quote(w) for w in words])


def _bool_flag(stage: Stage, key: str, value: bool) -> list[str]:
    """The words that set a boolean option as the CLI spells it: its `--on/--off` pair, or its flag when on and
    nothing when off (every such flag is off by default).

    Raises:
        ValueError: a flag that is on by default has no way to turn it off.
    """
    config = stage.kind.config
    meta: Mapping[str, Any] = next((f.metadata for f in fields(config) if f.name == key), {}) if config else {}
    flag = str(meta.get("flag") or "--" + key.replace("_", "-"))
    on, _, off = flag.partition("/")
    if off:
        return [on if value else off]
    default = next((f.default for f in fields(config) if f.name == key), False) if config is not None else False
    if not value and default is True:
        raise ValueError(f"{flag} is on by default and has no off flag")
    return [on] if value else []


def run_stage(
    recipe: Recipe,
    stage: Stage,
    data: str | None,
    out: Path,
    device: torch.device,
    overwrite: bool,
    progress: Progress,
    report: Reporting | None = None,
) -> StageRun:
    """Run (or reuse, or resume) one stage into `out/STAGE`, reported to `report.report_to` under the run name
    `NAME/STAGE` (a training stage reports itself; a reused one reports nothing); returns what it did.

    Raises:
        BalladError: the stage's folder holds a run of another config (without `overwrite`), or the stage failed.
    """
    from ..models.clip import local_dir_name
    from .evaluate import run_evaluate
    from .export import run_export
    from .extract import run_extract
    from .finetune import CHECKPOINT, run_finetune
    from .phase_b import point_key, run_fit_adapter, run_grid

    places = recipe.places(data, out)
    options = stage.resolved(places)
    folder = Path(places[stage.name])
    spec = str(options.get("data") or recipe.dataset_spec(data))
    config = stage.config(places)
    own = Reporting(report.report_to, f"{report.run_name or out.name}/{stage.name}") if report else None
    t0 = time.perf_counter()
    reused = False
    result: dict[str, Any]
    with environment({k: v for k, v in recipe.env(data).items() if v}):
        if stage.command == "finetune":
            resume = not overwrite and (folder / CHECKPOINT).exists() and not (folder / SUMMARY).exists()
            try:
                result = run_finetune(
                    spec, options["model"], options.get("pretrained"), folder, config, device, resume, overwrite,
                    progress, own,
                ) or {}  # fmt: skip
            except RunDone:
                result, reused = read_json(folder / SUMMARY), True
        elif stage.command == "extract-features":
            before = _manifest_fingerprint(folder)
            manifest = run_extract(
                spec, options["model"], options.get("pretrained"), folder, replace(config, overwrite=overwrite),
                device, progress,
            )  # fmt: skip
            result = manifest or {}
            reused = not overwrite and before is not None and before == result.get("config_fingerprint")
        elif stage.command == "fit-adapter":
            try:
                result = run_fit_adapter(options["cache"], folder, config, device, overwrite, progress, own)
            except RunDone:
                result, reused = read_json(folder / "adapter.json"), True
        elif stage.command == "sweep":
            from ..store.cache import FeatureCache

            fingerprint = FeatureCache(options["cache"]).fingerprint
            reused = not overwrite and _sweep_finished(folder, [point_key(c, fingerprint) for c in config])
            swept = run_grid(  # a reused sweep reports nothing again
                options["cache"], folder, config, options.get("metric", "top1"), device, overwrite, progress,
                None if reused else own,
            )  # fmt: skip
            result = {"best": swept.best, "val": swept.best["val"], "test": swept.test}
        elif stage.command == "evaluate":
            try:
                result = run_evaluate(options["cache"], options.get("adapter"), config, folder, overwrite)
            except RunDone:
                result, reused = read_json(folder / "result.json"), True
        elif stage.command == "export":
            try:
                model = options["model"]
                run_export(
                    model, options["adapter"], folder, options.get("pretrained"), options.get("cache"), overwrite
                )
            except RunDone:
                reused = True
            result = {"export": str(folder), "model": local_dir_name(folder)}
        else:  # load_recipe admits only the commands above
            raise ValueError(f"no stage runs {stage.command}")
    if reused:
        progress.log(f"{stage.name}: already done (its folder holds this run's output)")
    return StageRun(result, reused, round(time.perf_counter() - t0, 2))


def achieved(recipe: Recipe, runs: dict[str, StageRun]) -> dict[str, float]:
    """The headline numbers of the stage and head the recipe's expected numbers are about."""
    exp = recipe.expected
    result = runs[exp.stage].result
    stage = recipe.stage(exp.stage)
    if stage.command == "evaluate":
        if exp.head not in result.get("heads", {}):
            raise BalladError(f"{recipe.path}: expected.head '{exp.head}' is not among {', '.join(result['heads'])}")
        return summary(result["heads"][exp.head])
    numbers = result.get("test") if stage.command == "sweep" else result.get("val")
    if not numbers:
        raise BalladError(f"{recipe.path}: stage '{exp.stage}' reports no numbers to compare")
    return {k: float(v) for k, v in numbers.items()}


def compare(recipe: Recipe, numbers: dict[str, float]) -> list[dict[str, Any]]:
    """Per expected metric: achieved, expected (None: not published), their difference and whether it is within
    the recipe's tolerance (None where there is nothing to compare, or where variants changed the recipe: its
    expected numbers are the recipe's own run's)."""
    rows = []
    for metric, expected in recipe.expected.metrics.items():
        got = numbers.get(metric)
        diff = None if expected is None or got is None else round(got - expected, 2)
        rows.append(
            {
                "metric": metric,
                "achieved": got,
                "expected": expected,
                "difference": diff,
                "within_tolerance": None if diff is None or recipe.applied else abs(diff) <= recipe.expected.tolerance,
            }
        )
    return rows


def run_recipe(
    recipe: Recipe,
    data: str | None,
    out: Path,
    device: torch.device,
    overwrite: bool = False,
    progress: Progress | None = None,
    report: Reporting | None = None,
) -> tuple[dict[str, Any], dict[str, StageRun]]:
    """Run every stage of `recipe` into `out` and write `report.json` and `commands.sh` there (the caller holds the
    folder: `reproduce`, the demo); returns the report and each stage's run.

    Raises:
        BalladError: a stage's folder holds another config's run (without `overwrite`), or a stage failed.
    """
    progress = progress or NullProgress()
    out.mkdir(parents=True, exist_ok=True)
    commands = [stage_command(recipe, s, data, out, device.type) for s in recipe.stages]
    before = _stage_seconds(out / REPORT)  # what the stages a rerun reuses took when they ran
    runs: dict[str, StageRun] = {}
    for i, stage in enumerate(recipe.stages, start=1):
        progress.log(f"{i}/{len(recipe.stages)} {stage.name}: ballad {stage.command}")
        runs[stage.name] = run_stage(recipe, stage, data, out, device, overwrite, progress, report)
        if runs[stage.name].reused and stage.name in before:
            runs[stage.name].seconds = before[stage.name]
    numbers = achieved(recipe, runs)
    body = {
        "recipe": recipe.name,
        "variants": list(recipe.applied),
        "paper": recipe.paper,
        "row": recipe.row,
        "data": data,
        "device": str(device),
        "metrics": compare(recipe, numbers),
        "achieved": numbers,
        "expected_source": recipe.expected.source,
        "tolerance": recipe.expected.tolerance,
        "note": " ".join(
            (
                [f"variants {', '.join(recipe.applied)} applied: the expected numbers are the recipe's own."]
                if recipe.applied
                else []
            )
            + ([recipe.expected.note] if recipe.expected.note else [])
        ),
        "stages": [
            {
                "name": s.name,
                "command": cmd,
                "seconds": round(runs[s.name].seconds, 2),
                "reused": runs[s.name].reused,
                "folder": str(out / s.name),
            }
            for s, cmd in zip(recipe.stages, commands, strict=True)
        ],
    }
    write_bytes(out / COMMANDS, ("#!/usr/bin/env bash\nset -euo pipefail\n" + "\n".join(commands) + "\n").encode())
    write_json(out / REPORT, body)
    report_run(report, out, recipe, body, progress)
    return body, runs


def reproduce(
    recipe: Recipe | str,
    data: str | None,
    out: str | Path,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    report: Reporting | None = None,
) -> dict[str, Any]:
    """`ballad reproduce`: lock `out`, record the recipe and data in its `config.json`, run every stage of `recipe`
    (see the module docstring); returns the report (`out/report.json`).

    Raises:
        BalladError: the recipe needs a data root and none was given, `out` holds another recipe's run, a stage's
            folder holds another config's run, or a stage failed.
    """
    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    check_reporters(report.report_to if report else ())
    _require_data(recipe, data)
    same = {"recipe": recipe.name, "data": data}  # a rerun of this row continues; the stages decide what is reused
    held = _old_run(Path(out))
    if held is not None and not overwrite:
        changed = [f"{k} {held.get(k)!r} -> {v!r}" for k, v in same.items() if held.get(k) != v]
        if changed:
            raise BalladError(
                f"{out} holds the reproduce run of another row ({'; '.join(changed)}); pass --overwrite or pick "
                "another --out"
            )
    try:
        check_data(recipe, data)
    except BalladError as exc:
        (progress or NullProgress()).log(f"warning: {exc}; the numbers will not be comparable with the paper's")
    compatible = lambda old: all(old.get(k) == v for k, v in same.items())  # noqa: E731
    with RunFolder(out, "reproduce", (REPORT,), overwrite=overwrite, compatible=compatible) as folder:
        folder.write_config(None, recipe=recipe.name, data=data)
        body, _ = run_recipe(recipe, data, Path(out), torch.device(device), overwrite, progress, report)
    return body


def report_run(
    report: Reporting | None, out: Path, recipe: Recipe, body: dict[str, Any], progress: Progress | None
) -> None:
    """Send a finished recipe run to the viewers: achieved and expected per metric, each stage's seconds, the
    evaluate stage's per-class plot and the sweep's heatmap where the run drew them, and the output folder."""
    if report is None or not report.report_to:
        return
    settings = {"command": "reproduce", "recipe": recipe.name, "variants": list(recipe.applied), "data": body["data"]}
    shutil.rmtree(out / TB_DIR, ignore_errors=True)  # the row's report of this run replaces an earlier one's
    with Tracker(report.report_to, out, report.run_name, settings, resume_step=0, progress=progress) as tracker:
        values: dict[str, Any] = {f"achieved/{k}": v for k, v in body["achieved"].items()}
        values.update({f"expected/{m['metric']}": m["expected"] for m in body["metrics"]})
        values.update({f"seconds/{s['name']}": s["seconds"] for s in body["stages"]})
        tracker.summary({k: v for k, v in values.items() if v is not None} | {"output": str(out)})
        for stage in recipe.stages:
            tracker.image(f"{stage.name}/per_class", out / stage.name / "per_class.png")
            tracker.image(f"{stage.name}/heatmap", out / stage.name / "heatmap.png")


def dry_run(
    recipe: Recipe | str, data: str | None, out: str | Path, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """Check, run nothing: the data against the published split, that each named model's weights resolve, and
    each stage's command with its estimated time, peak memory and disk (`costs.estimate`).

    Raises:
        BalladError: the data differs from the published split (naming the split and the numbers), or the
            recipe needs a data root and none was given.
    """
    from .costs import estimate

    recipe = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    _require_data(recipe, data)
    device = torch.device(device)
    data_error, dataset = None, None
    try:
        dataset = load_data(recipe, data)  # once: the check and the estimates read the same splits
        data_lines = check_data(recipe, data, dataset)
    except BalladError as exc:
        data_error, data_lines = str(exc), [f"DIFFERS: {exc}"]
    weights = [weights_status(model, pretrained) for _, model, pretrained in model_stages(recipe)]
    stages = []
    for stage, cost in zip(recipe.stages, estimate(recipe, dataset, device), strict=True):
        stages.append({"name": stage.name, "command": stage_command(recipe, stage, data, out, device.type), **cost})
    return {
        "recipe": recipe.name,
        "data": data_lines,
        "data_error": data_error,
        "weights": weights,
        "stages": stages,
        "device": str(device),
    }


def _old_run(out: Path) -> dict[str, Any] | None:
    """The `config.json` of a finished reproduce run in `out` (None when there is none)."""
    if not (out / REPORT).is_file():
        return None
    try:
        old = read_json(out / CONFIG)
    except BalladError:
        return None
    return old if isinstance(old, dict) else None


def _stage_seconds(path: Path) -> dict[str, float]:
    """Each stage's wall time in an earlier report (empty when there is none)."""
    try:
        old = read_json(path)
        return {str(s["name"]): float(s["seconds"]) for s in old.get("stages", [])}
    except (BalladError, KeyError, TypeError, ValueError, AttributeError):
        return {}


def _require_data(recipe: Recipe, data: str | None) -> None:
    """A recipe whose dataset is read from a root needs `--data`, unless its dataset finds its files alone (the
    embedded default: `dataset.root_optional`)."""
    reads_root = "{data}" in recipe.data_spec or any("{data}" in v for v in recipe.data_env.values())
    if reads_root and data is None and not recipe.root_optional:
        raise BalladError(f"recipe {recipe.name} reads its images from --data ROOT: {recipe.needs}")
    if data is not None and not Path(data).is_dir():
        raise BalladError(f"--data {data} is not a folder; give the folder that holds {recipe.needs}")


def _manifest_fingerprint(cache_dir: Path) -> str | None:
    """The settings fingerprint of a finished cache (None when it has no readable manifest)."""
    try:
        manifest = read_json(cache_dir / "manifest.json")
    except BalladError:
        return None
    return manifest.get("config_fingerprint") if isinstance(manifest, dict) else None


def _sweep_finished(sweep_dir: Path, keys: list[str]) -> bool:
    """Whether a finished sweep (results written) of a grid holding every point in `keys` is in `sweep_dir`."""
    if not (sweep_dir / "results.csv").exists():
        return False
    try:
        config = read_json(sweep_dir / CONFIG)
    except BalladError:
        return False
    return isinstance(config, dict) and set(keys) <= set(config.get("points", []))


def _seconds(seconds: float | None) -> str:
    """A duration for people: seconds, minutes or hours."""
    if seconds is None:
        return "not measured"
    if seconds < 120:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def _bytes(n: int | None) -> str:
    """A size for people (MiB or GiB); "-" when unknown."""
    if n is None:
        return "-"
    return f"{n / 2**20:.0f} MiB" if n < 2**30 else f"{n / 2**30:.1f} GiB"


def report_tables(report: dict[str, Any]) -> list[Report]:
    """A reproduce report as tables: achieved against expected per metric, then each stage's time, then the
    commands (one line each)."""

    def number(v: float | None) -> str:
        return "-" if v is None or v != v else f"{v:.2f}"

    metrics = Report(
        f"{report['recipe']}: achieved against {report['paper']}, {report['row']}",
        ["metric", "achieved", "expected", "difference", f"within {report['tolerance']:g}"],
        [
            [
                m["metric"],
                number(m["achieved"]),
                number(m["expected"]) if m["expected"] is not None else "not published",
                number(m["difference"]),
                {True: "yes", False: "NO", None: "-"}[m["within_tolerance"]],
            ]
            for m in report["metrics"]
        ],
        [f"expected: {report['expected_source']}"] + ([report["note"]] if report["note"] else []),
    )
    stages = Report(
        "stages",
        ["stage", "seconds", "reused", "folder"],
        [[s["name"], f"{s['seconds']:.1f}", "yes" if s["reused"] else "", s["folder"]] for s in report["stages"]],
        ["commands (also in commands.sh):"] + [s["command"] for s in report["stages"]],
    )
    return [metrics, stages]


def plan_tables(plan: dict[str, Any]) -> list[Report]:
    """A dry run as tables: the data check, the weights, and each stage's command with its estimates."""
    checks = Report(
        f"{plan['recipe']}: dry run on {plan['device']}",
        ["check", "result"],
        [["data", line] for line in plan["data"]] + [["weights", line] for line in plan["weights"]],
    )
    stages = Report(
        "stages (estimates from measured per-image costs)",
        ["stage", "time", "memory", "cache on disk"],
        [
            [s["name"], _seconds(s["seconds"]), _bytes(s["memory_bytes"]), _bytes(s["disk_bytes"])]
            for s in plan["stages"]
        ],
        [f"{s['name']}: {s['command']}  [{s['cost_source']}]" for s in plan["stages"]],
    )
    return [checks, stages]
