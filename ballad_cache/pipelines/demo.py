"""`ballad demo`: the whole BALLAD pipeline on the embedded default (fmnist-lt + ballad-lite), offline.

A CPU demo has minutes, not the official 50 epochs of batch 512 at SGD 1e-5, so phase A keeps the demo's own
settings: AdamW with warm-up and a per-step cosine, open_clip's light augmentation; for ballad-lite (pretrained
towers, the default) 3e-4 for 4 epochs in eval mode, tuned on val (bench/lite.py --tune); for ballad-tiny (a
randomly initialised image tower) 1e-3 for 8 epochs in train mode. Phase B uses the official defaults except the
batch size (128: the official 512 would give 2 steps an epoch on fmnist-lt's 1,236 training images).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import read_json, write_json
from ..errors import BalladError
from ..heads.config import AdapterConfig
from ..heads.metrics import summary
from ..inputs.datasets import LTDataset, load_dataset
from ..models.clip import local_dir_name
from ..progress import NullProgress, Progress
from ..store.cache import MANIFEST, FeatureCache
from ..store.runs import CONFIG, SUMMARY, RunDone, RunFolder
from .configs import DATA, DEMO_MODELS, MODEL, DemoConfig
from .evaluate import EvalConfig, run_evaluate
from .export import load_classifier, run_export
from .extract import ExtractConfig, run_extract
from .finetune import FinetuneConfig, run_finetune
from .phase_b import expand_grid, point_key, run_fit_adapter, run_grid
from .plots import plot_per_class, plot_prediction_grid
from .predict import PredictConfig, predict_split

# phase-A settings for a randomly initialised vision tower; every other value is the official default
DEMO_PHASE_A: dict[str, Any] = {
    "optimizer": "adamw",
    "weight_decay": 0.05,
    "schedule": "step",
    "keep_last_batch": True,
    "augment": "open_clip",
    "train_mode": True,
}
# phase-A settings for ballad-lite's pretrained towers, tuned on val (bench/lite.py --tune)
LITE_PHASE_A: dict[str, Any] = {**DEMO_PHASE_A, "train_mode": False}


@dataclass
class DemoSize:
    """How much work each step of the demo does."""

    finetune: dict[str, FinetuneConfig]  # per demo model
    extract: ExtractConfig
    adapter: AdapterConfig
    sweep_ratios: tuple[float, ...]
    sweep_lrs: tuple[float, ...]
    tau: float = 1.0


DEMO_SIZES: dict[str, DemoSize] = {
    "full": DemoSize(
        finetune={
            "ballad-tiny": FinetuneConfig(epochs=8, batch_size=32, lr=1e-3, warmup_steps=30, **DEMO_PHASE_A),
            "ballad-lite": FinetuneConfig(epochs=4, batch_size=32, lr=3e-4, warmup_steps=30, **LITE_PHASE_A),
        },
        extract=ExtractConfig(shard_size=4096),  # the default 16 official-transform views
        adapter=AdapterConfig(epochs=10, batch_size=128, lr=0.2),
        sweep_ratios=(0.1, 0.2, 0.4, 0.6),
        sweep_lrs=(0.05, 0.2),
    ),
    "tiny": DemoSize(
        finetune={
            m: FinetuneConfig(epochs=1, batch_size=32, lr=1e-3, max_steps=3, **DEMO_PHASE_A) for m in DEMO_MODELS
        },
        extract=ExtractConfig(train_views=1, shard_size=4096),
        adapter=AdapterConfig(epochs=2, batch_size=128),
        sweep_ratios=(0.2, 0.4),
        sweep_lrs=(0.2,),
    ),
}


def demo_folder(out: str | Path) -> RunFolder:
    """The demo's folder, locked; its config.json records the demo's model and size. It is never refused as a
    whole: each step's folder is guarded by the step's own command (see `run_demo`)."""
    return RunFolder(out, "demo")


def demo(out: str | Path, config: DemoConfig, device: torch.device, progress: Progress | None = None) -> dict[str, Any]:
    """`ballad demo`: lock `out`, record the demo's config and run (or finish) the demo at `config.size` with
    `config.model`."""
    with demo_folder(out) as folder:
        folder.write_config(config)
        return run_demo(out, DEMO_SIZES[config.size], device, progress, config.overwrite, config.model)


def run_demo(
    out: str | Path,
    size: DemoSize,
    device: torch.device,
    progress: Progress | None = None,
    overwrite: bool = False,
    model: str = MODEL,
) -> dict[str, Any]:
    """Run (or finish) every step under `out` with `model` (one of DEMO_MODELS); returns `summary.json`'s body (also
    written to `out/report/`): the model, each step's wall time under `seconds`, and under `reused` the steps whose
    folder already held their output.

    Each step is the command a user would run (`run_finetune`, `run_extract`, `run_fit_adapter`, `run_grid`,
    `run_evaluate`, `run_export`) into its own folder, which then holds that command's config.json. A step whose
    folder holds a finished run of this same config is reused; one of another config (another model, size or
    earlier step) is refused naming what differs, unless `overwrite`, which redoes every step.

    Raises:
        BalladError: a step's folder holds another config's run (without `overwrite`), or a step failed.
    """
    if model not in DEMO_MODELS:
        raise BalladError(f"the demo runs {' or '.join(DEMO_MODELS)}, not {model}")
    seconds: dict[str, float] = {}
    reused: list[str] = []
    progress = progress or NullProgress()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ft_dir, cache_dir, ad_dir = out / "finetune", out / "cache", out / "adapter"
    sweep_dir, eval_dir, export_dir, report = out / "sweep", out / "evaluate", out / "export", out / "report"

    clock = time.perf_counter()

    def lap(step: str, done: bool) -> None:
        nonlocal clock
        seconds[step] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()
        if done:
            reused.append(step)
            progress.log(f"{step}: already done (its folder holds this run's output)")

    progress.log(f"1/6 phase A: finetune {model} on {DATA}")
    done = _reuse(
        lambda: run_finetune(
            DATA, model, None, ft_dir, size.finetune[model], device, overwrite=overwrite, progress=progress
        )
    )
    lap("finetune", done)
    progress.log("2/6 extract features with the phase-A model")
    before = _manifest_fingerprint(cache_dir)
    extract = replace(size.extract, overwrite=overwrite)
    manifest = run_extract(DATA, local_dir_name(ft_dir / "model"), None, cache_dir, extract, device, progress)
    assert manifest is not None  # one process: rank 0
    lap("extract", not overwrite and before == manifest["config_fingerprint"])  # every shard kept
    cache = FeatureCache(cache_dir)
    progress.log("3/6 phase B: fit the BALLAD adapter (ratio 0.2, class-aware)")
    done = _reuse(lambda: run_fit_adapter(cache_dir, ad_dir, size.adapter, device, overwrite, progress))
    lap("fit_adapter", done)
    progress.log("4/6 sweep ratio x lr")
    grid = expand_grid(size.adapter, ratio=list(size.sweep_ratios), lr=list(size.sweep_lrs))
    done = not overwrite and _sweep_finished(sweep_dir, [point_key(c, cache.fingerprint) for c in grid])
    swept = run_grid(cache_dir, sweep_dir, grid, "top1", device, overwrite, progress)  # finished points are kept
    lap("sweep", done)
    progress.log("5/6 evaluate on test (zero-shot, adapter, logit adjustment, 10-NN)")
    eval_config = EvalConfig(tau=size.tau, knn=10, plot=True)
    try:
        result, done = run_evaluate(cache_dir, ad_dir, eval_config, eval_dir, overwrite), False
    except RunDone:
        result, done = read_json(eval_dir / "result.json"), True
    report.mkdir(parents=True, exist_ok=True)
    plot_per_class(result, report / "per_class.png", heads=["zero-shot", "adapter"])
    lap("evaluate", done)
    progress.log("6/6 export the classifier and predict a few test images with it")
    done = _reuse(lambda: run_export(local_dir_name(ft_dir / "model"), ad_dir, export_dir, overwrite=overwrite))
    predictions = _predict(load_dataset(DATA), export_dir, report, device)
    lap("export_predict", done)
    if (sweep_dir / "heatmap.png").exists():
        (report / "sweep_heatmap.png").write_bytes((sweep_dir / "heatmap.png").read_bytes())
    names = {
        "zero-shot": "zero-shot (phase-A model)",
        "adapter": "BALLAD adapter",
        "adapter+LA": f"adapter + logit adj. (tau={size.tau:g})",
        "knn@10": "10-NN on the cached features",
    }
    rows = [{"name": names[h], "head": h, **summary(result["heads"][h])} for h in names]
    body = {
        "dataset": DATA,
        "model": model,
        "seconds": seconds,
        "reused": reused,
        "rows": rows,
        "phase_a": read_json(ft_dir / SUMMARY),
        "sweep_best": {"config": swept.best["config"], "val": swept.best["val"], "test": swept.test},
        "train_class_counts": result["train_class_counts"],
        "thresholds": result["thresholds"],
        "cache_fingerprint": cache.fingerprint,
        "export": str(export_dir),
        "predictions": predictions,
    }
    write_json(report / SUMMARY, body)
    return body


def _reuse(step: Callable[[], Any]) -> bool:
    """Run a step's command; True when its folder already held this run (`RunDone`), so nothing was redone."""
    try:
        step()
    except RunDone:
        return True
    return False


def _manifest_fingerprint(cache_dir: Path) -> str | None:
    """The settings fingerprint of a finished cache (None when it has no readable manifest)."""
    try:
        manifest = read_json(cache_dir / MANIFEST)
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


def _predict(
    dataset: LTDataset, export_dir: Path, report: Path, device: torch.device, per_class: int = 2
) -> list[dict[str, Any]]:
    """Classify `per_class` test images of each class with the exported classifier, draw them in a grid."""
    classifier = load_classifier(local_dir_name(export_dir))
    test = dataset.split("test")
    picks = np.concatenate([np.flatnonzero(test.labels == c)[:per_class] for c in range(dataset.num_classes)])
    subset = test.subset(picks)
    result = predict_split(classifier, subset, PredictConfig(workers=0), device)
    plot_prediction_grid(
        [subset.load(i) for i in range(len(subset))],
        [r["pred_name"] for r in result.rows],
        [r["label_name"] for r in result.rows],
        report / "predictions.png",
    )
    return [{k: r[k] for k in ("path", "pred_name", "prob", "label_name", "correct")} for r in result.rows]
