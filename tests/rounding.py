"""Rounding bounds the float tests share: each comparison's tolerance follows from the arithmetic, not from a run.

eps is the machine epsilon (2⁻²³ for float32, 2⁻⁵² for float64): twice the unit roundoff, so a bound written in eps
holds with a factor two to spare. A float32 dot product of length d is off by at most d·eps/2 · Σ|xᵢyᵢ|, a float32
normalisation by (d + 2)·eps/2 of each coordinate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import torch

from ballad_cache.heads.batches import TrainRows

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)
HALF16 = 2.0**-11  # float16 storage: half an ulp, relative (2⁻²⁵ absolute below float16's normal range)
# float32's rounding of an image tower, a folded projection and a head, for unit features encoded on other batches:
# a few eps32 of the unit vector (1.2e-7 measured for the test towers, ~2⁻²³); allowed 2⁻¹⁶, absolute
FRESH32 = 2.0**-16

# A training's rounding may be amplified along its trajectory: the bound for two float64 trainings allows 1000 times
# the rounding of its steps. This training amplifies float32's far less: its official-loop check drifts ~3 eps32 of
# the weights' movement in 66 steps, and float64 ~3 eps64.
AMPLIFICATION = 1000


def float64_rows(rows: TrainRows) -> TrainRows:
    """The same training rows, as float64: `fit_adapters` then trains in float64."""
    return dataclasses.replace(rows, features=rows.features.double())


def training_bound(steps: int, terms: int) -> float:
    """Relative bound for two float64 trainings that run the same arithmetic in another order (another matmul
    blocking, reduction order or fused multiply-add, as another CPU or batching gives): each step rounds its update
    by at most `terms`·eps64 relative (`terms`: the longest sum in the step, d + C for an adapter), S steps add up to
    S·terms·eps64 of how far training moved, and the trajectory may amplify that (AMPLIFICATION)."""
    return AMPLIFICATION * max(steps, 1) * terms * EPS64


def assert_trained_alike(ours: torch.Tensor, ref: torch.Tensor, start: torch.Tensor, steps: int, terms: int) -> None:
    """`ours` and `ref` (float64 trainings from `start`) agree within `training_bound` of how far `ref` moved."""
    assert ours.dtype == ref.dtype == torch.float64
    moved = float((ref - start.to(ref.dtype)).abs().max())
    gap = float((ours - ref).abs().max())
    assert moved > 0 and gap <= training_bound(steps, terms) * moved, (gap, moved)


def top1_range(scores: torch.Tensor, labels: torch.Tensor, slack: torch.Tensor) -> tuple[float, float]:
    """The top-1 (percent) that logits within `slack` (per logit) of `scores` can give: a row counts as right when
    its label's score beats every other by more than both slacks, as wrong when another beats it by more, and either
    way when the margin is within rounding (a near-tie may go either way on another CPU)."""
    own = scores.gather(1, labels[:, None])
    own_slack = slack.gather(1, labels[:, None])
    others = scores.scatter(1, labels[:, None], -torch.inf)
    right = ((own - own_slack) > (others + slack)).all(dim=1)
    wrong = ((others - slack) > (own + own_slack)).any(dim=1)
    return 100 * float(right.double().mean()), 100 * float(1 - wrong.double().mean())


def decided(scores: torch.Tensor, slack: torch.Tensor) -> torch.Tensor:
    """Rows whose argmax no logit moved by up to `slack` (per logit) can change: the top score beats every other by
    more than both slacks."""
    top = scores.argmax(dim=1, keepdim=True)
    others = scores.scatter(1, top, -torch.inf)
    return ((scores.gather(1, top) - slack.gather(1, top)) > (others + slack)).all(dim=1)


def feature_slack(
    logits_of: Callable[[torch.Tensor], torch.Tensor], features: torch.Tensor, relative: float, absolute: float
) -> torch.Tensor:
    """How far each logit can move when every feature coordinate moves by up to `relative` of its size plus
    `absolute`: the first-order bound Σᵢ |∂zᶜ/∂fᵢ| · (relative · |fᵢ| + absolute), doubled for the rest (with moves
    under 2⁻¹⁰ of unit features, the second-order term of a head that normalises f, or takes exp(β f·k) with β ≤ 10,
    is under 1% of the first).

    `logits_of` maps N×d float64 features to N×C logits, each row depending on its own feature alone."""
    f = features.double().detach().requires_grad_()
    logits = logits_of(f)
    rows = []
    for c in range(logits.shape[1]):
        (grad,) = torch.autograd.grad(logits[:, c].sum(), f, retain_graph=True)
        rows.append((grad.abs() * (relative * f.detach().abs() + absolute)).sum(dim=1))
    return 2 * torch.stack(rows, dim=1)
