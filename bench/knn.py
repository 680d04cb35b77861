"""The kNN head's two backends over ImageNet-LT-shaped cached features, measured in one run: faiss (a GPU index
when faiss has one) and a blocked torch matmul + topk (on CUDA when there is one); both must find the same labels.

    python bench/knn.py [--scale 0.05] [--queries 2000] [--device auto]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ballad_cache.heads.knn import auto_backend, faiss_has_gpu, knn_scores  # noqa: E402
from bench.common import imagenet_lt_shaped, timed, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=0.05)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--device", default="auto", help="unused: the backends pick their device (kept for run_all)")
    p.add_argument("--label", default="knn")
    a = p.parse_args()
    rows, text = imagenet_lt_shaped(a.scale)
    train, labels = rows.features, torch.as_tensor(rows.image_labels)
    gen = torch.Generator().manual_seed(1)
    queries = F.normalize(torch.randn(a.queries, train.shape[1], generator=gen), dim=-1)
    classes = text.shape[0]
    result = {}
    knn_scores(train, labels, queries[:64], classes, a.k, backend="faiss")  # warm-up: thread pool start
    t_faiss = timed(
        lambda: result.__setitem__("faiss", knn_scores(train, labels, queries, classes, a.k, backend="faiss"))
    )
    knn_scores(train, labels, queries[:64], classes, a.k, backend="torch")  # warm-up
    t_torch = timed(
        lambda: result.__setitem__("torch", knn_scores(train, labels, queries, classes, a.k, backend="torch"))
    )
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
            "auto_backend": auto_backend(),
            "same_prediction": round(agree, 4),
        },
    )


if __name__ == "__main__":
    main()
