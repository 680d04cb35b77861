"""Phase B composers: fit one adapter on a cache, or sweep a grid of configurations in one process."""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import read_json, remove_stale_temps, sha256_json, write_bytes, write_json
from ..errors import BalladError, setting
from ..heads.artifacts import (
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    cache_context,
    load_head,
    read_tensors,
    save_adapter,
    save_tensors,
)
from ..heads.config import AdapterConfig, explain_unread, readers
from ..heads.metrics import METRICS, classification_report, group_means, summary
from ..heads.registry import FAMILIES, HEADS, FitData, Fitted, Head, HeadContext, fit_record
from ..inputs.longtail import GROUP_NAMES, unseen_classes
from ..inputs.splits import SPLITS
from ..progress import NullProgress, Progress
from ..store.cache import FeatureCache, SplitFeatures
from ..store.runs import RunFolder
from ..tracking import TB_DIR, Tracker, check_reporters, report_metrics
from .configs import Reporting

SWEEP_OUTPUTS = ("results.csv", "results.json", "best", "points", "heatmap.png")


def fit_data(cache: FeatureCache) -> FitData:
    """What a head family fits on: the cache's train split, its class text embeddings and prior, and its val split
    where it has one, in the cache's eval views (its test-time crops, averaged, where it holds them).

    Raises:
        BalladError: no training rows.
    """
    val = cache.eval_split("val") if "val" in cache.splits else None
    return FitData(_train_split(cache), cache_context(cache), val)


def _train_split(cache: FeatureCache) -> SplitFeatures:
    """The cache's train split (every view: the largest read a phase-B command makes).

    Raises:
        BalladError: it has no rows.
    """
    train = cache.load_split("train")
    if len(train.labels) == 0:
        raise BalladError(f"cache {cache.path} has no training rows; extract the train split")
    return train


def report_of(head: Head, split: SplitFeatures, cache: FeatureCache) -> dict[str, float]:
    """Headline accuracies of a head on a split of the cache, scored through `head.logits`."""
    return _report(head.logits(split.features), split, cache)


