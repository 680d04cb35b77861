"""Frozen image encoding: a batch of preprocessed images in, L2-normalised float32 features out."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import PRECISIONS, Registry
from .clip import ClipModel


def autocast(
    device: torch.device, precision: str, registry: Registry[str] = PRECISIONS
) -> contextlib.AbstractContextManager:
    """Autocast to the dtype `registry` (default `PRECISIONS`) registers for `precision`: nothing for float32;
    bfloat16 on GPU only (on CPU, bf16 autocast of a whole encoder is slow); float16 on every device, since it runs
    models whose weights are stored in float16 (phase A's `fp16-official`).

    Raises:
        ValueError: an unknown precision (the message lists the registered ones).
    """
    dtype = registry.get(precision)
    if dtype == "float32" or (dtype == "bfloat16" and device.type != "cuda"):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=getattr(torch, dtype))


class ImageEncoder:
    """Runs `model.encode_image` in inference mode on `device` and returns normalised numpy features."""

    def __init__(self, model: ClipModel, device: torch.device, precision: str = "fp32") -> None:
        self.model = model.eval().to(device)
        self.device = device
        self.precision = precision

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> np.ndarray:
        """Encode a batch (N×3×H×W) to N×D float32, L2-normalised."""
        images = images.to(self.device, non_blocking=True)
        with autocast(self.device, self.precision):
            feats = self.model.encode_image(images)
        return F.normalize(feats.float(), dim=-1).cpu().numpy()
