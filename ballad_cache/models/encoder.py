"""Frozen image encoding: a batch of preprocessed images in, L2-normalised float32 features out."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import PRECISIONS
from .clip import ClipModel


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to the dtype `PRECISIONS` registers for `precision`, on GPU; a no-op for float32 and on CPU, where bf16
    autocast of a whole encoder is slow.

    Raises:
        ValueError: an unknown precision (the message lists the registered ones).
    """
    dtype = PRECISIONS.get(precision)
    if dtype != "float32" and device.type == "cuda":
        return torch.autocast("cuda", dtype=getattr(torch, dtype))
    return contextlib.nullcontext()


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