def fit_on_cache(
    cache: FeatureCache,
    config: AdapterConfig,
    out: str | Path,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fit one head of `config.head`'s family on the cache's train split, score it on val, write it to `out`;
    returns adapter.json's body.

    Open `out` with `adapter_folder` first (the CLI does): this function writes into it."""
    progress = progress or NullProgress()
    remove_stale_temps(out)
    data = fit_data(cache)
    if data.val is not None and (unseen := unseen_classes(data.val.labels.numpy(), cache.classnames)):
        progress.log(unseen)
    if config.idle_reason():
        progress.log(f"warning: this fit trains nothing: {config.idle_reason()}")
    if data.val is None and config.select == "best-val" and not HEADS.get(config.head).closed_form:
        progress.log(f"cache {cache.path} has no val split: keeping the last epoch's weights")
    t0 = time.perf_counter()
    fitted = HEADS.get(config.head).fit(data, config, device, progress)
    assert fitted.head is not None
    record = {**fit_record(time.perf_counter() - t0), **fitted.record}
    if data.val is not None:
        record["val"] = report_of(fitted.head, data.val, cache)
    if fitted.val_classes is not None:
        record["val_groups_per_epoch"] = epoch_groups(fitted.val_classes, cache)
    save_adapter(out, fitted.head, cache, record)
    return read_json(Path(out) / ADAPTER_META)


def epoch_groups(val_classes: np.ndarray, cache: FeatureCache) -> dict[str, list[float]]:
    """Many/medium/few val accuracy of each epoch from its per-class accuracies (epochs × C, NaN for a class with no
    val image): each group's mean over its classes with val images, as OLTR's `shot_acc` (and `metrics`)."""
    per_epoch = [group_means(row, cache.train_counts) for row in val_classes]
    return {name: [epoch[name] for epoch in per_epoch] for name in GROUP_NAMES}


def report_fit(
    report: Reporting | None,
    out: Path,
    config: AdapterConfig,
    cache: str | Path,
    meta: dict[str, Any],
    progress: Progress,
) -> None:
    """Send a finished fit to the viewers of `report`: its loss and learning-rate curve and rows per second at the
    curve's steps, val top-1 and many/medium/few at each epoch's last step, the kept epoch's val report and the
    output folder."""
    if report is None or not report.report_to:
        return
    settings = {"command": "fit-adapter", "cache": str(cache), **config.to_dict()}
    with Tracker(report.report_to, out, report.run_name, settings, progress=progress) as tracker:
        curve = meta.get("curve") or {"step": [], "loss": [], "lr": []}
        at: dict[int, dict[str, float]] = {}  # a step's values, sent in step order (wandb keeps steps in order)
        for step, loss, lr in zip(curve["step"], curve["loss"], curve["lr"], strict=True):
            at[step] = {"train/loss": loss, "train/lr": lr, "train/rows_per_s": meta["draws_per_s"]}
        per_epoch = meta.get("val_top1_per_epoch") or []
        groups = meta.get("val_groups_per_epoch") or {}
        steps_per_epoch = int(meta.get("steps", 0)) // max(len(per_epoch), 1)
        for e, top1 in enumerate(per_epoch):
            values = {"val/top1": top1, **{f"val/{g}": v[e] for g, v in groups.items()}}
            at.setdefault((e + 1) * steps_per_epoch, {}).update(values)
        for step in sorted(at):
            tracker.scalars(at[step], step)
        final = {**report_metrics("val_kept", meta.get("val")), "best_epoch": meta.get("best_epoch", 0)}
        tracker.summary({**final, "output": str(out)}, int(meta.get("steps", 0)))


def report_sweep(
    report: Reporting | None, out: Path, result: SweepResult, metric: str, cache: str | Path, progress: Progress
) -> None:
    """Send a finished sweep to the viewers of `report`: every point as one record (its config fields, its val
    metrics, whether it is the kept best), the heatmap, the best point's test report and the output folder."""
    if report is None or not report.report_to:
        return
    configs = [AdapterConfig.from_dict(p["config"]).to_dict() for p in result.points]
    varying = [k for k in configs[0] if len({json.dumps(c[k]) for c in configs}) > 1] if configs else []
    records = [
        {
            "rank": rank,
            "key": p["key"],
            "label": "_".join(f"{k}={config[k]}" for k in varying) or p["key"],  # what tells it apart
            **config,
            **{m: p["val"][m] for m in METRICS},
            "best": p["key"] == result.best["key"],
        }
        for rank, (p, config) in enumerate(zip(result.points, configs, strict=True), start=1)
    ]
    shared = {k: v for k, v in configs[0].items() if k not in varying} if configs else {}
    settings = {"command": "sweep", "cache": str(cache), "metric": metric, "points": len(records), **shared}
    # a sweep reports its whole grid each time it runs: the events of an earlier report are replaced, not added to
    shutil.rmtree(out / TB_DIR, ignore_errors=True)
    # resume_step 0: wandb reports to the sweep's run again (its newest table is the grid's)
    with Tracker(report.report_to, out, report.run_name, settings, resume_step=0, progress=progress) as tracker:
        tracker.points(records, METRICS)
        tracker.image("sweep/heatmap", out / "heatmap.png")
        tracker.summary({**report_metrics("test", result.test), "best_point": result.best["key"], "output": str(out)})


def _report(logits: torch.Tensor, split: SplitFeatures, cache: FeatureCache) -> dict[str, float]:
    return summary(classification_report(logits, split.labels, cache.train_counts))


def adapter_folder(out: str | Path, overwrite: bool = False) -> RunFolder:
    """The run folder of `fit-adapter`: a finished adapter is replaced only with `overwrite`."""
    return RunFolder(out, "fit-adapter", (ADAPTER_META, ADAPTER_WEIGHTS), overwrite=overwrite)


def point_key(config: AdapterConfig, fingerprint: str) -> str:
    """A sweep point's name: a hash of every config field at its exact value, and of the cache fingerprint.

    Two configurations that differ in any field (a new field included) never share a key; JSON writes floats
    with `repr`, which round-trips exactly.
    """
    return sha256_json({"config": asdict(config), "cache": fingerprint})[:20]


def point_name(config: dict[str, Any]) -> str:
    """A short readable label of a sweep point: the fields that differ from the defaults."""
    defaults = AdapterConfig().to_dict()
    diff = [f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in config.items() if defaults.get(k) != v]
    return " ".join(diff) or "defaults"


def expand_grid(base: AdapterConfig, **axes: list[Any]) -> list[AdapterConfig]:
    """Every combination of the given axes over `base` (e.g. ratio=[...], lr=[...], loss=[...]), each checked as
    `AdapterConfig` checks it.

    A field that only some losses or heads read (`la_tau` for `la`, `head_scale` for `cosine`, `beta` for `tip`)
    keeps its default at the points that do not read it, as do the fields a head ignores (the adapter's for the
    memory heads), and points that are then equal appear once: `--loss ce,la --la-tau 0.5,1` gives one ce point
    and two la points.
    """
    axes = {k: v for k, v in axes.items() if v}
    names = list(axes)
    defaults = AdapterConfig().to_dict()
    unknown = [n for n in names if n not in defaults]
    if unknown:
        raise ValueError(f"unknown grid axis '{unknown[0]}'; AdapterConfig fields: {', '.join(defaults)}")
    out: dict[str, AdapterConfig] = {}
    for values in itertools.product(*(axes[n] for n in names)):
        config = AdapterConfig.from_dict({**base.to_dict(), **dict(zip(names, values, strict=True))})
        unused = {k: defaults[k] for k in config.unused_fields() if getattr(config, k) != defaults[k]}
        if unused:
            config = AdapterConfig.from_dict({**config.to_dict(), **unused})
        out.setdefault(point_key(config, ""), config)
    points = list(out.values())
    _refuse_unread(points, {n: axes[n] for n in names if n != "head"})
    return points


def _refuse_unread(points: list[AdapterConfig], given: dict[str, list[Any]]) -> None:
    """Refuse an option set away from its default that no point of the grid reads (it would change nothing).

    Raises:
        ValueError: naming the option, the grid's heads and where the option applies.
    """
    defaults = AdapterConfig().to_dict()
    for name, values in given.items():
        if all(v == defaults[name] for v in values) or any(name not in p.unused_fields() for p in points):
            continue
        heads = sorted({p.head for p in points})
        where = readers(name)
        applies = f"; it applies to {', '.join(where)}" if where else ""
        raise ValueError(
            f"{setting(name)} is read by no point of this grid ({setting('head', ','.join(heads))}){applies}"
        )


def family_grid(family: str, axes: dict[str, list[Any]] | None = None) -> list[AdapterConfig]:
    """The points of `sweep --family NAME` (`all`: every family), each family's grid (`FAMILIES`) over a base of
    the single values in `axes`; a value set away from its default on an axis the family's grid sweeps replaces
    that axis (`--family tip --beta 3` sweeps tip's grid at β 3).

    Raises:
        ValueError: an axis with several values (a family brings its own grid), a head other than the family's,
            or an unknown family.
    """
    axes = {k: v for k, v in (axes or {}).items() if v}
    several = [k for k, v in axes.items() if len(v) > 1]
    if several:
        family_ = setting("family")
        raise ValueError(
            f"{family_} sweeps its own grid; give {setting(several[0])} one value (or sweep without {family_})"
        )
    defaults = AdapterConfig().to_dict()
    base = AdapterConfig.from_dict({**defaults, **{k: v[0] for k, v in axes.items()}})
    names = [n for n in FAMILIES if n != "all"] if family == "all" else [family]
    given = {k: v for k, v in axes.items() if v[0] != defaults.get(k)}
    if "head" in given and any(given["head"] != FAMILIES.get(n).get("head", given["head"]) for n in names):
        raise ValueError(f"{setting('family')} picks the head; drop {setting('head')} or sweep without it")
    out: dict[str, AdapterConfig] = {}
    for name in names:
        grid = {k: (given[k] if k in given else v) for k, v in FAMILIES.get(name).items()}
        for config in expand_grid(base, **grid):
            out.setdefault(point_key(config, ""), config)
    points = list(out.values())
    _refuse_unread(points, axes)
    return points


def sweep_folder(out: str | Path, configs: list[AdapterConfig], cache: FeatureCache, overwrite: bool) -> RunFolder:
    """The run folder of a sweep: a rerun whose grid holds every point of the folder's grid (on the same cache)
    continues it; another grid is refused without `overwrite`, which removes the old results first."""
    keys = {point_key(c, cache.fingerprint) for c in configs}

    def compatible(old: dict[str, Any]) -> bool:
        return old.get("command") == "sweep" and set(old.get("points", [])) <= keys

    return RunFolder(out, "sweep", ("results.csv",), overwrite=overwrite, compatible=compatible, clean=SWEEP_OUTPUTS)


def sweep_config(configs: list[AdapterConfig], cache: FeatureCache, metric: str) -> dict[str, Any]:
    """The body of a sweep's `config.json`: the cache, the metric, and each point's key and config."""
    return {
        "cache": str(cache.path),
        "cache_fingerprint": cache.fingerprint,
        "metric": metric,
        "points": [point_key(c, cache.fingerprint) for c in configs],
        "grid": [c.to_dict() for c in configs],
    }


@dataclass
class SweepResult:
    """Ranked points (best first) and the winner's test report."""

    points: list[dict[str, Any]]
    best: dict[str, Any]
    test: dict[str, Any] | None


def run_sweep(
    cache: FeatureCache,
    configs: list[AdapterConfig],
    out: str | Path,
    metric: str = "top1",
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> SweepResult:
    """Fit every configuration (each family shares work between its points: one batched fit per index stream, one
    search for the closed-form heads), rank on val by `metric`, keep the best.

    Finished points live in `out/points/` (report JSON, and the head's tensors unless its family rebuilds it in one
    pass) and are skipped on a rerun with the same cache. Writes `results.csv`, `results.json`, `best/` (the winning
    head, scored on test) and `heatmap.png`.
    """
    progress = progress or NullProgress()
    if not configs:
        raise BalladError("the sweep grid is empty; give at least one value per option")
    if metric not in METRICS:
        raise BalladError(f"unknown metric '{metric}'; use {', '.join(METRICS)}")
    # val and the text first; the train split (every augmented view) only once a point trains or a closed-form
    # winner is rebuilt: a rerun whose points are all done reads none of it
    if "val" not in cache.splits:
        raise BalladError(
            f"cache {cache.path} has no val split to rank on; extract it with {setting('splits', SPLITS)}"
        )
    val, context = cache.eval_split("val"), cache_context(cache)
    if unseen := unseen_classes(val.labels.numpy(), cache.classnames):
        progress.log(unseen)
    train: list[SplitFeatures] = []  # loaded on first use

    def with_train() -> FitData:
        if not train:
            train.append(_train_split(cache))
        return FitData(train[0], context, val)

    out = Path(out)
    points_dir = out / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, points_dir, out / "best")  # what a killed sweep may have left half-written
    keys = [point_key(c, cache.fingerprint) for c in configs]
    done = {k for k, c in zip(keys, configs, strict=True) if _point_done(points_dir, k, c, cache.fingerprint)}
    todo = [i for i, k in enumerate(keys) if k not in done]
    progress.log(f"sweep: {len(configs)} points, {len(done)} already done, {len(todo)} to train")
    idle = [c.idle_reason() for c in configs if c.idle_reason()]
    if idle:
        progress.log(f"warning: {len(idle)} point(s) train nothing: {idle[0]}")
    by_head: dict[str, list[int]] = {}
    for i in todo:
        by_head.setdefault(configs[i].head, []).append(i)
    for head, members in by_head.items():
        t0 = time.perf_counter()
        family = HEADS.get(head)
        chosen = [configs[i] for i in members]
        for j, point in family.sweep(with_train(), chosen, lambda lg: _report(lg, val, cache), device, progress):
            i = members[j]  # saved as it finishes: a stopped sweep keeps it
            if point.head is None and not family.closed_form:
                raise ValueError(f"head family '{head}' yielded a point without its head; only closed-form ones may")
            _save_point(points_dir, keys[i], configs[i], point, cache.fingerprint, keep=not family.closed_form)
        if family.closed_form:
            progress.log(f"sweep: {len(members)} {head} points in {time.perf_counter() - t0:.1f} s")
    points = [_read_point(points_dir, k) for k in keys]
    ranked = sorted(points, key=lambda p: -p["val"][metric])
    best = ranked[0]
    best_cfg = AdapterConfig.from_dict(best["config"])
    best_head = _point_head(with_train, context, best_cfg, points_dir / f"{best['key']}.safetensors", device)
    test_split = cache.eval_split("test") if "test" in cache.splits else None
    test = report_of(best_head, test_split, cache) if test_split is not None else None
    extra = {"val": best["val"], "sweep_metric": metric, "steps": best["steps"], "best_epoch": best["best_epoch"]}
    save_adapter(out / "best", best_head, cache, {**extra, "test": test})
    _write_tables(out, ranked, metric, test, cache)
    _heatmap(out, ranked, metric)
    return SweepResult(ranked, best, test)


def _point_head(
    data: Callable[[], FitData],
    context: HeadContext,
    config: AdapterConfig,
    weights: Path,
    device: torch.device | str,
) -> Head:
    """A sweep point's head: its saved tensors, or rebuilt from the cache (`data()`: a closed-form family's point)."""
    family = HEADS.get(config.head)
    if family.closed_form:
        fitted = family.fit(data(), config, device)
        assert fitted.head is not None
        return fitted.head
    state = read_tensors(weights, "delete it and rerun the sweep")
    return load_head(config, state, context, weights, "delete it and rerun the sweep")


def _read_point(folder: Path, key: str) -> dict[str, Any]:
    """A finished point's JSON.

    Raises:
        BalladError: the file is not a point record (one line naming it).
    """
    path = folder / f"{key}.json"
    body = read_json(path)
    if not isinstance(body, dict) or not isinstance(body.get("val"), dict) or "config" not in body:
        raise BalladError(f"{path} is not a sweep point record; delete it and rerun the sweep")
    return body


def _point_done(folder: Path, key: str, config: AdapterConfig, fingerprint: str) -> bool:
    """Whether point `key` is finished on this cache: its JSON (written last) and, unless its family rebuilds it
    from the cache, its tensors."""
    meta, weights = folder / f"{key}.json", folder / f"{key}.safetensors"
    if not meta.exists() or (not weights.exists() and not HEADS.get(config.head).closed_form):
        return False
    try:
        body = read_json(meta)
    except BalladError:
        body = None
    if not isinstance(body, dict) or not {"config", "val", "cache_fingerprint"} <= set(body):
        # not what a sweep writes (its files are replaced whole): refused rather than written over
        raise BalladError(f"{meta} is not a sweep point record; delete it and rerun the sweep")
    return body.get("cache_fingerprint") == fingerprint


def _save_point(
    folder: Path, key: str, config: AdapterConfig, point: Fitted, fingerprint: str, keep: bool = True
) -> None:
    """A sweep point: its head's tensors (`keep`, and a head to keep), then its JSON, which marks it done."""
    if keep and point.head is not None:
        save_tensors(folder / f"{key}.safetensors", point.head.state())
    record = point.record
    final_loss = record.get("final_loss")
    write_json(
        folder / f"{key}.json",
        {
            "key": key,
            "config": config.to_dict(),
            "val": point.val,
            "final_loss": float("nan") if final_loss is None else final_loss,
            "train_seconds": record.get("train_seconds", 0.0),
            "steps": record.get("steps", 0),
            "best_epoch": record.get("best_epoch", 0),
            "cache_fingerprint": fingerprint,
        },
    )


def _write_tables(
    out: Path, ranked: list[dict[str, Any]], metric: str, test: dict[str, Any] | None, cache: FeatureCache
) -> None:
    cols = [f.name for f in fields(AdapterConfig)]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "key", *cols, *(f"val_{k}" for k in METRICS), "steps", "best_epoch", "final_loss"])
    for r, p in enumerate(ranked, start=1):
        config = AdapterConfig.from_dict(p["config"]).to_dict()
        w.writerow(
            [
                r,
                p["key"],
                *(repr(config[c]) if isinstance(config[c], float) else config[c] for c in cols),
                *(f"{p['val'][k]:.2f}" for k in METRICS),
                p["steps"],
                p["best_epoch"],
                f"{p['final_loss']:.4f}",
            ]
        )
    write_bytes(out / "results.csv", buf.getvalue().encode())
    write_json(
        out / "results.json",
        {
            "metric": metric,
            "cache_fingerprint": cache.fingerprint,
            "points": ranked,
            "best": ranked[0],
            "best_test": test,
            "templates": cache.manifest.get("templates", []),
        },
    )


