"""Augmented views made on the encoding device (`extract-features --augment-on device`).

The PIL path (`--augment-on worker`) runs the augmentation's crop, flip and colour jitter on every view in the
DataLoader workers. Here the workers decode an image once, make its eval view as before, and only *draw* each
augmented view's parameters: with the same seed per (seed, index, view), through the same torchvision calls
(`RandomResizedCrop.get_params`, the flip's `torch.rand(1)`, `ColorJitter.get_params`) in the same order, so a view's
crop box, flip and jitter factors are exactly those of the PIL path. The pixels are then made from the decoded
image on the device, for the whole batch at once: `torchvision.transforms.v2.functional` crops and resizes each view
(bicubic, antialiased), and the flip, the three jitter blends (in each view's own order) and the normalisation run
on the stacked batch. The rows differ from PIL's in rounding only (PIL rounds to 8 bits after each step and clamps
its bicubic kernel otherwise), which is why the cache's fingerprint records the choice.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

# one row of view parameters: crop (top, left, height, width), flip, jitter factors (brightness, contrast,
# saturation; 1 = unchanged) and the jitter order (torchvision's fn_idx: 0 brightness, 1 contrast, 2 saturation)
PARAMS = 12
_PASSIVE = ("ToTensor", "MaybeToTensor", "MaybeConvertMode", "PILToTensor", "ConvertImageDtype")


class DeviceAugment:
    """An augmentation (a torchvision `Compose` of RandomResizedCrop, optional RandomHorizontalFlip and ColorJitter
    without hue, ToTensor, Normalize) split into its random draws (`draw`, in the workers) and its pixels (`apply`,
    batched on the device).

    Raises:
        ValueError: the augmentation holds a step this class does not run (the message names it).
    """

    def __init__(self, transform: Callable[[Any], torch.Tensor]) -> None:
        from torchvision import transforms as T

        steps = list(getattr(transform, "transforms", [transform]))
        self.crop: Any = None
        self.flip_p: float | None = None  # None: no flip step (and no draw for it)
        self.jitter: Any = None
        self.mean: tuple[float, ...] = ()
        self.std: tuple[float, ...] = ()
        order: list[int] = []  # the random steps in the order they draw and apply: crop, then flip, then jitter
        for step in steps:
            name = type(step).__name__
            if isinstance(step, T.RandomResizedCrop) and self.crop is None:
                self.crop, order = step, [*order, 0]
            elif isinstance(step, T.RandomHorizontalFlip) and self.flip_p is None:
                self.flip_p, order = float(step.p), [*order, 1]
            elif isinstance(step, T.ColorJitter) and step.hue is None and self.jitter is None:
                self.jitter, order = step, [*order, 2]
            elif isinstance(step, T.Normalize):
                self.mean, self.std = tuple(map(float, step.mean)), tuple(map(float, step.std))
            elif name not in _PASSIVE and getattr(step, "__name__", "") != "_convert_to_rgb":  # images are RGB
                raise ValueError(f"the augmentation's step {name} does not run on the device")
        if self.crop is None or not self.mean:
            raise ValueError("an augmentation on the device needs a RandomResizedCrop and a Normalize")
        if order != sorted(order):
            raise ValueError("the device runs RandomResizedCrop, then the flip, then ColorJitter; this one differs")
        modes = {T.InterpolationMode.BICUBIC: "bicubic", T.InterpolationMode.BILINEAR: "bilinear"}
        if self.crop.interpolation not in modes:
            raise ValueError(f"the crop's {self.crop.interpolation.value} interpolation does not run on the device")
        self.mode = modes[self.crop.interpolation]
        self.antialias = bool(self.crop.antialias)
        size = self.crop.size
        self.size: tuple[int, int] = (int(size[0]), int(size[1]))

    def draw(self, image: Any) -> list[float]:
        """One view's parameters (`PARAMS` numbers) for a PIL `image`, drawn from torch's global generator exactly as
        the transform's own forward draws them (seed it first, as the PIL path does)."""
        from torchvision import transforms as T

        top, left, height, width = T.RandomResizedCrop.get_params(image, self.crop.scale, self.crop.ratio)
        # the flip step always draws, whatever its p (RandomHorizontalFlip.forward), so later draws stay in step
        flip = float(bool(torch.rand(1) < self.flip_p)) if self.flip_p is not None else 0.0
        factors, order = [1.0, 1.0, 1.0], [0.0, 1.0, 2.0, 3.0]
        if self.jitter is not None:
            j = self.jitter
            fn_idx, *drawn = T.ColorJitter.get_params(j.brightness, j.contrast, j.saturation, j.hue)
            factors = [1.0 if f is None else float(f) for f in drawn[:3]]
            order = [float(i) for i in fn_idx.tolist()]
        return [float(top), float(left), float(height), float(width), flip, *factors, *order]

    def apply(
        self,
        source_data: torch.Tensor,
        source_shapes: torch.Tensor,
        source_of: torch.Tensor,
        params: torch.Tensor,
        device: torch.device,
    ) -> torch.Tensor:
        """The views as a normalised float32 batch on `device`: view r crops decoded image `source_of[r]` with
        `params[r]` (CPU, float64). The decoded images are uint8 H×W×C, flattened one after another in
        `source_data` (one tensor a batch, so a loader ships and pins one buffer), their shapes in `source_shapes`."""
        from torchvision.transforms.v2 import functional as TF

        n = len(params)
        if n == 0:
            return torch.empty(0, 3, *self.size, device=device)
        data = source_data.to(device, non_blocking=True)
        shapes = source_shapes.tolist()
        ends = np.cumsum([h * w * c for h, w, c in shapes]).tolist()
        # 0-255, 1×C×H×W: one conversion per decoded image
        images = [
            data[end - h * w * c : end].view(h, w, c).permute(2, 0, 1)[None].float()
            for (h, w, c), end in zip(shapes, ends, strict=True)
        ]
        boxes = params[:, :4].long().tolist()
        # what TF.resize runs on a float image (the crop's interpolation and antialias) without its dispatch: one
        # kernel a view (crop boxes differ in size), gathered by one cat
        views = [
            torch.nn.functional.interpolate(
                images[s][:, :, top : top + height, left : left + width],
                size=self.size,
                mode=self.mode,
                align_corners=False,
                antialias=self.antialias,
            )
            for (top, left, height, width), s in zip(boxes, source_of.tolist(), strict=True)
        ]
        out = torch.cat(views).clamp_(0, 255).div_(255)
        # which views flip and which blend runs at each step come from the CPU parameters: no device sync
        flip = torch.nonzero(params[:, 4] > 0.5).flatten()
        if len(flip):
            rows = flip.to(device)
            out[rows] = out[rows].flip(-1)
        order = params[:, 8:].long()
        for step in range(4):
            for fn, adjust in enumerate((_brightness, _contrast, _saturation)):
                picked = torch.nonzero((order[:, step] == fn) & (params[:, 5 + fn] != 1.0)).flatten()
                if len(picked):
                    rows = picked.to(device)
                    factor = params[picked, 5 + fn].to(device, torch.float32).view(-1, 1, 1, 1)
                    out[rows] = adjust(out[rows], factor)
        return TF.normalize(out, list(self.mean), list(self.std))


