"""Evaluation on a cache (ballad_cache.pipelines.evaluate) against logits computed here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ballad_cache.pipelines.evaluate import EvalConfig, evaluate_cache
from tests.rounding import EPS32, top1_range


def test_zero_shot_and_logit_adjustment_match_a_recomputation(lt_cache):
    """Catches zero-shot logits that are not 100 · norm(f) · textᵀ, or logit adjustment with another prior or sign.

    The reference is computed in float64. `evaluate` works in float32: each logit 100 · Σ_d x̂_d t_d carries the
    normalisation's rounding ((D + 2)·eps relative per coordinate) and the dot product's (D·eps·Σ|x̂_d t_d|), both
    normalisations of the text included, and the adjusted logit one more rounding of the subtraction and of the float32
    prior, so a row is only decided where its margin exceeds that bound."""
    result = evaluate_cache(lt_cache, None, EvalConfig(split="test", tau=1.0))
    test = lt_cache.load_split("test").eval_view()
    text = lt_cache.text_embeddings().double()
    features = F.normalize(test.features.double(), dim=-1)
    dim = features.shape[1]
    logits = 100 * features @ F.normalize(text, dim=-1).T
    slack = 100 * (3 * dim + 6) * EPS32 * (features.abs() @ text.abs().T)
    counts = lt_cache.train_counts
    prior = torch.as_tensor(np.log(counts / counts.sum()), dtype=torch.float64)
    adjusted = logits - prior
    adjusted_slack = slack + 2 * EPS32 * (logits.abs() + prior.abs())
    for name, scores, bound in (("zero-shot", logits, slack), ("zero-shot+LA", adjusted, adjusted_slack)):
        low, high = top1_range(scores, test.labels.long(), bound)
        assert low <= result["heads"][name]["top1"] <= high, (name, low, high)
        assert high - low < 100 / len(test.labels)  # decisive: a top-1 off by one image is caught


def test_eval_config_refuses_nan_and_bad_groups():
    with pytest.raises(ValueError, match="tau"):
        EvalConfig(tau=float("nan"))
    with pytest.raises(ValueError, match="few"):
        EvalConfig(many=10, few=20)
