"""Evaluation on a cache (ballad_cache.pipelines.evaluate) against logits computed here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ballad_cache.pipelines.evaluate import EvalConfig, evaluate_cache

EPS32 = float(np.finfo(np.float32).eps)


def top1_range(scores: torch.Tensor, labels: torch.Tensor, slack: torch.Tensor) -> tuple[float, float]:
    """The top-1 (percent) that float32 logits within `slack` of the float64 `scores` can give: a row counts as right
    when its label's score beats every other by more than both slacks, as wrong when another beats it by more, and
    either way when the margin is within rounding (a near-tie may go either way on another CPU)."""
    own = scores.gather(1, labels[:, None])
    own_slack = slack.gather(1, labels[:, None])
    others = scores.scatter(1, labels[:, None], -torch.inf)
    right = ((own - own_slack) > (others + slack)).all(dim=1)
    wrong = ((others - slack) > (own + own_slack)).any(dim=1)
    return 100 * float(right.double().mean()), 100 * float(1 - wrong.double().mean())


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
