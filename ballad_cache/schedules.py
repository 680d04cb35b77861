"""Learning-rate schedules shared by phase A and phase B."""

from __future__ import annotations

import math


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine annealing per step: `base` at step 0, approaching 0 (never reaching it) at the last step."""
    return 0.5 * base * (1.0 + math.cos(math.pi * step / max(total, 1)))


def epoch_lr(base: float, epoch: int, epochs: int) -> float:
    """The official schedule (BALLAD `train.py`: `CosineAnnealingLR(T_max=num_epochs, eta_min=0)` whose `step()` is
    called at the start of every epoch): 0-based epoch `e` runs at `0.5 * base * (1 + cos(pi * (e + 1) / epochs))`,
    so the first epoch is already below `base` and the last one runs at 0."""
    return 0.5 * base * (1.0 + math.cos(math.pi * (epoch + 1) / max(epochs, 1)))
