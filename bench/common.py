"""Helpers for bench scripts: synthetic ImageNet-LT-shaped features, timing, JSON output."""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
logging.getLogger().setLevel(logging.ERROR)

from ballad_cache.heads.batches import TrainRows  # noqa: E402
from ballad_cache.store.cache import SplitFeatures  # noqa: E402


def imagenet_lt_counts(classes: int = 1000, head: int = 1280, tail: int = 5, total: int = 115_846) -> np.ndarray:
    """ImageNet-LT's shape: `classes` counts from `head` down to `tail` summing to `total` (115,846 by default).

    A Zipf-like profile n_r = head / (1 + r / r0)^a with a fixed by n_last = tail and r0 bisected to the total;
    an exponential profile from 1280 to 5 would hold twice ImageNet-LT's images.
    """
    ranks = np.arange(classes)

    def profile(r0: float) -> np.ndarray:
        a = np.log(head / tail) / np.log(1 + (classes - 1) / r0)
        return np.floor(head / (1 + ranks / r0) ** a + 1e-9).astype(np.int64)

    lo, hi = 1e-3, 1e7
    for _ in range(200):
        mid = (lo * hi) ** 0.5
        lo, hi = (lo, mid) if profile(mid).sum() > total else (mid, hi)
    return profile(lo)


def imagenet_lt_shaped(
    scale: float = 1.0, dim: int = 1024, classes: int = 1000, seed: int = 0
) -> tuple[TrainRows, torch.Tensor]:
    """Normalised random features with ImageNet-LT's shape (1280 ... 5 per class, 115,846 rows at scale 1)."""
    counts = [max(1, int(c * scale)) for c in imagenet_lt_counts(classes)]
    gen = torch.Generator().manual_seed(seed)
    labels = torch.as_tensor(np.repeat(np.arange(classes), counts))
    feats = F.normalize(torch.randn(len(labels), dim, generator=gen), dim=-1)
    text = F.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    split = SplitFeatures(feats, labels, torch.arange(len(labels)), torch.zeros(len(labels), dtype=torch.int64))
    return TrainRows.from_split(split), text


def machine() -> str:
    """A one-line description of where the benchmark ran."""
    dev = (
        torch.cuda.get_device_name(0)
        if torch.cuda.is_available()
        else f"CPU ({platform.processor() or platform.machine()})"
    )
    return f"{dev}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def timed(fn: Any, sync: bool = False) -> float:
    """Seconds one call of `fn` takes."""
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if sync and torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def write(name: str, record: dict[str, Any]) -> None:
    """Print and store a result as NAME.json in $BALLAD_BENCH_OUT (default bench/out/)."""
    record = {"bench": name, "machine": machine(), **record}
    out = Path(os.environ.get("BALLAD_BENCH_OUT") or Path(__file__).parent / "out")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
