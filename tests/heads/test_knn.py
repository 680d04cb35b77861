"""kNN scores (ballad_cache.heads.knn) against a brute-force vote computed here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ballad_cache.heads.knn import knn_scores
from tests.rounding import EPS32


def test_knn_scores_equal_a_brute_force_weighted_vote():
    gen = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(200, 16, generator=gen), dim=1)
    labels = torch.randint(0, 4, (200,), generator=gen)
    queries = F.normalize(torch.randn(30, 16, generator=gen), dim=1)
    sims = queries.double() @ train.double().T  # the vote in float64 from the same float32 rows
    top = sims.topk(6, dim=1)
    expected = torch.zeros(30, 4, dtype=torch.float64)
    expected.scatter_add_(1, labels[top.indices[:, :5]], torch.exp(top.values[:, :5] / 0.07))
    # a float32 similarity is off by at most d·eps/2 · Σ|xᵢyᵢ|: the same 5 neighbours where the 5th beats the 6th by
    # more than both their rounding; each vote exp(s / 0.07) then by that / 0.07 relative, the float32 scores by
    # one more rounding
    sim_slack = 16 * EPS32 * (queries.double().abs() @ train.double().abs().T)
    cut = sim_slack.gather(1, top.indices[:, 4:6]).sum(dim=1)
    assert (top.values[:, 4] - top.values[:, 5] > cut).all()
    rtol = float(sim_slack.gather(1, top.indices[:, :5]).max()) / 0.07 + 2 * EPS32
    for backend in ("faiss", "torch"):
        got = knn_scores(train, labels, queries, 4, k=5, temperature=0.07, backend=backend)
        assert torch.equal(got.argmax(1), expected.argmax(1)), backend
        torch.testing.assert_close(got.double(), expected, rtol=rtol, atol=0.0)
