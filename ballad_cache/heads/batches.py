"""Phase B's batch schedule: which cached feature rows each optimizer step trains on.

The official loop (gaopengcuhk/BALLAD `train.py`) runs floor(N/B) full batches per epoch from OLTR's class-aware
sampler whose class and per-class cycles persist across epochs (`inputs/samplers.py`); each drawn image contributes
one of its cached augmented views, picked with the seed. Every trainer of phase B (the residual adapter, a cosine
head, tip-f's keys) cuts its steps here, so a configuration's batches do not depend on which head trains on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..inputs.samplers import index_stream
from ..schedules import batches_per_epoch

if TYPE_CHECKING:
    from ..store.cache import SplitFeatures
    from .config import AdapterConfig


@dataclass
class TrainRows:
    """Training rows for phase B: image labels and, per image, the rows of its views in the feature matrix."""

    features: torch.Tensor  # all cached train rows
    image_labels: np.ndarray  # label per image (index stream domain)
    view_rows: np.ndarray  # images × V: the feature rows of each image's views (augmented views when present)

    @classmethod
    def from_split(cls, split: SplitFeatures) -> TrainRows:
        """Group a cached split's rows by image; with augmented views, draws use only those (as the official
        phase B trains on augmented images); otherwise the eval view."""
        view = split.view.numpy()
        use = view > 0 if (view > 0).any() else view == 0
        rows = np.flatnonzero(use)
        img = split.index.numpy()[rows]
        order = np.lexsort((view[rows], img))
        rows, img = rows[order], img[order]
        _, starts, counts = np.unique(img, return_index=True, return_counts=True)
        v = int(counts.min()) if len(counts) else 1
        view_rows = np.stack([rows[starts + j] for j in range(v)], axis=1) if len(counts) else np.empty((0, 1), int)
        labels = split.labels.numpy()[rows[starts]] if len(counts) else np.empty(0, np.int64)
        return cls(split.features, labels.astype(np.int64), view_rows)

    def draw(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Feature rows for a batch of image draws, each picking one of the image's views at random."""
        if self.view_rows.shape[1] == 1:
            return self.view_rows[images, 0]
        return self.view_rows[images, rng.integers(0, self.view_rows.shape[1], size=len(images))]


def steps_per_epoch(num_images: int, config: AdapterConfig) -> int:
    """Optimizer steps in one epoch: floor(N/B) full batches (official), or ceil(N/B) with `keep_last_batch`.

    Raises:
        BalladError: fewer training images than one batch under the official floor(N/B) (no step would run).
    """
    return batches_per_epoch(num_images, config.batch_size, config.keep_last_batch, config.epochs)


def batch_schedule(
    rows: TrainRows, config: AdapterConfig, stream: Sequence[np.ndarray] | None = None
) -> list[list[np.ndarray]]:
    """The feature rows of every step, epoch by epoch.

    Args:
        rows: cached training rows.
        config: sampler, epochs, batch size and seed.
        stream: per-epoch image indices to use instead of the sampler's (tests, benchmarks); each epoch is cut
            into batches the same way, its length taking the place of the number of images.
    """
    if stream is None:
        n_steps = steps_per_epoch(len(rows.image_labels), config)
        draws = len(rows.image_labels) if config.keep_last_batch else n_steps * config.batch_size
        stream = index_stream(
            rows.image_labels, config.sampler, config.epochs, config.seed, config.samples_per_class, draws
        )
    view_rng = np.random.default_rng(config.seed + 1)
    epochs = []
    for images in stream:
        keep = len(images) if config.keep_last_batch else steps_per_epoch(len(images), config) * config.batch_size
        picked = rows.draw(np.asarray(images)[:keep], view_rng)
        epochs.append([picked[i : i + config.batch_size] for i in range(0, len(picked), config.batch_size)])
    return epochs
