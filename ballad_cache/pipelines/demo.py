"""`ballad demo`: the whole BALLAD pipeline on the embedded default (fmnist-lt + ballad-lite), offline.

The demo is a recipe run: `recipes/demo.yaml` holds every stage's settings with their sources (its variants `tiny`
and `ballad-tiny` the other sizes and model), `reproduce.run_recipe` runs the stages into `OUT/finetune`, `cache`,
`adapter`, `sweep`, `evaluate` and `export`, and the demo adds its report: the per-class plot, a few test images
classified by the exported classifier, and `report/summary.json`.

A CPU demo has minutes, not the official 50 epochs of batch 512 at SGD 1e-5, so phase A keeps the demo's own
settings: AdamW with warm-up and a per-step cosine, open_clip's light augmentation; for ballad-lite (pretrained
towers, the default) 3e-4 for 4 epochs in eval mode, tuned on val (bench/lite.py --tune); for ballad-tiny (a
randomly initialised image tower) 1e-3 for 8 epochs in train mode. Phase B uses the official defaults except the
batch size (128: the official 512 would give 2 steps an epoch on fmnist-lt's 1,236 training images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import read_json, write_json
from ..errors import BalladError
from ..heads.metrics import summary
from ..inputs.datasets import LTDataset, load_dataset
from ..models.clip import local_dir_name
from ..progress import NullProgress, Progress
from ..store.cache import FeatureCache
from ..store.runs import SUMMARY, RunFolder
from .configs import DATA, DEMO_MODELS, MODEL, DemoConfig
from .export import load_classifier
from .plots import plot_per_class, plot_prediction_grid
from .predict import PredictConfig, predict_split
from .recipes import Recipe, load_recipe
from .reproduce import run_recipe

# the demo's step names in summary.json, by recipe stage
STEPS = {
    "finetune": "finetune",
    "cache": "extract",
    "adapter": "fit_adapter",
    "sweep": "sweep",
    "evaluate": "evaluate",
    "export": "export_predict",
}
SIZES = ("full", "tiny")


def demo_recipe(size: str = "full", model: str = MODEL) -> Recipe:
    """`recipes/demo.yaml` for a demo size (`full`, `tiny`) and model (one of DEMO_MODELS): its variants applied.

    Raises:
        BalladError: an unknown size or model.
    """
    if model not in DEMO_MODELS:
        raise BalladError(f"the demo runs {' or '.join(DEMO_MODELS)}, not {model}")
    if size not in SIZES:
        raise BalladError(f"the demo's sizes are {', '.join(SIZES)}, not {size}")
    variants = ([model] if model != MODEL else []) + ([size] if size != "full" else [])
    return load_recipe("demo").with_variants(variants)


def phase_a_settings(model: str = MODEL) -> dict[str, Any]:
    """The demo's phase-A settings for `model` besides epochs, batch, rate and warm-up (optimizer, weight decay,
    schedule, last batch, augmentation, train mode), as the demo recipe gives them."""
    options = demo_recipe("full", model).stage("finetune").options
    keys = ("optimizer", "weight_decay", "schedule", "keep_last_batch", "augment", "train_mode")
    return {k: options[k] for k in keys}


def demo_folder(out: str | Path) -> RunFolder:
    """The demo's folder, locked; its config.json records the demo's model and size. It is never refused as a
    whole: each step's folder is guarded by the step's own command (see `run_demo`)."""
    return RunFolder(out, "demo")


def demo(out: str | Path, config: DemoConfig, device: torch.device, progress: Progress | None = None) -> dict[str, Any]:
    """`ballad demo`: lock `out`, record the demo's config and run (or finish) the demo at `config.size` with
    `config.model`."""
    with demo_folder(out) as folder:
        folder.write_config(config)
        return run_demo(out, config.size, device, progress, config.overwrite, config.model)


def run_demo(
    out: str | Path,
    size: str = "full",
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    overwrite: bool = False,
    model: str = MODEL,
) -> dict[str, Any]:
    """Run (or finish) the demo recipe under `out` at `size` with `model`; returns `summary.json`'s body (also
    written to `out/report/`): the model, each step's wall time under `seconds`, under `reused` the steps whose
    folder already held their output, the test rows of the four heads, the sweep's best point and a few
    predictions of the exported classifier.

    Each step is the command a user would run into its own folder, which then holds that command's config.json. A
    step whose folder holds a finished run of this same config is reused; one of another config (another model,
    size or earlier step) is refused naming what differs, unless `overwrite`, which redoes every step.

    Raises:
        BalladError: a step's folder holds another config's run (without `overwrite`), or a step failed.
    """
    recipe = demo_recipe(size, model)
    progress = progress or NullProgress()
    out = Path(out)
    report = out / "report"
    _, runs = run_recipe(recipe, None, out, torch.device(device), overwrite, progress)
    seconds = {STEPS[name]: run.seconds for name, run in runs.items()}
    reused = [STEPS[name] for name, run in runs.items() if run.reused]
    result = runs["evaluate"].result
    report.mkdir(parents=True, exist_ok=True)
    plot_per_class(result, report / "per_class.png", heads=["zero-shot", "adapter"])
    progress.log("predict a few test images with the exported classifier")
    predictions = _predict(load_dataset(DATA), out / "export", report, torch.device(device))
    if (out / "sweep" / "heatmap.png").exists():
        (report / "sweep_heatmap.png").write_bytes((out / "sweep" / "heatmap.png").read_bytes())
    tau = recipe.stage("evaluate").config().tau
    names = {
        "zero-shot": "zero-shot (phase-A model)",
        "adapter": "BALLAD adapter",
        "adapter+LA": f"adapter + logit adj. (tau={tau:g})",
        "knn@10": "10-NN on the cached features",
    }
    rows = [{"name": names[h], "head": h, **summary(result["heads"][h])} for h in names]
    swept = runs["sweep"].result
    body = {
        "dataset": DATA,
        "model": model,
        "seconds": seconds,
        "reused": reused,
        "rows": rows,
        "phase_a": read_json(out / "finetune" / SUMMARY),
        "sweep_best": {"config": swept["best"]["config"], "val": swept["val"], "test": swept["test"]},
        "train_class_counts": result["train_class_counts"],
        "thresholds": result["thresholds"],
        "cache_fingerprint": FeatureCache(out / "cache").fingerprint,
        "export": str(out / "export"),
        "predictions": predictions,
    }
    write_json(report / SUMMARY, body)
    return body


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
