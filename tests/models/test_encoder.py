"""`models/encoder.py`: the autocast a precision asks for, and the frozen encoder's normalised float32 features."""

import numpy as np
import pytest
import torch

from ballad_cache.models.encoder import ImageEncoder, autocast, effective_precision
from ballad_cache.registry import PRECISIONS, Registry

CPU = torch.device("cpu")
EPS32 = float(np.finfo(np.float32).eps)


class LinearTower(torch.nn.Module):
    """The part of a CLIP model the encoder calls: `encode_image` (here flatten → linear, no bias), with a dropout
    that only eval mode turns off."""

    def __init__(self, pixels: int, dim: int) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(pixels, dim, bias=False)
        self.drop = torch.nn.Dropout(0.5)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.drop(images.flatten(1)))


def test_fp32_autocasts_nothing_and_an_unknown_precision_lists_the_known_ones():
    with autocast(CPU, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(ValueError, match="unknown precision 'fp8'; known: fp32, bf16"):
        autocast(CPU, "fp8")


def test_float16_autocasts_on_every_device_to_the_registered_dtype():
    """Catches a float16 precision (phase A's fp16-official) left in float32 on CPU: its matmuls must run in
    float16, and the dtype comes from the registry handed in."""
    registry: Registry[str] = Registry("precision")
    registry.register("half", "float16")
    a = torch.randn(8, 8)
    with autocast(CPU, "half", registry):
        assert torch.is_autocast_enabled("cpu")
        assert (a @ a).dtype == torch.float16
    assert (a @ a).dtype == torch.float32  # off again outside the block


def test_encoder_returns_unit_float32_rows_of_the_towers_output_in_eval_and_inference_mode():
    """Catches features that are not `normalize(model.encode_image(x))`: unnormalised, another dtype, the model
    left in train mode (dropout would zero half the pixels), or gradients recorded.

    The float64 reference is the same map; float32 differs from it by the rounding of a dot product of K terms
    (|error| <= K·eps·(|x|·|W|), Higham's gamma_K), carried through the normalisation (divided by the float64 norm),
    plus the normalisation's own rounding (about (D + 2)·eps of a unit vector)."""
    torch.manual_seed(0)
    channels, size, dim = 3, 4, 16
    tower = LinearTower(channels * size * size, dim).train()
    encoder = ImageEncoder(tower, CPU)
    images = torch.randn(5, channels, size, size)
    feats = encoder(images)
    assert not tower.training  # eval mode: no dropout
    assert isinstance(feats, np.ndarray) and feats.dtype == np.float32 and feats.shape == (5, dim)
    x = images.flatten(1).double().numpy()
    w = tower.proj.weight.detach().double().numpy()
    raw = x @ w.T
    norm = np.linalg.norm(raw, axis=1, keepdims=True)
    reference = raw / norm
    k = x.shape[1]
    bound = k * EPS32 * (np.abs(x) @ np.abs(w).T) / norm + (dim + 2) * EPS32
    assert (np.abs(feats - reference) <= bound).all()
    assert np.abs(np.linalg.norm(feats.astype(np.float64), axis=1) - 1).max() <= (dim + 2) * EPS32


def test_encoder_runs_in_inference_mode():
    seen = []

    class Recorder(LinearTower):
        def encode_image(self, images: torch.Tensor) -> torch.Tensor:
            seen.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))
            return super().encode_image(images)

    ImageEncoder(Recorder(12, 4), CPU)(torch.randn(2, 3, 2, 2))
    assert seen == [(True, False)]


def test_encoder_uses_the_precision_it_was_given():
    """The registered precision reaches the tower through `autocast` (fp32: no autocast)."""
    assert "fp32" in PRECISIONS
    seen = []

    class Recorder(LinearTower):
        def encode_image(self, images: torch.Tensor) -> torch.Tensor:
            seen.append(torch.is_autocast_enabled("cpu"))
            return super().encode_image(images)

    encoder = ImageEncoder(Recorder(12, 4), CPU, precision="fp32")
    encoder(torch.randn(2, 3, 2, 2))
    assert encoder.precision == "fp32" and seen == [False]


def test_bf16_runs_in_bfloat16_on_cpu_and_in_fp32_on_a_gpu_without_bfloat16(monkeypatch):
    """Catches bf16 asked for on CPU and computed in float32, and a bf16 that torch's autocast turns off on a GPU
    without bfloat16 (it only warns) while the precision says bf16."""
    a = torch.randn(8, 8)
    assert effective_precision(CPU, "bf16") == "bf16"
    with autocast(CPU, "bf16"):
        assert (a @ a).dtype == torch.bfloat16
    gpu = torch.device("cuda")  # only named: nothing runs on it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    assert effective_precision(gpu, "bf16") == "fp32" and effective_precision(gpu, "fp32") == "fp32"
    with autocast(gpu, "bf16"):
        assert not torch.is_autocast_enabled("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert effective_precision(gpu, "bf16") == "bf16"


def test_bf16_features_are_bfloat16_matmuls_within_their_rounding_bound():
    """Catches bf16 features computed in float32 (they would sit within float32's bound of the float64 reference)
    or in a lower precision than bfloat16 matmuls (accumulating in bfloat16, say).

    Autocast rounds the linear's inputs to bfloat16 (relative u = 2⁻⁸ each), accumulates the K products in float32
    and rounds the output to bfloat16: per entry |error| <= ((2u + u²)(1 + u) + K·eps32(1 + u)³)·(|x|·|W|ᵀ)
    + u·|raw|. Normalising turns an error e of a row r into at most 2‖e‖/‖r‖, plus float32's own rounding."""
    torch.manual_seed(0)
    channels, size, dim = 3, 4, 16
    tower = LinearTower(channels * size * size, dim)
    images = torch.randn(64, channels, size, size)
    bf16 = ImageEncoder(tower, CPU, precision="bf16")(images).astype(np.float64)
    fp32 = ImageEncoder(tower, CPU, precision="fp32")(images).astype(np.float64)
    x = images.flatten(1).double().numpy()
    w = tower.proj.weight.detach().double().numpy()
    raw = x @ w.T
    norm = np.linalg.norm(raw, axis=1, keepdims=True)
    reference = raw / norm
    u, k, magnitude = 2.0**-8, x.shape[1], np.abs(x) @ np.abs(w).T
    error = ((2 * u + u * u) * (1 + u) + k * EPS32 * (1 + u) ** 3) * magnitude + u * np.abs(raw)
    bound = 2 * np.linalg.norm(error, axis=1) / norm[:, 0] + np.sqrt(dim) * (dim + 2) * EPS32
    assert (np.linalg.norm(bf16 - reference, axis=1) <= bound).all()
    fp32_bound = k * EPS32 * magnitude / norm + (dim + 2) * EPS32  # where float32 features lie (test above)
    assert (np.abs(fp32 - reference) <= fp32_bound).all() and not (np.abs(bf16 - reference) <= fp32_bound).all()
