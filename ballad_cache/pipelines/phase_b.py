"""Phase B composers: fit one adapter on a cache, or sweep a grid of configurations in one process."""

from __future__ import annotations

import csv
import io
import itertools
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path, read_json, remove_stale_temps, sha256_json, write_bytes, write_json
from ..errors import BalladError
from ..heads.adapter import (
    ADAPTER_META,
    ADAPTER_WEIGHTS,
    AdapterConfig,
    TrainRows,
    adapter_logits,
    fit_adapters,
    group_by_stream,
    save_adapter,
)
from ..heads.config import FAMILIES
from ..heads.memory import MemoryHead, build_memory_head, load_memory_head, search_points, train_tip_f
from ..heads.metrics import METRICS, classification_report, summary
from ..heads.terms import HEADS, LOSSES
from ..inputs.longtail import class_log_prior
from ..progress import NullProgress, Progress
from ..store.cache import FeatureCache, SplitFeatures
from ..store.runs import RunFolder

SWEEP_OUTPUTS = ("results.csv", "results.json", "best", "points", "heatmap.png")


def _val_split(cache: FeatureCache) -> str | None:
    return "val" if "val" in cache.splits else None


def fit_on_cache(
    cache: FeatureCache,
    config: AdapterConfig,
    out: str | Path,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Fit one adapter on the cache's train split, score it on val, write it to `out`; returns adapter.json's body.

    Open `out` with `adapter_folder` first (the CLI does): this function writes into it."""
    progress = progress or NullProgress()
    remove_stale_temps(out)
    train = cache.load_split("train")
    rows = TrainRows.from_split(train)
    if len(rows.image_labels) == 0:
        raise BalladError(f"cache {cache.path} has no training rows; extract the train split")
    text = cache.text_embeddings()
    split = _val_split(cache)
    val = cache.load_split(split).eval_view() if split else None
    if HEADS.get(config.head).memory:
        fitted, record = fit_memory(cache, config, val, progress, train)
        if val is not None:
            record["val"] = _report(fitted.logits(val.features, text), val, cache)
        save_adapter(out, torch.empty(0, text.shape[1]), config, cache, record, memory=fitted.tensors)
        return read_json(Path(out) / "adapter.json")
    if config.idle_reason():
        progress.log(f"warning: this fit trains nothing: {config.idle_reason()}")
    if val is None and config.select == "best-val":
        progress.log(f"cache {cache.path} has no val split: keeping the last epoch's weights")
    result = fit_adapters(
        rows,
        text,
        [config],
        device=device,
        progress=progress,
        val=(val.features, val.labels) if val else None,
    )
    weight, head = result.weights[0], result.heads[0]
    extra: dict[str, Any] = {
        "final_loss": float(result.losses[0, -1]) if result.losses.size else None,
        "steps": result.steps,
        "best_epoch": result.best_epoch[0],
        "val_top1_per_epoch": result.val_top1[0].round(4).tolist(),
        "train_seconds": result.seconds,
    }
    if val is not None:
        extra["val"] = _score(val, weight, head, config, text, cache)
    save_adapter(out, weight, config, cache, extra, head)
    return read_json(Path(out) / "adapter.json")


def fit_memory(
    cache: FeatureCache,
    config: AdapterConfig,
    val: SplitFeatures | None,
    progress: Progress | None = None,
    train: SplitFeatures | None = None,
) -> tuple[MemoryHead, dict[str, Any]]:
    """Build a memory head (tip, gda, ncm) on the cache's train split, or build and train one (tip-f, its best val
    epoch kept); returns it and what adapter.json records of the fit. `train`: the cache's train split, when the
    caller has it loaded already."""
    t0 = time.perf_counter()
    train = train if train is not None else cache.load_split("train")
    head = build_memory_head(train, cache.num_classes, config, class_log_prior(cache.train_counts))
    extra: dict[str, Any] = {"steps": 0, "best_epoch": 0, "val_top1_per_epoch": [], "final_loss": None}
    if HEADS.get(config.head).learnable:
        head, tops, best_epoch, steps = train_tip_f(
            head,
            train,
            cache.text_embeddings(),
            config,
            LOSSES.get(config.loss).fn,
            (val.features, val.labels) if val is not None else None,
            progress,
        )
        extra.update(steps=steps, best_epoch=best_epoch, val_top1_per_epoch=[round(t, 4) for t in tops])
        if not torch.isfinite(head.tensors["keys"]).all():
            raise BalladError(f"tip-f diverged: its keys hold NaN/Inf after {steps} steps; lower --head-lr")
    extra["train_seconds"] = time.perf_counter() - t0
    return head, extra


def _report(logits: torch.Tensor, split: SplitFeatures, cache: FeatureCache) -> dict[str, float]:
    return summary(classification_report(logits, split.labels, cache.train_counts))


def _score(
    split: SplitFeatures,
    weight: torch.Tensor,
    head: torch.Tensor | None,
    config: AdapterConfig,
    text: torch.Tensor,
    cache: FeatureCache,
) -> dict[str, float]:
    """Headline accuracies of one adapter (and its cosine head, else the text embeddings) on a split."""
    classes = head if head is not None else text
    logits = adapter_logits(split.features, weight, config.ratio, classes, config.logit_scale)
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


def _unused_params(config: AdapterConfig) -> set[str]:
    """Fields that only some losses or heads read, and this configuration's loss and head do not."""
    used = set(LOSSES.get(config.loss).params) | set(HEADS.get(config.head).params)
    every = {p for name in LOSSES for p in LOSSES.get(name).params} | {p for n in HEADS for p in HEADS.get(n).params}
    return every - used


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
        unused = {k: defaults[k] for k in _unused_params(config) if getattr(config, k) != defaults[k]}
        unused.update({k: defaults[k] for k in HEADS.get(config.head).ignores if getattr(config, k) != defaults[k]})
        if unused:
            config = AdapterConfig.from_dict({**config.to_dict(), **unused})
        out.setdefault(point_key(config, ""), config)
    return list(out.values())


