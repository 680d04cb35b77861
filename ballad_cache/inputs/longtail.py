"""Long-tailed class profiles and BALLAD's many/medium/few shot groups."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


def exponential_profile(num_classes: int, n_max: int, imbalance: float) -> list[int]:
    """Per-class training counts `n_i = floor(n_max * (1/IF)^(i/(C-1)))`, head class first.

    This is the profile of Cui et al. and LDAM-DRW used for CIFAR-LT and the embedded Fashion-MNIST-LT.

    Args:
        num_classes: C.
        n_max: images of the head class.
        imbalance: IF, the ratio of the largest to the smallest class.
    """
    if num_classes < 1 or n_max < 1 or imbalance < 1:
        raise ValueError("num_classes and n_max must be >= 1 and imbalance >= 1")
    if num_classes == 1:
        return [n_max]
    return [int(math.floor(n_max * (1.0 / imbalance) ** (i / (num_classes - 1)))) for i in range(num_classes)]


@dataclass(frozen=True)
class ShotThresholds:
    """BALLAD's (and OLTR's) split of classes by training count: many > `many`, few < `few`, medium otherwise."""

    many: int = 100  # strictly more training images than this: a many-shot class
    few: int = 20  # strictly fewer than this: a few-shot class

    def to_dict(self) -> dict[str, int]:
        """As a plain dict for result files."""
        return asdict(self)


def shot_groups(class_counts: Sequence[int] | np.ndarray, thresholds: ShotThresholds | None = None) -> np.ndarray:
    """Group id per class: 0 many, 1 medium, 2 few.

    Args:
        class_counts: training images per class.
        thresholds: group boundaries; BALLAD's defaults when None.
    """
    t = thresholds or ShotThresholds()
    counts = np.asarray(class_counts)
    groups = np.ones(len(counts), dtype=np.int64)
    groups[counts > t.many] = 0
    groups[counts < t.few] = 2
    return groups


GROUP_NAMES = ("many", "medium", "few")


def group_sizes(class_counts: Sequence[int] | np.ndarray, thresholds: ShotThresholds | None = None) -> dict[str, int]:
    """Number of classes in each shot group, e.g. `{"many": 35, "medium": 35, "few": 30}`."""
    groups = shot_groups(class_counts, thresholds)
    return {name: int((groups == g).sum()) for g, name in enumerate(GROUP_NAMES)}


def unseen_classes(labels: np.ndarray, classnames: list[str]) -> str | None:
    """A warning for the classes a split (val) has no image of, which a ranking on it cannot see; None when every
    class has one."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classnames))
    missing = [classnames[c] for c in np.flatnonzero(counts == 0)]
    if not missing:
        return None
    shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
    return f"warning: {len(missing)} class(es) have no val image ({shown}): the val ranking cannot see them"


def imbalance_factor(class_counts: Sequence[int] | np.ndarray) -> float:
    """Largest over smallest non-empty class count."""
    counts = np.asarray(class_counts)
    nonzero = counts[counts > 0]
    return float(nonzero.max() / nonzero.min()) if len(nonzero) else float("nan")


def class_log_prior(class_counts: Sequence[int] | np.ndarray) -> torch.Tensor:
    """log of the training class frequencies (float32); a class with no image counts as one, so its log is finite.

    Logit adjustment (Menon et al.) adds or subtracts `tau` times this; evaluation, training and export share it.
    """
    counts = np.maximum(np.asarray(class_counts, dtype=np.float64), 1.0)
    import torch

    return torch.from_numpy(np.log(counts / counts.sum())).float()