HEATMAP_PANELS = 12  # at most this many panels; a grid with more combinations of its other axes draws the first


def _value(point: dict[str, Any], key: str) -> Any:
    return point["config"].get(key)


def _heatmap(out: Path, ranked: list[dict[str, Any]], metric: str) -> None:
    """The sweep's val metric over two of its grid's axes (ratio × lr where both vary, else the two with the most
    values: a family's own, such as tip's alpha and beta), one panel per combination of its other axes (the best
    point's first), among the points of the best point's head; the best point outlined, the settings every point
    shares in the title, other heads named."""
    best = ranked[0]["config"]
    points = [p for p in ranked if p["config"].get("head") == best.get("head")]
    distinct = {k: len({json.dumps(_value(p, k)) for p in points}) for k in best}
    varying = sorted((k for k, n in distinct.items() if n > 1), key=lambda k: -distinct[k])
    preferred = [k for k in ("ratio", "lr") if k in varying] if {"ratio", "lr"} <= set(varying) else []
    row_key, col_key = list(dict.fromkeys([*preferred, *varying, "ratio", "lr"]))[:2]
    panel_keys = [k for k in varying if k not in (row_key, col_key)]
    defaults = AdapterConfig().to_dict()  # the title names the usual settings and every one set away from its default
    usual = ("head", "loss", "sampler", "epochs", "batch_size")
    fixed = [k for k in best if k not in varying and (k in usual or best.get(k) != defaults.get(k))]
    others = sorted({p["config"].get("head") for p in ranked} - {best.get("head")})

    def order(v: Any) -> tuple[bool, Any]:  # numbers in order, then anything else by its JSON text
        number = isinstance(v, (int, float))
        return (not number, v if number else json.dumps(v))

    rows = sorted({_value(p, row_key) for p in points}, key=order)
    cols = sorted({_value(p, col_key) for p in points}, key=order)
    panel_of = [tuple(json.dumps(_value(p, k)) for k in panel_keys) for p in points]
    combos = list(dict.fromkeys(panel_of))[:HEATMAP_PANELS]  # in rank order: the best point's panel comes first
    panels = []
    for combo in combos:
        grid = np.full((len(rows), len(cols)), np.nan)
        for p, of in zip(points, panel_of, strict=True):
            if of == combo:
                cell = rows.index(_value(p, row_key)), cols.index(_value(p, col_key))
                if np.isnan(grid[cell]):  # the best-ranked point of a cell shows (ranked is best first)
                    grid[cell] = p["val"][metric]
        panels.append((", ".join(f"{k} {json.loads(v)}" for k, v in zip(panel_keys, combo, strict=True)), grid))
    where = (0, rows.index(best[row_key]), cols.index(best[col_key]))
    from .plots import plot_heatmap

    shown = f" (the first {len(combos)} panels)" if len(combos) == HEATMAP_PANELS else ""
    label = lambda v: f"{v:g}" if isinstance(v, float) else str(v)  # noqa: E731
    plot_heatmap(
        panels,
        [label(v) for v in rows],
        [label(v) for v in cols],
        f"val {metric}, best outlined{shown}"
        + (f"; other heads ({', '.join(map(str, others))}) in results.csv" if others else "")
        + "\n"
        + ", ".join(f"{k} {best[k]}" for k in fixed),
        out / "heatmap.png",
        row_key,
        col_key,
        best=where,
    )