def family_grid(family: str, axes: dict[str, list[Any]] | None = None) -> list[AdapterConfig]:
    """The points of `sweep --family NAME` (`all`: every family), each family's grid (`FAMILIES`) over a base of
    the single values in `axes`.

    Raises:
        ValueError: an axis with several values (a family brings its own grid), or an unknown family.
    """
    axes = {k: v for k, v in (axes or {}).items() if v}
    several = [k for k, v in axes.items() if len(v) > 1]
    if several:
        flag = "--" + several[0].replace("_", "-")
        raise ValueError(f"--family sweeps its own grid; give {flag} one value (or sweep without --family)")
    base = AdapterConfig.from_dict({**AdapterConfig().to_dict(), **{k: v[0] for k, v in axes.items()}})
    names = [n for n in FAMILIES if n != "all"] if family == "all" else [family]
    out: dict[str, AdapterConfig] = {}
    for name in names:
        for config in expand_grid(base, **FAMILIES.get(name)):
            out.setdefault(point_key(config, ""), config)
    return list(out.values())


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
    """Train every configuration (stream-sharing ones batched), rank on val by `metric`, keep the best.

    Finished points live in `out/points/` (weights + metrics) and are skipped on a rerun with the same cache.
    Writes `results.csv`, `results.json`, `best/` (the winning adapter) and `heatmap.png`.
    """
    progress = progress or NullProgress()
    if not configs:
        raise BalladError("the sweep grid is empty; give at least one value per option")
    if metric not in METRICS:
        raise BalladError(f"unknown metric '{metric}'; use {', '.join(METRICS)}")
    split = _val_split(cache)
    if split is None:
        raise BalladError(f"cache {cache.path} has no val split to rank on; extract it with --splits train,val,test")
    out = Path(out)
    points_dir = out / "points"
    points_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out, points_dir, out / "best")  # what a killed sweep may have left half-written
    text = cache.text_embeddings()
    val = cache.load_split(split).eval_view()
    keys = [point_key(c, cache.fingerprint) for c in configs]
    done = {k for k in keys if _point_done(points_dir, k, cache.fingerprint)}
    todo = [i for i, k in enumerate(keys) if k not in done]
    progress.log(f"sweep: {len(configs)} points, {len(done)} already done, {len(todo)} to train")
    idle = [c.idle_reason() for c in configs if c.idle_reason()]
    if idle:
        progress.log(f"warning: {len(idle)} point(s) train nothing: {idle[0]}")
    memory_points = [i for i in todo if HEADS.get(configs[i].head).memory]
    todo = [i for i in todo if i not in set(memory_points)]
    if memory_points:
        chosen = [configs[i] for i in memory_points]
        _sweep_memory(cache, chosen, [keys[i] for i in memory_points], val, points_dir, progress)
    if todo:
        rows = TrainRows.from_split(cache.load_split("train"))
        for group in group_by_stream([configs[i] for i in todo]):
            members = [todo[j] for j in group]
            fit = fit_adapters(
                rows,
                text,
                [configs[i] for i in members],
                device=device,
                progress=progress,
                val=(val.features, val.labels),
            )
            for j, i in enumerate(members):
                head = fit.heads[j]
                report = _score(val, fit.weights[j], head, configs[i], text, cache)
                _save_point(
                    points_dir,
                    keys[i],
                    fit.weights[j],
                    head,
                    configs[i],
                    report,
                    cache.fingerprint,
                    float(fit.losses[j, -1]) if fit.losses.size else float("nan"),
                    fit.seconds / len(members),
                    fit.steps,
                    fit.best_epoch[j],
                )
    points = [read_json(points_dir / f"{k}.json") for k in keys]
    ranked = sorted(points, key=lambda p: -p["val"][metric])
    best = ranked[0]
    best_cfg = AdapterConfig.from_dict(best["config"])
    from safetensors.torch import load_file

    test_split = cache.load_split("test").eval_view() if "test" in cache.splits else None
    extra = {"val": best["val"], "sweep_metric": metric, "steps": best["steps"], "best_epoch": best["best_epoch"]}
    if HEADS.get(best_cfg.head).memory:
        memory = _memory_point(cache, best_cfg, points_dir / f"{best['key']}.safetensors")
        test = _report(memory.logits(test_split.features, text), test_split, cache) if test_split else None
        save_adapter(
            out / "best", torch.empty(0, text.shape[1]), best_cfg, cache, {**extra, "test": test}, None, memory.tensors
        )
    else:
        tensors = load_file(str(points_dir / f"{best['key']}.safetensors"))
        weight, best_head = tensors["weight"], tensors.get("head")
        test = _score(test_split, weight, best_head, best_cfg, text, cache) if test_split else None
        save_adapter(out / "best", weight, best_cfg, cache, {**extra, "test": test}, best_head)
    _write_tables(out, ranked, metric, test, cache)
    _heatmap(out, ranked, metric)
    return SweepResult(ranked, best, test)


