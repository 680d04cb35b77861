"""Frozen image encoding: a batch of preprocessed images in, L2-normalised float32 features out."""

from __future__ import annotations

import contextlib

import numpy as np
import torch
import torch.nn.functional as F

from .clip import ClipModel

PRECISIONS = ("fp32", "bf16")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on GPU when asked for; a no-op otherwise (fp32, or CPU where bf16 autocast is slow)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}")
    if precision == "bf16" and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
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
