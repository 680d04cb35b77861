"""classification_report (ballad_cache.heads.metrics) against shot accuracies computed here."""

from __future__ import annotations

import numpy as np
import torch

from ballad_cache.heads.metrics import METRICS, classification_report, summary


def test_groups_are_means_of_per_class_accuracy_and_top5_counts_any_hit():
    """Catches shot groups scored over images instead of as the mean of per-class accuracies (OLTR `utils.py`
    `shot_acc`), thresholds other than many > 100 and few < 20, and a top-5 that needs the label first."""
    counts = np.array([500, 150, 50, 30, 5, 2])  # many: 0, 1; medium: 2, 3; few: 4, 5
    labels = torch.tensor([0, 0, 0, 0, 1, 2, 2, 3, 4, 5, 5])
    pred = torch.tensor([0, 0, 0, 1, 1, 2, 0, 3, 0, 5, 0])
    logits = torch.nn.functional.one_hot(pred, 6).float()
    logits[:, 5] += 0.5 * (pred != 5)  # class 5 ranks second where it is not first
    r = classification_report(logits, labels, counts)
    acc = [3 / 4, 1.0, 1 / 2, 1.0, 0.0, 1 / 2]
    assert r["top1"] == 100 * 7 / 11
    assert r["many"] == 100 * np.mean(acc[:2]) and r["medium"] == 100 * np.mean(acc[2:4])
    assert r["few"] == 100 * np.mean(acc[4:])
    assert np.allclose(r["per_class"], 100 * np.array(acc))  # ratios of counts: float32's 2⁻²⁴ is far below 1e-5
    assert list(summary(r)) == list(METRICS)
