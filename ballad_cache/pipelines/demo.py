"""`ballad demo`: the whole BALLAD pipeline on the embedded default (fmnist-lt + ballad-lite), offline.

A CPU demo has minutes, not the official 50 epochs of batch 512 at SGD 1e-5, so phase A keeps the demo's own
settings: AdamW with warm-up and a per-step cosine, open_clip's light augmentation; for ballad-lite (pretrained
towers, the default) 3e-4 for 4 epochs in eval mode, tuned on val (bench/lite.py --tune); for ballad-tiny (a
randomly initialised image tower) 1e-3 for 8 epochs in train mode. Phase B uses the official defaults except the
batch size (128: the official 512 would give 2 steps an epoch on fmnist-lt's 1,236 training images).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import read_json, write_json
from ..errors import BalladError
from ..heads.artifacts import ADAPTER_META, load_adapter
from ..heads.config import AdapterConfig
from ..heads.metrics import summary
from ..inputs.datasets import LTDataset, load_dataset
from ..models.clip import load_model, local_dir_name
from ..progress import NullProgress, Progress
from ..store.cache import MANIFEST, FeatureCache
from ..store.runs import SUMMARY, RunFolder
from .configs import DATA, DEMO_MODELS, MODEL, DemoConfig
from .evaluate import EvalConfig, evaluate_cache, write_result
from .export import CLASSIFIER_META, build_classifier, export_classifier, load_classifier
from .extract import ExtractConfig, extract_features
from .finetune import FinetuneConfig, finetune
from .phase_b import expand_grid, fit_on_cache, run_sweep
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
    """The demo's folder: never refused (each step reuses its finished output unless `overwrite`), locked."""
    return RunFolder(out, "demo")


def demo(out: str | Path, config: DemoConfig, device: torch.device, progress: Progress | None = None) -> dict[str, Any]:
    """`ballad demo`: lock `out` and run (or finish) the demo at `config.size` with `config.model`."""
    with demo_folder(out):
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
    written to `out/report/`), with each step's wall time under `seconds` (0 for a step reused from a previous run)."""
    if model not in DEMO_MODELS:
        raise BalladError(f"the demo runs {' or '.join(DEMO_MODELS)}, not {model}")
    seconds: dict[str, float] = {}
    progress = progress or NullProgress()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    dataset = load_dataset(DATA)
    ft_dir, cache_dir, ad_dir = out / "finetune", out / "cache", out / "adapter"
    sweep_dir, eval_dir, report = out / "sweep", out / "evaluate", out / "report"

    clock = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal clock
        seconds[step] = round(time.perf_counter() - clock, 1)
        clock = time.perf_counter()

    if overwrite or not (ft_dir / SUMMARY).exists():
        progress.log(f"1/6 phase A: finetune {model} on {DATA}")
        ft_dir.mkdir(parents=True, exist_ok=True)
        finetune(dataset, load_model(model), ft_dir, size.finetune[model], device, progress=progress)
    lap("finetune")
    if overwrite or not (cache_dir / MANIFEST).exists():
        progress.log("2/6 extract features with the phase-A model")
        loaded = load_model(local_dir_name(ft_dir / "model"))
        extract_features(dataset, loaded, cache_dir, size.extract, device, progress=progress)
    lap("extract")
    cache = FeatureCache(cache_dir)
    if overwrite or not (ad_dir / ADAPTER_META).exists():
        progress.log("3/6 phase B: fit the BALLAD adapter (ratio 0.2, class-aware)")
        fit_on_cache(cache, size.adapter, ad_dir, device, progress)
    lap("fit_adapter")
    progress.log("4/6 sweep ratio x lr")
    grid = expand_grid(size.adapter, ratio=list(size.sweep_ratios), lr=list(size.sweep_lrs))
    swept = run_sweep(cache, grid, sweep_dir, "top1", device, progress)
    lap("sweep")
    progress.log("5/6 evaluate on test (zero-shot, adapter, logit adjustment, 10-NN)")
    adapter = load_adapter(ad_dir, cache)
    result = evaluate_cache(cache, adapter, EvalConfig(tau=size.tau, knn=10))
    write_result(result, eval_dir, plot=True)
    report.mkdir(parents=True, exist_ok=True)
    plot_per_class(result, report / "per_class.png", heads=["zero-shot", "adapter"])
    lap("evaluate")
    progress.log("6/6 export the classifier and predict a few test images with it")
    predictions = _export_and_predict(dataset, ft_dir / "model", ad_dir, out / "export", report, device, overwrite)
    lap("export_predict")
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
        "rows": rows,
        "phase_a": read_json(ft_dir / SUMMARY),
        "sweep_best": {"config": swept.best["config"], "val": swept.best["val"], "test": swept.test},
        "train_class_counts": result["train_class_counts"],
        "thresholds": result["thresholds"],
        "cache_fingerprint": cache.fingerprint,
        "export": str(out / "export"),
        "predictions": predictions,
    }
    write_json(report / SUMMARY, body)
    return body


def _export_and_predict(
    dataset: LTDataset,
    model_dir: Path,
    adapter_dir: Path,
    export_dir: Path,
    report: Path,
    device: torch.device,
    overwrite: bool,
    per_class: int = 2,
) -> list[dict[str, Any]]:
    """Export the demo's classifier, classify `per_class` test images of each class with it, draw them in a grid."""
    if overwrite or not (export_dir / CLASSIFIER_META).exists():
        export_classifier(build_classifier(local_dir_name(model_dir), adapter_dir), export_dir)
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
