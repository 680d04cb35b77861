"""What a recipe's stages will cost, from per-image costs measured by this project (`reproduce --dry-run`).

A stage's time is its images (or rows) over the measured rate of its model on the detected device and precision;
a cache's disk size is exact (rows × dim × bytes per value); phase B's memory is its features in float32. Where
nothing was measured for the model and device, the estimate says so instead of extrapolating.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..inputs.transforms import EVAL_VIEWS
from .recipes import Recipe, Stage

if TYPE_CHECKING:
    from ..inputs.splits import LTDataset


@dataclass(frozen=True)
class Cost:
    """Measured rates of one model on one kind of device: phase-A training images/s (whole model tuned: a tuning
    method tunes less and is at most this slow), extraction rows/s and phase-B image draws/s of one adapter, with
    where they were measured."""

    model: str
    device: str
    precision: str
    train_images_per_s: float
    extract_rows_per_s: float
    phase_b_draws_per_s: float
    source: str


MEASURED = (
    Cost(
        "ViT-B-16", "cuda", "bf16", 1341.8, 1531.0, 115846 * 10 / 4.52,
        "bench/gpu/1-h100-console.txt (NVIDIA H100): finetune_step_bf16, extract_bf16, adapter",
    ),
    Cost(
        "ViT-B-16", "cuda", "fp32", 273.1, 874.0, 115846 * 10 / 4.52,
        "bench/gpu/1-h100-console.txt (NVIDIA H100): finetune_step_fp32, extract_fp32, adapter",
    ),
    Cost(
        "ballad-lite", "cpu", "fp32", 4944 / 81.1, 31212 / 96.7, 12360 / 0.2,
        "the demo run of the README's 'Reproduce a paper row' on a 2-core AMD EPYC (4,944 phase-A images in 81.1 s, "
        "31,212 rows in 96.7 s, 10 adapter epochs of 1,236 images in 0.2 s)",
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


def estimate(recipe: Recipe, dataset: LTDataset | None, device: torch.device) -> list[dict[str, Any]]:
    """Per stage: estimated seconds (None: not measured), the memory its data takes beyond the model (None: not
    measured), the cache's disk size for an extraction, and the source of the rate used.

    The split sizes are `dataset`'s where it loaded here, else the published ones. Phase A's GPU memory was not
    measured; extraction holds one shard of float32 rows; phase B holds the train split's rows (every view) and
    evaluate the scored split's rows (every crop) in float32; a sweep costs at most one fit per point (batched
    sweeps measured 5.7-6.8x faster at 16 points, bench/RESULTS.md)."""
    pub = recipe.published
    sizes = (
        {s: len(dataset.split(s)) for s in dataset.splits}
        if dataset is not None
        else {k: v for k, v in (("train", pub.train), ("val", pub.val), ("test", pub.test)) if v}
    )
    caches: dict[str, dict[str, Any]] = {}  # per extraction stage: rows per split, dim, model
    out: list[dict[str, Any]] = []
    for stage in recipe.stages:
        config = stage.config()
        model = _base_model(recipe, stage) or ""
        entry: dict[str, Any] = {"seconds": None, "memory_bytes": None, "disk_bytes": None, "cost_source": ""}
        if stage.command == "finetune":
            precision = str(stage.options.get("precision", "fp32")).replace("fp16-official", "fp16")
            cost = measured(model, device, precision)
            if cost is not None:
                entry.update(seconds=sizes.get("train", 0) * config.epochs / cost.train_images_per_s)
                entry["cost_source"] = cost.source + "; memory not measured"
            else:
                entry["cost_source"] = f"no measured phase-A rate for {model} on {device.type} {precision}"
        elif stage.command == "extract-features":
            crops = EVAL_VIEWS.get(config.eval_views)
            splits = config.splits or tuple(sizes)
            rows = {s: sizes.get(s, 0) * (config.train_views + 1 if s == "train" else 1 + crops) for s in splits}
            dim = _embed_dim(model)
            caches[stage.name] = {"rows": rows, "dim": dim, "model": model, "images": sizes.get("train", 0)}
            if dim is not None:
                entry["disk_bytes"] = sum(rows.values()) * dim * BYTES[config.dtype]
                entry["memory_bytes"] = min(config.shard_size, max(rows.values(), default=0)) * dim * 4
            cost = measured(model, device, config.precision)
            if cost is not None:
                entry.update(seconds=sum(rows.values()) / cost.extract_rows_per_s, cost_source=cost.source)
            else:
                entry["cost_source"] = f"no measured extraction rate for {model} on {device.type} {config.precision}"
        elif stage.command in ("fit-adapter", "sweep", "evaluate"):
            cache = str(stage.options.get("cache", ""))
            source = next((s.name for s in recipe.stages if "{" + s.name + "}" in cache), None)
            held = caches.get(source or "")
            if held is not None and held["dim"] is not None:
                split = "train" if stage.command != "evaluate" else str(config.split)
                entry["memory_bytes"] = held["rows"].get(split, 0) * held["dim"] * 4
            cost = measured(held["model"], device, "fp32") if held is not None else None
            if stage.command != "evaluate" and cost is not None and held is not None:
                points = len(config) if stage.command == "sweep" else 1
                first = config[0] if stage.command == "sweep" else config
                entry["seconds"] = points * held["images"] * first.epochs / cost.phase_b_draws_per_s
                entry["cost_source"] = cost.source
            else:
                entry["cost_source"] = "phase B and evaluation run on cached features: seconds, not measured here"
        out.append(entry)
    return out
