"""Evaluation on a cache (ballad_cache.pipelines.evaluate) against logits computed here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ballad_cache.pipelines.evaluate import EvalConfig, evaluate_cache


def test_zero_shot_and_logit_adjustment_match_a_recomputation(lt_cache):
    result = evaluate_cache(lt_cache, None, EvalConfig(split="test", tau=1.0))
    test = lt_cache.load_split("test").eval_view()
    text = lt_cache.text_embeddings()
    logits = 100 * F.normalize(test.features.float(), dim=-1) @ text.T
    counts = lt_cache.train_counts
    prior = np.log(counts / counts.sum())
    adjusted = logits - torch.as_tensor(prior, dtype=logits.dtype)
    for name, scores in (("zero-shot", logits), ("zero-shot+LA", adjusted)):
        top1 = 100 * float((scores.argmax(1) == test.labels).float().mean())
        assert result["heads"][name]["top1"] == pytest.approx(top1, abs=1e-4), name


def test_eval_config_refuses_nan_and_bad_groups():
    with pytest.raises(ValueError, match="tau"):
        EvalConfig(tau=float("nan"))
    with pytest.raises(ValueError, match="few"):
        EvalConfig(many=10, few=20)
