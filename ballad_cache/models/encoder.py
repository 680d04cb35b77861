"""Frozen image encoding: a batch of preprocessed images in, L2-normalised float32 features out."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from ..registry import PRECISIONS, Registry
from .clip import ClipModel

FP32 = "fp32"  # the precision without autocast, in PRECISIONS and every registry extending it


def effective_precision(device: torch.device, precision: str, registry: Registry[str] = PRECISIONS) -> str:
    """The precision `autocast` runs `precision` in on `device`: the one asked for, bfloat16 on CPU included (slow
    on CPUs without native bfloat16, but what was asked), except bf16 on a CUDA GPU without bfloat16, which runs
    fp32: torch's autocast would turn itself off there with only a warning, and a cache must record what ran.

    Raises:
        ValueError: an unknown precision (the message lists the registered ones).
    """
    dtype = registry.get(precision)
    if dtype == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return FP32
    return precision


def autocast(
    device: torch.device, precision: str, registry: Registry[str] = PRECISIONS
) -> contextlib.AbstractContextManager:
    """Autocast to the dtype `registry` (default `PRECISIONS`) registers for the precision that runs on `device`
    (`effective_precision`): nothing for float32; bfloat16 on GPU and CPU; float16 on every device, since it runs
    models whose weights are stored in float16 (phase A's `fp16-official`).

    Raises:
        ValueError: an unknown precision (the message lists the registered ones).
    """
    dtype = registry.get(effective_precision(device, precision, registry))
    if dtype == "float32":
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
