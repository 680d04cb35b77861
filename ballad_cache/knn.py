"""A kNN head over cached training features with faiss (a GPU index when faiss was built with GPU support)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def faiss_has_gpu() -> bool:
    """True when the installed faiss can build GPU indexes and sees a GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 10,
    temperature: float = 0.07,
) -> torch.Tensor:
    """Class scores N×C from the k most cosine-similar training rows, votes weighted by exp(sim / temperature).

    Args:
        train_features: L2-normalised training features (the index).
        train_labels: their labels.
        queries: L2-normalised query features.
        num_classes: C.
        k: neighbours per query.
        temperature: vote sharpness (the InstDisc / DINO kNN weighting).
    """
    import faiss

    xb = np.ascontiguousarray(train_features.float().numpy())
    xq = np.ascontiguousarray(queries.float().numpy())
    index: Any = faiss.IndexFlatIP(xb.shape[1])
    if faiss_has_gpu():
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(xb)
    sims, nbrs = index.search(xq, min(k, len(xb)))
    votes = torch.from_numpy(np.exp(sims / temperature))
    scores = torch.zeros(len(xq), num_classes, dtype=torch.float64)
    scores.scatter_add_(1, train_labels[torch.from_numpy(nbrs)], votes.double())
    return scores.float()
