"""Evaluation on cached features: zero-shot, adapter, post-hoc logit adjustment, kNN; reports and files."""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..atomic import write_bytes, write_json
from ..errors import BalladError, setting
from ..heads.adapter import AdapterHead
from ..heads.artifacts import Adapter, cache_context
from ..heads.config import AdapterConfig
from ..heads.metrics import classification_report, summary
from ..inputs.longtail import ShotThresholds, shot_groups
from ..store.cache import FeatureCache
from ..store.runs import RunFolder
from .configs import EvalConfig


def result_folder(out: str | Path, overwrite: bool = False) -> RunFolder:
    """The run folder of `evaluate --out`: a finished result is replaced only with `overwrite`."""
    return RunFolder(out, "evaluate", ("result.json",), overwrite=overwrite)


def evaluate_cache(cache: FeatureCache, adapter: Adapter | None, config: EvalConfig) -> dict[str, Any]:
    """Reports for zero-shot, the adapter, logit adjustment and kNN on one split of the cache.

    Returns:
        `{"heads": {name: report}, "thresholds", "train_class_counts", "cache_fingerprint", ...}`
    """
    thresholds = ShotThresholds(config.many, config.few)
    counts = cache.train_counts
    rows = cache.eval_split(config.split, config.views)  # V·N rows with test-time crops: every report averages them
    heads: dict[str, dict[str, Any]] = {}
    context = cache_context(cache)
    zero = AdapterHead(AdapterConfig(), context, None).logits(rows.features)  # norm(f) · textᵀ
    heads["zero-shot"] = classification_report(zero, rows.labels, counts, thresholds)
    best = zero
    if adapter is not None:
        best = adapter.logits(rows.features)
        context = adapter.head.context  # its prior: the training counts recorded at the fit
        heads["adapter"] = classification_report(best, rows.labels, counts, thresholds)
    if config.tau is not None:
        name = "adapter+LA" if adapter is not None else "zero-shot+LA"
        adjusted = context.adjusted(best, config.tau)  # as the exported classifier adjusts (`Classifier.score`)
        heads[name] = classification_report(adjusted, rows.labels, counts, thresholds)
    if config.knn:
        from ..heads.knn import knn_scores

        train = cache.load_split("train").eval_view()
        if config.knn > len(train.labels):
            raise BalladError(
                f"{setting('knn', config.knn)} exceeds the {len(train.labels)} training rows of {cache.path}"
            )
        scores = knn_scores(train.features, train.labels, rows.features, cache.num_classes, config.knn)
        heads[f"knn@{config.knn}"] = classification_report(scores, rows.labels, counts, thresholds)
    return {
        "split": config.split,
        "views": config.views or cache.eval_views,
        "heads": heads,
        "thresholds": thresholds.to_dict(),
        "train_class_counts": counts.tolist(),
        "shot_groups": shot_groups(counts, thresholds).tolist(),
        "classnames": cache.classnames,
        "cache_fingerprint": cache.fingerprint,
        "cache": str(cache.path),
        "adapter": adapter.meta if adapter is not None else None,
        "config": asdict(config),
    }


def write_result(result: dict[str, Any], out: str | Path, plot: bool = False) -> list[Path]:
    """Write `result.json`, `per_class.csv` and (with `plot`) `per_class.png` into `out`; returns the paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "result.json", result)
    buf = io.StringIO()
    writer = csv.writer(buf)
    heads = list(result["heads"])
    writer.writerow(["class", "name", "train_count", "group", *heads])
    groups = ("many", "medium", "few")
    for c, name in enumerate(result["classnames"]):
        accs = [f"{result['heads'][h]['per_class'][c]:.2f}" for h in heads]
        writer.writerow([c, name, result["train_class_counts"][c], groups[result["shot_groups"][c]], *accs])
    write_bytes(out / "per_class.csv", buf.getvalue().encode())
    paths = [out / "result.json", out / "per_class.csv"]
    if plot:
        from .plots import plot_per_class

        paths.append(plot_per_class(result, out / "per_class.png"))
    return paths


def summary_rows(result: dict[str, Any]) -> list[tuple[str, dict[str, float]]]:
    """(head, headline numbers) for each head of a result, for tables."""
    return [(name, summary(report)) for name, report in result["heads"].items()]


def run_evaluate(
    cache: str | Path, adapter: str | Path | None, config: EvalConfig, out: str | Path | None, overwrite: bool = False
) -> dict[str, Any]:
    """`ballad evaluate`: score the cache (and adapter); with `out`, guard and lock it first and write the result
    files there (listed under `written`)."""
    from contextlib import nullcontext

    from ..heads.artifacts import load_adapter

    if config.plot and out is None:
        raise ValueError("plot needs an output folder")
    folder = result_folder(out, overwrite) if out is not None else None
    with folder or nullcontext():
        feature_cache = FeatureCache(cache)
        result = evaluate_cache(feature_cache, load_adapter(adapter, feature_cache) if adapter else None, config)
        if folder is not None and out is not None:
            folder.write_config(config, cache=str(cache), adapter=str(adapter) if adapter else None)
            result["written"] = [str(p) for p in write_result(result, out, plot=config.plot)]
    return result
