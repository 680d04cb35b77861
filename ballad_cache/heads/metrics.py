"""Long-tailed classification metrics: top-k, many/medium/few, per-class accuracy."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from ..inputs.longtail import GROUP_NAMES, ShotThresholds, shot_groups

if TYPE_CHECKING:
    import torch


def per_class_accuracy(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Accuracy of each class (NaN for a class with no test image)."""
    correct = np.bincount(labels, weights=(pred == labels).astype(np.float64), minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return correct / total


def per_image(scores: torch.Tensor, num_images: int) -> torch.Tensor:
    """Scores (logits, votes) of `num_images` images, averaged over each image's views: an eval split scored with
    V test-time crops has V·N rows, view-major (`store.cache.SplitFeatures`), and an image's score is the mean of
    its crops' (shijxcs/LIFT `trainer.py` lines 571-580); N rows come back as they are.

    Raises:
        ValueError: a row count that is no multiple of `num_images`.
    """
    if scores.shape[0] == num_images:
        return scores
    if num_images == 0 or scores.shape[0] % num_images:
        raise ValueError(f"{scores.shape[0]} score rows are no whole number of views of {num_images} images")
    return scores.reshape(scores.shape[0] // num_images, num_images, *scores.shape[1:]).mean(dim=0)


def classification_report(
    logits: torch.Tensor, labels: torch.Tensor, train_counts: np.ndarray, thresholds: ShotThresholds | None = None
) -> dict[str, Any]:
    """Top-1/top-5, many/medium/few and per-class accuracy (percent) of `logits` (N×C, or V·N×C for V views of
    each image, averaged by `per_image`) against `labels`.

    Many/medium/few are the mean of the per-class accuracies of the group's classes that have test images, as
    OLTR's `shot_acc` (`utils.py`, used by BALLAD's `train.py`) computes them; on an imbalanced test set this
    differs from the accuracy over the group's images. NaN for a group with no tested class.
    """
    thresholds = thresholds or ShotThresholds()
    logits = per_image(logits, len(labels))
    num_classes = logits.shape[1]
    labels_np = labels.cpu().numpy()
    k = min(5, num_classes)
    topk = logits.topk(k, dim=1).indices.cpu().numpy()
    pred = topk[:, 0]
    correct = pred == labels_np
    class_acc = per_class_accuracy(pred, labels_np, num_classes)
    report: dict[str, Any] = {
        "top1": 100.0 * float(correct.mean()) if len(correct) else float("nan"),
        "top5": 100.0 * float((topk == labels_np[:, None]).any(axis=1).mean()) if len(correct) else float("nan"),
    }
    report.update({name: 100.0 * acc for name, acc in group_means(class_acc, train_counts, thresholds).items()})
    report["per_class"] = (100.0 * class_acc).tolist()
    report["num_images"] = len(labels_np)
    return report


def group_means(
    class_acc: np.ndarray, train_counts: np.ndarray, thresholds: ShotThresholds | None = None
) -> dict[str, float]:
    """Many/medium/few: the mean accuracy of each group's classes that were tested (`class_acc` is NaN for a class
    with no image), as OLTR's `shot_acc`; NaN for a group with no tested class."""
    groups = shot_groups(train_counts, thresholds or ShotThresholds())
    tested = ~np.isnan(class_acc)
    means = {}
    for g, name in enumerate(GROUP_NAMES):
        mask = (groups == g) & tested
        means[name] = float(class_acc[mask].mean()) if mask.any() else float("nan")
    return means


METRICS = ("top1", "top5", "many", "medium", "few")


def summary(report: dict[str, Any]) -> dict[str, float]:
    """The headline numbers of a report (no per-class list)."""
    return {k: report[k] for k in METRICS}