def _sweep_memory(
    cache: FeatureCache,
    configs: list[AdapterConfig],
    keys: list[str],
    val: SplitFeatures,
    points_dir: Path,
    progress: Progress,
) -> None:
    """Score the memory-head points of a sweep on val: the training-free ones in one batched search (their tensors
    are rebuilt from the cache when one wins, so a point is its JSON alone), tip-f ones trained one by one (their
    trained keys saved beside the JSON)."""
    text = cache.text_embeddings()
    free = [i for i, c in enumerate(configs) if not HEADS.get(c.head).learnable]
    train = cache.load_split("train")
    if free:
        t0 = time.perf_counter()
        log_prior = class_log_prior(cache.train_counts)
        reports = search_points(
            [configs[i] for i in free], train, val.features, text, log_prior, lambda lg: _report(lg, val, cache)
        )
        seconds = (time.perf_counter() - t0) / len(free)
        progress.log(f"sweep: {len(free)} training-free points searched in {seconds * len(free):.1f} s")
        for i, report in zip(free, reports, strict=True):
            _save_point(
                points_dir, keys[i], None, None, configs[i], report, cache.fingerprint, float("nan"), seconds, 0, 0
            )
    for i, config in enumerate(configs):
        if i in set(free):
            continue
        head, extra = fit_memory(cache, config, val, progress, train)
        report = _report(head.logits(val.features, text), val, cache)
        _save_point(
            points_dir,
            keys[i],
            None,
            None,
            config,
            report,
            cache.fingerprint,
            float("nan"),
            extra["train_seconds"],
            extra["steps"],
            extra["best_epoch"],
            memory=head.tensors,
        )


