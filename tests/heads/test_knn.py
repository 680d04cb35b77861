"""kNN scores (ballad_cache.heads.knn) against a brute-force vote computed here."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ballad_cache.heads.knn import knn_scores


def test_knn_scores_equal_a_brute_force_weighted_vote():
    gen = torch.Generator().manual_seed(0)
    train = F.normalize(torch.randn(200, 16, generator=gen), dim=1)
    labels = torch.randint(0, 4, (200,), generator=gen)
    queries = F.normalize(torch.randn(30, 16, generator=gen), dim=1)
    sims = queries @ train.T
    top = sims.topk(5, dim=1)
    expected = torch.zeros(30, 4)
    expected.scatter_add_(1, labels[top.indices], torch.exp(top.values / 0.07))
    for backend in ("faiss", "torch"):
        got = knn_scores(train, labels, queries, 4, k=5, temperature=0.07, backend=backend)
        assert torch.equal(got.argmax(1), expected.argmax(1)), backend
        torch.testing.assert_close(got / got.sum(1, keepdim=True), expected / expected.sum(1, keepdim=True))
