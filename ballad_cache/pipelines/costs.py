"""What a recipe's stages will cost, from per-image costs measured by this project (`reproduce --dry-run`).

A stage's time is its images (or rows) over the measured rate of its model on the detected device and precision;
a cache's disk size is exact (rows × dim × bytes per value); phase B's memory is its features in float32. Where
nothing was measured for the model and device, the estimate says so instead of extrapolating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..inputs.transforms import EVAL_VIEWS
from .recipes import Recipe, Stage


@dataclass(frozen=True)
class Cost:
    """Measured rates of one model on one kind of device: phase-A training images/s (whole model tuned: a tuning
    method tunes less and is at most this slow) and extraction rows/s, with where they were measured."""

    model: str
    device: str
    precision: str
    train_images_per_s: float
    extract_rows_per_s: float
    source: str


MEASURED = (
    Cost(
        "ViT-B-16", "cuda", "bf16", 1341.8, 1531.0,
        "bench/gpu/1-h100-console.txt (NVIDIA H100): finetune_step_bf16, extract_bf16",
    ),
    Cost(
        "ViT-B-16", "cuda", "fp32", 273.1, 874.0,
        "bench/gpu/1-h100-console.txt (NVIDIA H100): finetune_step_fp32, extract_fp32",
    ),
    Cost(
        "ballad-lite", "cpu", "fp32", 52.3, 316.0,
        "the demo's stage times on a 2-core AMD EPYC (README: 4,944 phase-A images in 94.6 s, 31,212 rows in 98.7 s)",
    ),
)  # fmt: skip

BYTES = {"float16": 2, "float32": 4}


def measured(model: str, device: torch.device, precision: str) -> Cost | None:
    """The measured cost of `model` (a name; a `local-dir:` model is its base's) on `device` at `precision`."""
    for cost in MEASURED:
        if cost.model == model and cost.device == device.type and cost.precision == precision:
            return cost
    return None


def _embed_dim(model: str) -> int | None:
    """A model's embedding width from its open_clip config (None when it is not a named config)."""
    from ..models.clip import _add_to_open_clip

    try:
        import open_clip

        _add_to_open_clip(model)
        cfg = open_clip.get_model_config(model)
    except Exception:  # an unknown name: no estimate, not an error here
        return None
    return int(cfg["embed_dim"]) if cfg and "embed_dim" in cfg else None


def _base_model(recipe: Recipe, stage: Stage) -> str | None:
    """The named model a stage's features come from: its own `model`, or the model of the stage it points at."""
    model = stage.options.get("model")
    for _ in range(len(recipe.stages)):
        if not isinstance(model, str):
            return None
        ref = next((s for s in recipe.stages if "{" + s.name + "}" in model), None)
        if ref is None:
            return model
        model = ref.options.get("model")
    return None


def estimate(recipe: Recipe, data: str | None, device: torch.device) -> list[dict[str, Any]]:
    """Per stage: estimated seconds (None: not measured), peak memory in bytes where it is known, the cache's disk
    size for an extraction, and the source of the rate used.

    The split sizes are the dataset's where it loads here, else the published ones."""
    from ..inputs.datasets import load_dataset
    from .recipes import environment

    sizes: dict[str, int] = {}
    try:
        with environment(recipe.env(data)):
            dataset = load_dataset(recipe.dataset_spec(data))
        sizes = {s: len(dataset.split(s)) for s in dataset.splits}
    except Exception:  # the data check reports what is wrong; estimates fall back on the published sizes
        pub = recipe.published
        sizes = {k: v for k, v in (("train", pub.train), ("val", pub.val), ("test", pub.test)) if v}
    rows: dict[str, int] = {}  # rows of each extraction stage's cache, for the phase-B stages that read it
    dims: dict[str, int] = {}
    out: list[dict[str, Any]] = []
    for stage in recipe.stages:
        config = stage.config()
        model = _base_model(recipe, stage)
        entry: dict[str, Any] = {"seconds": None, "memory_bytes": None, "disk_bytes": None, "cost_source": ""}
        if stage.command == "finetune":
            precision = str(stage.options.get("precision", "fp32")).replace("fp16-official", "fp16")
            cost = measured(model or "", device, precision)
            images = sizes.get("train", 0) * config.epochs
            if cost is not None:
                entry.update(seconds=images / cost.train_images_per_s, cost_source=cost.source)
            else:
                entry["cost_source"] = f"no measured phase-A rate for {model} on {device.type} {precision}"
        elif stage.command == "extract-features":
            crops = EVAL_VIEWS.get(config.eval_views)
            splits = config.splits or tuple(sizes)
            n = sum(sizes.get(s, 0) * (config.train_views + 1 if s == "train" else 1 + crops) for s in splits)
            rows[stage.name] = sizes.get("train", 0) * (config.train_views + 1) if "train" in splits else 0
            dim = _embed_dim(model or "")
            if dim is not None:
                dims[stage.name] = dim
                entry["disk_bytes"] = n * dim * BYTES[config.dtype]
            cost = measured(model or "", device, config.precision)
            if cost is not None:
                entry.update(seconds=n / cost.extract_rows_per_s, cost_source=cost.source)
            else:
                entry["cost_source"] = f"no measured extraction rate for {model} on {device.type} {config.precision}"
        else:
            cache = str(stage.options.get("cache", ""))
            source = next((s.name for s in recipe.stages if "{" + s.name + "}" in cache), None)
            if source in rows and source in dims:
                entry["memory_bytes"] = rows[source] * dims[source] * 4  # the train split in float32
            entry["cost_source"] = "seconds on cached features (bench/RESULTS.md: 10 epochs of 115,846 rows in 4.5 s)"
        out.append(entry)
    return out