def _memory_point(cache: FeatureCache, config: AdapterConfig, weights: Path) -> MemoryHead:
    """A memory-head point's head: its saved tensors (tip-f), else rebuilt from the cache."""
    log_prior = class_log_prior(cache.train_counts)
    if weights.exists():
        from safetensors.torch import load_file

        own = {k.removeprefix("memory."): v for k, v in load_file(str(weights)).items()}
        return load_memory_head(config, own, log_prior)
    return build_memory_head(cache.load_split("train"), cache.num_classes, config, log_prior)


def _point_done(folder: Path, key: str, fingerprint: str) -> bool:
    meta, weights = folder / f"{key}.json", folder / f"{key}.safetensors"
    if not meta.exists():
        return False
    if not weights.exists():  # only a training-free memory head's point is its JSON alone
        try:
            config = AdapterConfig.from_dict(read_json(meta).get("config", {}))
        except (BalladError, TypeError, ValueError):
            return False
        if not HEADS.get(config.head).memory or HEADS.get(config.head).learnable:
            return False
    try:
        return read_json(meta).get("cache_fingerprint") == fingerprint
    except BalladError:
        return False


def _save_point(
    folder: Path,
    key: str,
    weight: torch.Tensor | None,
    head: torch.Tensor | None,
    config: AdapterConfig,
    val: dict[str, float],
    fingerprint: str,
    final_loss: float,
    seconds: float,
    steps: int,
    best_epoch: int,
    memory: dict[str, torch.Tensor] | None = None,
) -> None:
    """A sweep point: its tensors (none for a training-free memory head) and then its JSON, which marks it done."""
    from safetensors.torch import save_file

    from ..heads.adapter import memory_tensors

    tensors = memory_tensors(memory) if memory is not None else {}
    if weight is not None:
        tensors["weight"] = weight.contiguous()
    if head is not None:
        tensors["head"] = head.contiguous()
    if tensors:
        with atomic_path(folder / f"{key}.safetensors") as tmp:
            save_file(tensors, str(tmp))
    write_json(
        folder / f"{key}.json",
        {
            "key": key,
            "config": config.to_dict(),
            "val": val,
            "final_loss": final_loss,
            "train_seconds": seconds,
            "steps": steps,
            "best_epoch": best_epoch,
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


def _heatmap(out: Path, ranked: list[dict[str, Any]], metric: str) -> None:
    best = ranked[0]["config"]
    same = [p for p in ranked if all(p["config"][k] == best[k] for k in best if k not in ("ratio", "lr"))]
    ratios = sorted({p["config"]["ratio"] for p in same})
    lrs = sorted({p["config"]["lr"] for p in same})
    grid = np.full((len(ratios), len(lrs)), np.nan)
    for p in same:
        grid[ratios.index(p["config"]["ratio"]), lrs.index(p["config"]["lr"])] = p["val"][metric]
    from .plots import plot_heatmap

    plot_heatmap(
        grid,
        [f"{r:g}" for r in ratios],
        [f"{lr:g}" for lr in lrs],
        f"val {metric} ({best['sampler']}, {best['epochs']} epochs)",
        out / "heatmap.png",
        "ratio",
        "lr",
    )


def run_fit_adapter(
    cache: str | Path,
    out: str | Path,
    config: AdapterConfig,
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """`ballad fit-adapter`: open the cache, guard and lock `out`, write `config.json`, fit; returns adapter.json."""
    feature_cache = FeatureCache(cache)
    with adapter_folder(out, overwrite) as folder:
        folder.write_config(config, cache=str(cache), cache_fingerprint=feature_cache.fingerprint)
        return fit_on_cache(feature_cache, config, out, device, progress)


def run_grid(
    cache: str | Path,
    out: str | Path,
    configs: list[AdapterConfig],
    metric: str = "top1",
    device: torch.device | str = "cpu",
    overwrite: bool = False,
    progress: Progress | None = None,
) -> SweepResult:
    """`ballad sweep`: open the cache, guard and lock `out` (a grid that contains the folder's grid continues it),
    write `config.json`, sweep `configs` (see `expand_grid`)."""
    feature_cache = FeatureCache(cache)
    with sweep_folder(out, configs, feature_cache, overwrite) as folder:
        folder.write_config(None, **sweep_config(configs, feature_cache, metric))
        return run_sweep(feature_cache, configs, out, metric, device, progress)
