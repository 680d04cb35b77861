"""Decoding dataset rows into model inputs, for extraction and finetuning.

A row is (image index in the split, view): view 0 is the eval transform, view k ≥ 1 the k-th augmented view, view
-k the k-th test-time crop (`transforms.CropViews`).
Augmentations are seeded per (seed, index, view), so a shard or an epoch decodes to the same tensors whether it
runs in one go, after a crash, or split across ranks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import BalladError
from ..options import DEFAULT_MAX_PIXELS
from .datasets import BadImageError, ImageSplit
from .device_augment import DeviceAugment


class ImageRows(Dataset):
    """Rows of a split as model inputs; an unreadable image yields a zero tensor and its error text.

    With `device_views`, augmented views are not made here: their rows carry `image` None and the view's drawn
    parameters (`params`), and the first row of each image group the decoded image (`source`, uint8 H×W×C), for
    `device_augment.assemble` to make the pixels on the encoding device (read them with `ImageGroups`).
    """

    def __init__(
        self,
        split: ImageSplit,
        rows: np.ndarray,
        eval_transform: Callable[[Any], torch.Tensor],
        train_transform: Callable[[Any], torch.Tensor] | None = None,
        seed: int = 0,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        draft: int = 0,
        device_views: DeviceAugment | None = None,
        crop_views: Callable[[Any], list[torch.Tensor]] | None = None,
    ) -> None:
        self.split = split
        self.crop_views = crop_views  # the test-time crops of an image (rows with view < 0), made once per group
        self.device_views = device_views
        self.draft = draft  # decode JPEGs reduced while their shorter side keeps this many pixels (0: full size)
        # augmented views crop down to 0.61 of the shorter side (RandomResizedCrop, area 0.5, aspect 3/4) before they
        # resize: twice the input keeps every crop at or above it. Fixed per reader (not per batch), so a row's
        # pixels never depend on which other rows share its batch
        self.rows = np.asarray(rows, dtype=np.int64).reshape(-1, 2)
        self._draft_side = draft * (2 if (self.rows[:, 1] != 0).any() else 1)  # crops resize to size + expand
        self.eval_transform = eval_transform
        self.train_transform = train_transform or eval_transform
        self.seed = seed
        self.max_pixels = max_pixels
        self._shape: tuple[int, ...] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.group([i])[0]

    def group(self, positions: Sequence[int]) -> list[dict[str, Any]]:
        """Rows at `positions`, all of one image, from one decode: each view seeded by (seed, index, view) exactly
        as a row decoded alone, so the tensors are bitwise those of `self[i]` for each position."""
        index = int(self.rows[positions[0], 0])
        views = [int(self.rows[i, 1]) for i in positions]
        if any(int(self.rows[i, 0]) != index for i in positions):
            raise ValueError("a row group must hold rows of one image")
        error, images = "", []
        params: list[list[float] | None] = []
        source: torch.Tensor | None = None
        crops: list[torch.Tensor] | None = None
        try:
            image = self.split.load(index, self.max_pixels, self._draft_side)
            # one fork of the global generator for the whole group: each view re-seeds it, and the caller's state
            # comes back after the last
            with torch.random.fork_rng(devices=[]):
                for view in views:
                    x, p = None, None
                    if view == 0:
                        x = self.eval_transform(image)
                        self._shape = tuple(x.shape)
                    elif view < 0:
                        if self.crop_views is None:
                            raise ValueError("rows with test-time crops (view < 0) need crop_views")
                        crops = crops if crops is not None else self.crop_views(image)
                        x = crops[-view - 1]
                    else:
                        # the CPU generator alone: what torch.manual_seed seeds for CPU transforms, bitwise, without
                        # its per-call bookkeeping for every accelerator (about 1.5 ms a view)
                        torch.default_generator.manual_seed(hash((self.seed, index, view)) & 0x7FFF_FFFF)
                        if self.device_views is None:
                            x = self.train_transform(image)
                            self._shape = tuple(x.shape)
                        else:
                            p = self.device_views.draw(image)
                            if source is None:
                                source = torch.from_numpy(np.array(image, dtype=np.uint8))
                    images.append(x)
                    params.append(p)
        except BadImageError as exc:
            error, source = str(exc), None
            images = [torch.zeros(self._shape or self._probe_shape()) for _ in views]
            params = [None] * len(views)
        label, path = int(self.split.labels[index]), self.split.paths[index]
        rows: list[dict[str, Any]] = [
            {"image": x, "label": label, "index": index, "view": v, "error": error, "path": path}
            for x, v in zip(images, views, strict=True)
        ]
        for row, p in zip(rows, params, strict=True):
            if p is not None:
                row["params"] = p
        if source is not None:
            rows[0]["source"] = source
        return rows

    def _probe_shape(self) -> tuple[int, ...]:
        from PIL import Image

        self._shape = tuple(self.eval_transform(Image.new("RGB", (32, 32))).shape)
        return self._shape


class ImageGroups(Dataset):
    """An `ImageRows` read one image at a time: item g is the rows `groups[g]` (positions of one image's rows), from
    one decode. Batch with `group_batches` and collate with `collate_groups`, and each batch holds the same rows,
    in the same order and bitwise the same, as the row-by-row reader's."""

    def __init__(self, rows: ImageRows, groups: Sequence[Sequence[int]]) -> None:
        self.rows = rows
        self.groups = [list(g) for g in groups]

    def __len__(self) -> int:
        return len(self.groups)

    def __getitem__(self, g: int) -> list[dict[str, Any]]:
        return self.rows.group(self.groups[g])


def group_batches(rows: np.ndarray, batches: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[list[int]]]:
    """Split each batch of row positions into runs of one image; returns (groups of positions, batches of group
    numbers). An image whose views straddle two batches is decoded once per batch it appears in."""
    groups: list[list[int]] = []
    grouped: list[list[int]] = []
    for batch in batches:
        mine: list[int] = []
        for position in batch:
            if mine and groups[-1] and int(rows[groups[-1][-1], 0]) == int(rows[position, 0]):
                groups[-1].append(position)
            else:
                groups.append([position])
                mine.append(len(groups) - 1)
        grouped.append(mine)
    return groups, grouped


def collate_groups(items: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """Collate `ImageGroups` items into one batch, as the default collate would the same rows one by one."""
    rows = [row for item in items for row in item]
    batch = {
        "label": torch.tensor([r["label"] for r in rows]),
        "index": torch.tensor([r["index"] for r in rows]),
        "view": torch.tensor([r["view"] for r in rows]),
        "error": [r["error"] for r in rows],
        "path": [r["path"] for r in rows],
    }
    ready = [i for i, r in enumerate(rows) if r["image"] is not None]
    if len(ready) == len(rows):
        return {"image": torch.stack([r["image"] for r in rows]), **batch}
    # views made on the device (ImageRows with device_views): each image group's decoded image once, its views'
    # parameters, and where the rows go (see device_augment.assemble)
    sources: list[torch.Tensor] = []
    source_of: list[int] = []
    params: list[list[float]] = []
    for item in items:
        if "source" in item[0]:
            sources.append(item[0]["source"])
        for r in item:
            if r["image"] is None:
                source_of.append(len(sources) - 1)
                params.append(r["params"])
    return {
        "image": torch.stack([rows[i]["image"] for i in ready]) if ready else torch.zeros(0),
        "ready": torch.tensor(ready, dtype=torch.long),
        "deferred": torch.tensor([i for i, r in enumerate(rows) if r["image"] is None], dtype=torch.long),
        # the decoded images flattened into one buffer: one tensor to ship from a worker and to pin, whatever the count
        "source_data": torch.cat([x.flatten() for x in sources]) if sources else torch.zeros(0, dtype=torch.uint8),
        "source_shapes": torch.tensor([list(x.shape) for x in sources], dtype=torch.long).reshape(-1, 3),
        "source_of": torch.tensor(source_of, dtype=torch.long),
        "params": torch.tensor(params, dtype=torch.float64),
        **batch,
    }


def grouped_loader(
    reader: ImageRows, batches: Sequence[Sequence[int]], batch_size: int, workers: int, pin_memory: bool = False
) -> DataLoader:
    """A loader of `reader`'s rows in `batches` (lists of row positions) that decodes each image once for all its
    rows in a batch (`group_batches`, `ImageGroups`, `collate_groups`)."""
    groups, grouped = group_batches(reader.rows, batches)
    return make_loader(
        ImageGroups(reader, groups),
        batch_size,
        workers,
        pin_memory=pin_memory,
        batch_sampler=grouped,
        collate_fn=collate_groups,
    )


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
    """Row `i` of a batch as manifests and summaries list a skipped image: index, path and reason (without the
    advice to pass --skip-bad: it was passed)."""
    reason = str(batch["error"][i]).removesuffix(BadImageError.advice)
    return {"index": int(batch["index"][i]), "path": batch["path"][i], "reason": reason}


def make_loader(
    dataset: Dataset,
    batch_size: int,
    workers: int,
    pin_memory: bool = False,
    shuffle: bool = False,
    sampler: Any = None,
    drop_last: bool = False,
    batch_sampler: Any = None,
    collate_fn: Any = None,
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
            collate_fn=collate_fn,
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
