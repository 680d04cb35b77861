"""A kNN head over cached training features with faiss (a GPU index when faiss was built with GPU support)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch


def faiss_has_gpu() -> bool:
    """True when the installed faiss can build GPU indexes and sees a GPU."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def auto_backend() -> str:
    """faiss when it has a GPU or there is no CUDA; else torch on CUDA (a CPU-only faiss on a GPU machine is
    ~100x slower than the GPU matmul)."""
    return "faiss" if faiss_has_gpu() or not torch.cuda.is_available() else "torch"


def knn_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    queries: torch.Tensor,
    num_classes: int,
    k: int = 10,
    temperature: float = 0.07,
    backend: str = "auto",
) -> torch.Tensor:
    """Class scores N×C from the k most cosine-similar training rows, votes weighted by exp(sim / temperature).

    Args:
        train_features: L2-normalised training features (the index).
        train_labels: their labels.
        queries: L2-normalised query features.
        num_classes: C.
        k: neighbours per query.
        temperature: vote sharpness (the InstDisc / DINO kNN weighting).
        backend: `faiss` (exact inner-product index, on GPU when faiss has GPU support), `torch` (blocked
            matmul + topk on CUDA), or `auto` (see `auto_backend`).
    """
    if backend == "auto":
        backend = auto_backend()
    k = min(k, len(train_features))
    if backend == "torch":
        sims, nbrs = _torch_search(train_features, queries, k)
    elif backend == "faiss":
        sims, nbrs = _faiss_search(train_features, queries, k)
    else:
        raise ValueError(f"unknown kNN backend '{backend}'; use auto, faiss or torch")
    votes = torch.exp(sims.double() / temperature)
    scores = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    scores.scatter_add_(1, train_labels[nbrs], votes)
    return scores.float()


def _faiss_search(train: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    import faiss

    xb = np.ascontiguousarray(train.float().numpy())
    xq = np.ascontiguousarray(queries.float().numpy())
    index: Any = faiss.IndexFlatIP(xb.shape[1])
    if faiss_has_gpu():
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    index.add(xb)
    sims, nbrs = index.search(xq, k)
    return torch.from_numpy(sims), torch.from_numpy(nbrs)


def _torch_search(
    train: torch.Tensor, queries: torch.Tensor, k: int, block: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    xb = train.to(device, torch.float32)
    sims, nbrs = [], []
    for q in queries.split(block):
        s, i = (q.to(device, torch.float32) @ xb.T).topk(k, dim=1)
        sims.append(s.cpu())
        nbrs.append(i.cpu())
    return torch.cat(sims), torch.cat(nbrs)