def run_fit_adapter(
    cache: str | Path,
    out: str | Path,
    config: AdapterConfig,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    report: Reporting | None = None,
) -> dict[str, Any]:
    """`ballad fit-adapter`: open the cache, guard and lock `out`, write `config.json`, fit, report the fit to
    `report.report_to`; returns adapter.json."""
    check_reporters(report.report_to if report else ())
    unread = explain_unread(config)
    if unread:
        raise BalladError(unread)
    feature_cache = FeatureCache(cache)
    with adapter_folder(out, overwrite) as folder:
        folder.write_config(config, cache=str(cache), cache_fingerprint=feature_cache.fingerprint)
        meta = fit_on_cache(feature_cache, config, out, device, progress)
        report_fit(report, Path(out), config, cache, meta, progress or NullProgress())
        return meta


def run_grid(
    cache: str | Path,
    out: str | Path,
    configs: list[AdapterConfig],
    metric: str = "top1",
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
    report: Reporting | None = None,
) -> SweepResult:
    """`ballad sweep`: open the cache, guard and lock `out` (a grid that contains the folder's grid continues it),
    write `config.json`, sweep `configs` (see `expand_grid`), report the points to `report.report_to`."""
    check_reporters(report.report_to if report else ())
    feature_cache = FeatureCache(cache)
    with sweep_folder(out, configs, feature_cache, overwrite) as folder:
        folder.write_config(None, **sweep_config(configs, feature_cache, metric))
        result = run_sweep(feature_cache, configs, out, metric, device, progress)
        report_sweep(report, Path(out), result, metric, cache, progress or NullProgress())
        return result
