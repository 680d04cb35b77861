"""Decoding dataset rows into model inputs, for extraction and finetuning.

A row is (image index in the split, view): view 0 is the eval transform, view k ≥ 1 the k-th augmented view.
Augmentations are seeded per (seed, index, view), so a shard or an epoch decodes to the same tensors whether it
runs in one go, after a crash, or split across ranks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import BalladError
from ..options import DEFAULT_MAX_PIXELS
from .datasets import BadImageError, ImageSplit


class ImageRows(Dataset):
    """Rows of a split as model inputs; an unreadable image yields a zero tensor and its error text."""

    def __init__(
        self,
        split: ImageSplit,
        rows: np.ndarray,
        eval_transform: Callable[[Any], torch.Tensor],
        train_transform: Callable[[Any], torch.Tensor] | None = None,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.split = split
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        self.eval_transform = eval_transform
        self.train_transform = train_transform or eval_transform
        self.seed = seed
        self.max_pixels = max_pixels
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, view = (int(v) for v in self.rows[i])
        error = ""
        try:
            image = self.split.load(index, self.max_pixels)
            if view == 0:
                x = self.eval_transform(image)
            else:
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(hash((self.seed, index, view)) & 0x7FFF_FFFF)
                    x = self.train_transform(image)
            self._shape = tuple(x.shape)
        except BadImageError as exc:
            error = str(exc)
            x = torch.zeros(self._shape or self._probe_shape())
        return {
            "image": x,
            "label": int(self.split.labels[index]),
            "index": index,
            "view": view,
            "error": error,
            "path": self.split.paths[index],
        }

    def _probe_shape(self) -> tuple[int, ...]:
        from PIL import Image

        self._shape = tuple(self.eval_transform(Image.new("RGB", (32, 32))).shape)
        return self._shape


def usable_rows(batch: dict[str, Any], skip_bad: bool) -> np.ndarray:
    """Boolean mask of a collated ImageRows batch: the rows whose image decoded.

    Raises:
        BalladError: the first unreadable image's path and index, unless `skip_bad`.
    """
    keep = np.array([not e for e in batch["error"]], dtype=bool)
    if not skip_bad and not keep.all():
        raise BalladError(batch["error"][int(np.flatnonzero(~keep)[0])])
    return keep


def skipped_row(batch: dict[str, Any], i: int | np.integer) -> dict[str, Any]:
    """Row `i` of a batch as manifests and summaries list a skipped image: index, path and reason."""
    return {"index": int(batch["index"][i]), "path": batch["path"][i], "reason": batch["error"][i]}


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    shuffle: bool = False,
    sampler: Any = None,
    drop_last: bool = False,
    batch_sampler: Any = None,
) -> DataLoader:
    """A DataLoader with ballad's defaults: persistent workers off, pinned memory on GPU, prefetch 4 batches.

    With `batch_sampler` (lists of row positions, one per batch), `batch_size`, `shuffle`, `sampler` and
    `drop_last` are not used.
    """
    if batch_sampler is not None:
        return DataLoader(
            dataset,
            batch_sampler=batch_sampler,
            num_workers=workers,
            pin_memory=pin_memory,
            prefetch_factor=4 if workers > 0 else None,
        )
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=drop_last,
        prefetch_factor=4 if workers > 0 else None,
    )
