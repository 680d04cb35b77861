"""The kNN head: faiss (GPU index when faiss has one) against exact top-k by a plain torch matmul on the same
device, over ImageNet-LT-shaped cached features, measured in one run; also checks both find the same labels.

    python bench/knn.py [--scale 0.05] [--queries 2000] [--device auto]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ballad_cache.knn import faiss_has_gpu, knn_scores  # noqa: E402
from ballad_cache.models import resolve_device  # noqa: E402
from bench.common import imagenet_lt_shaped, timed, write  # noqa: E402


def torch_knn(train: torch.Tensor, labels: torch.Tensor, queries: torch.Tensor, classes: int, k: int) -> torch.Tensor:
    """Exact kNN votes (exp(sim / 0.07)) by a blocked matmul and topk."""
    out = []
    for q in queries.split(4096):
        sims, nbrs = (q @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(q), classes, device=q.device)
        votes.scatter_add_(1, labels[nbrs], torch.exp(sims / 0.07))
        out.append(votes)
    return torch.cat(out)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=0.05)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", default="auto")
    p.add_argument("--label", default="knn")
    a = p.parse_args()
    device = resolve_device(a.device)
    rows, text = imagenet_lt_shaped(a.scale)
    train, labels = rows.features, torch.as_tensor(rows.image_labels)
    gen = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(a.queries, train.shape[1], generator=gen), dim=-1)
    classes = text.shape[0]
    result = {}
    t_faiss = timed(lambda: result.__setitem__("faiss", knn_scores(train, labels, queries, classes, a.k)), sync=True)
    tr, lb, qs = train.to(device), labels.to(device), queries.to(device)
    torch_knn(tr, lb, qs[:64], classes, a.k)  # warm-up
    t_torch = timed(lambda: result.__setitem__("torch", torch_knn(tr, lb, qs, classes, a.k).cpu()), sync=True)
    agree = (result["faiss"].argmax(1) == result["torch"].argmax(1)).float().mean().item()
    write(
        a.label,
        {
            "rows": len(train),
            "queries": a.queries,
            "faiss_gpu": faiss_has_gpu(),
            "seconds": {"faiss": round(t_faiss, 3), "torch_matmul_topk": round(t_torch, 3)},
            "queries_per_s": {"faiss": round(a.queries / t_faiss), "torch_matmul_topk": round(a.queries / t_torch)},
            "faiss_vs_torch": round(t_torch / t_faiss, 2),
            "same_prediction": round(agree, 4),
        },
    )


if __name__ == "__main__":
    main()
