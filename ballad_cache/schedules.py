"""Learning-rate schedules shared by phase A and phase B."""

from __future__ import annotations

import math
from collections.abc import Callable

from .errors import BalladError, setting
from .registry import Registry


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine annealing per step: `base` at step 0, approaching 0 (never reaching it) at the last step."""
    return 0.5 * base * (1.0 + math.cos(math.pi * step / max(total, 1)))


def epoch_lr(base: float, epoch: int, epochs: int) -> float:
    """The official schedule (BALLAD `train.py`: `CosineAnnealingLR(T_max=num_epochs, eta_min=0)` whose `step()` is
    called at the start of every epoch): 0-based epoch `e` runs at `0.5 * base * (1 + cos(pi * (e + 1) / epochs))`,
    so the first epoch is already below `base` and the last one runs at 0."""
    return 0.5 * base * (1.0 + math.cos(math.pi * (epoch + 1) / max(epochs, 1)))


def epoch_end_lr(base: float, epoch: int, epochs: int) -> float:
    """LIFT's schedule (shijxcs/LIFT `trainer.py` line 281: `CosineAnnealingLR(optim, num_epochs)`, stepped at each
    epoch's end, line 526): 0-based epoch `e` runs at `0.5 * base * (1 + cos(pi * e / epochs))`, the first at `base`."""
    return 0.5 * base * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


def batches_per_epoch(images: int, batch_size: int, keep_last_batch: bool, epochs: int = 1) -> int:
    """Batches in one epoch: floor(N/B) full batches (the official `epoch_steps`), or ceil(N/B) keeping the last.

    Raises:
        BalladError: fewer images than one batch under the official floor(N/B) (no step would run).
    """
    if keep_last_batch:
        return -(-images // batch_size)
    if images and images < batch_size and epochs:
        raise BalladError(
            f"batch size {batch_size} exceeds the {images} training images: the official epoch "
            f"(floor(N/B) full batches) has no step; lower {setting('batch_size')} or pass "
            f"{setting('keep_last_batch', True)}"
        )
    return images // batch_size


Schedule = Callable[[float, int, int, int, int], float]  # (base lr, step, total steps, epoch, epochs) -> lr

SCHEDULES: Registry[Schedule] = Registry("schedule")
SCHEDULES.register(
    "epoch",
    lambda base, step, total, epoch, epochs: epoch_lr(base, epoch, epochs),
    help="CosineAnnealingLR(T_max=epochs) stepped at each epoch start, the last epoch at lr 0 (official)",
)
SCHEDULES.register(
    "epoch-end",
    lambda base, step, total, epoch, epochs: epoch_end_lr(base, epoch, epochs),
    help="CosineAnnealingLR(T_max=epochs) stepped at each epoch end, the first epoch at the full lr (LIFT)",
)
SCHEDULES.register(
    "step", lambda base, step, total, epoch, epochs: cosine_lr(base, step, total), help="a cosine over the steps"
)
