"""The trainable pieces the tuning methods add, with LIFT's sizes and initialisation (shijxcs/LIFT
`models/peft_modules.py`): AdaptFormer, LoRA as a weight delta, SSF as a weight and bias parametrization, and
visual prompts.

LoRA is a `torch.nn.utils.parametrize` parametrization of the weight it changes (q and v inside
`nn.MultiheadAttention`'s stacked in-projection are out of a hook's reach): saving reads the merged tensor. SSF
follows each linear whose forward runs through a forward hook (`y · scale + shift`), so the backward computes no
weight gradient for it, and folds into that linear's weight and bias on save (`SSF.fold`); the SSF of the stacked
q/k/v, of the attention's out-projection (read without being called) and of the norms are parametrizations.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn


def lift_bottleneck(num_classes: int, layers: int) -> int:
    """LIFT's default bottleneck / rank: 2^max(0, int(log2(C / 2L))) (`models/peft_vit.py` lines 94-97)."""
    return 2 ** max(0, int(math.log2(num_classes / (layers * 2))))


class AdaptFormer(nn.Module):
    """x -> scale · up(relu(down(LN(x)))), added beside the MLP (LIFT `peft_modules.py` lines 54-78): `down`
    Kaiming-normal (a=√5), `up` and both biases zero (so step 0 is the base model), `scale` learnable from 1."""

    def __init__(self, width: int, bottleneck: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.down_proj = nn.Linear(width, bottleneck)
        self.up_proj = nn.Linear(bottleneck, width)
        self.scale = nn.Parameter(torch.ones(1))
        nn.init.kaiming_normal_(self.down_proj.weight, a=math.sqrt(5))
        nn.init.zeros_(self.up_proj.weight)
        nn.init.zeros_(self.down_proj.bias)
        nn.init.zeros_(self.up_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The branch's output for the FFN's residual input `x`."""
        return self.up_proj(F.relu(self.down_proj(self.ln(x)))) * self.scale


class LoRA(nn.Module):
    """A rank-r update of one map of input width `in_dim` and output width `out_dim`: y += s · x A B, A (in×r)
    Kaiming-uniform (a=√5), B (r×out) zero, s = alpha / r (LIFT `peft_modules.py` lines 81-99, alpha = 1)."""

    def __init__(self, in_dim: int, out_dim: int, rank: int, alpha: float = 1.0) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(in_dim, rank))
        self.lora_B = nn.Parameter(torch.zeros(rank, out_dim))
        self.scaling = alpha / rank
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def delta(self) -> torch.Tensor:
        """The update as a weight (out × in): s · (A B)ᵀ."""
        return self.scaling * (self.lora_A @ self.lora_B).T


class LoRAWeight(nn.Module):
    """Parametrization W -> W + ΔW, with one LoRA per row range of W (q and v of a stacked in-projection) or one over
    all rows; a convolution's weight is taken as out × (in·kh·kw)."""

    def __init__(self, parts: list[tuple[slice | None, LoRA]]) -> None:
        super().__init__()
        self.slices = [s for s, _ in parts]
        self.loras = nn.ModuleList([lora for _, lora in parts])

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The merged weight."""
        flat = weight.reshape(weight.shape[0], -1)
        rows = []
        start = 0
        for rng, lora in sorted(zip(self.slices, self.loras, strict=True), key=lambda p: p[0].start if p[0] else 0):
            rng = rng or slice(0, flat.shape[0])
            if rng.start > start:
                rows.append(flat[start : rng.start])
            rows.append(flat[rng] + cast(LoRA, lora).delta().to(flat.dtype))
            start = rng.stop
        if start < flat.shape[0]:
            rows.append(flat[start:])
        return torch.cat(rows).reshape(weight.shape)


class SSF(nn.Module):
    """Scale and shift of a map's output, y -> y · scale + shift, scale ~ N(1, 0.02), shift ~ N(0, 0.02) (LIFT
    `peft_modules.py` lines 102-118). Applied as a parametrization of the map's weight and bias (`SSFWeight`,
    `SSFBias`), it folds: W' = diag(scale) W, b' = scale · b + shift."""

    def __init__(self, width: int, site: str = "") -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(width))
        self.shift = nn.Parameter(torch.zeros(width))
        self.site = site  # the module it follows through a forward hook ("" when applied as a parametrization)
        nn.init.normal_(self.scale, mean=1.0, std=0.02)
        nn.init.normal_(self.shift, std=0.02)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        """`y · scale + shift` over the last dim, or the channel dim of an N×C×H×W map (LIFT lines 114-118)."""
        scale, shift = self.scale.to(y.dtype), self.shift.to(y.dtype)
        if y.dim() == 4:
            return y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        return y * scale + shift

    def fold(self, state: dict[str, torch.Tensor]) -> None:
        """Merge into the weight and bias of the module it follows, in a plain state dict: W' = diag(scale) W,
        b' = scale · b + shift."""
        weight, bias = state[f"{self.site}.weight"], state[f"{self.site}.bias"]
        scale, shift = self.scale.detach().to(weight), self.shift.detach().to(weight)
        state[f"{self.site}.weight"] = weight * scale.view(-1, *([1] * (weight.dim() - 1)))
        state[f"{self.site}.bias"] = bias * scale + shift


class SSFWeight(nn.Module):
    """Parametrization W -> diag(scale) W (rows scaled; any trailing dims)."""

    def __init__(self, ssf: SSF) -> None:
        super().__init__()
        self.ssf = ssf

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        """The scaled weight."""
        return weight * self.ssf.scale.to(weight.dtype).view(-1, *([1] * (weight.dim() - 1)))


class SSFBias(nn.Module):
    """Parametrization b -> scale · b + shift."""

    def __init__(self, ssf: SSF) -> None:
        super().__init__()
        self.ssf = ssf

    def forward(self, bias: torch.Tensor) -> torch.Tensor:
        """The scaled and shifted bias."""
        return bias * self.ssf.scale.to(bias.dtype) + self.ssf.shift.to(bias.dtype)


class VisualPrompts(nn.Module):
    """`length` learnable tokens appended to the sequence before a block (LIFT `peft_modules.py` lines 10-26): the
    sequence is first cut to the tokens without prompts, so a deep VPT replaces the previous block's prompts.
    Initialised uniform in ±√(6 / (3·patch_h·patch_w + width))."""

    def __init__(self, length: int, width: int, patch_size: tuple[int, int], seq_len: int) -> None:
        super().__init__()
        self.seq_len = seq_len
        self.prompt = nn.Parameter(torch.empty(length, width))
        bound = math.sqrt(6.0 / float(3 * patch_size[0] * patch_size[1] + width))
        nn.init.uniform_(self.prompt, -bound, bound)

    def forward(self, x: torch.Tensor, batch_first: bool) -> torch.Tensor:
        """`x` (N×L×D, or L×N×D when not `batch_first`) cut to its first `seq_len` tokens, prompts appended."""
        if batch_first:
            prompt = self.prompt.to(x.dtype).expand(x.shape[0], -1, -1)
            return torch.cat([x[:, : self.seq_len], prompt], dim=1)
        prompt = self.prompt.to(x.dtype).unsqueeze(1).expand(-1, x.shape[1], -1)
        return torch.cat([x[: self.seq_len], prompt], dim=0)