def _gray(x: torch.Tensor) -> torch.Tensor:
    from torchvision.transforms.v2 import functional as TF

    return TF.rgb_to_grayscale(x)


def _brightness(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (x * f).clamp_(0, 1)


def _contrast(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    # each view's mean summed in float64 (float32 where the device has none): the same value whatever the batch
    # around it and the thread count, where a float32 reduction's order would change its last bit
    wide = torch.float32 if x.device.type == "mps" else torch.float64
    mean = _gray(x).to(wide).mean(dim=(-3, -2, -1), keepdim=True).to(x.dtype)
    return (f * x + (1 - f) * mean).clamp_(0, 1)


def _saturation(x: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return (f * x + (1 - f) * _gray(x)).clamp_(0, 1)


def assemble(batch: dict[str, Any], augment: DeviceAugment | None, device: torch.device) -> torch.Tensor:
    """A collated batch's model inputs on `device`: the rows the workers made, with the device-made views (rows
    `batch["deferred"]`) filled in by `augment`."""
    if augment is None or "deferred" not in batch:
        return batch["image"].to(device, non_blocking=True)
    ready, deferred = batch["ready"], batch["deferred"]
    out = torch.empty(len(ready) + len(deferred), 3, *augment.size, device=device)
    if len(ready):
        out[ready.to(device)] = batch["image"].to(device, non_blocking=True)
    if len(deferred):
        out[deferred.to(device)] = augment.apply(
            batch["source_data"], batch["source_shapes"], batch["source_of"], batch["params"], device
        )
    return out
