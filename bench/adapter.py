"""fit-adapter on an ImageNet-LT-shaped cache (1000 classes, counts 1280 ... 5, dim 1024): wall time, peak
memory, and achieved FLOP/s as a fraction of a plain torch.mm of the same shapes, measured in one run.

    python bench/adapter.py [--scale 1.0] [--epochs 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ballad_cache.adapter import AdapterConfig, fit_adapters  # noqa: E402
from bench.common import imagenet_lt_shaped, timed, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default="adapter", help="name of the JSON written to bench/out/")
    a = p.parse_args()
    rows, text = imagenet_lt_shaped(a.scale)
    n, d, c, b = len(rows.image_labels), 1024, 1000, 512
    cfg = AdapterConfig(epochs=a.epochs)
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    wall = timed(lambda: fit_adapters(rows, text, [cfg], device=a.device), sync=True)
    steps = a.epochs * -(-n // b)
    # forward W (B·d·d) and logits (B·d·C); backward for W needs dW and dX of the logits: 3 GEMM-equivalents
    flops = steps * 2 * b * d * (d * 2 + c * 2 + c)
    x = torch.randn(b, d, device=a.device)
    w = torch.randn(d, d, device=a.device)
    t = torch.randn(d, c, device=a.device)
    reps = 20
    mm = timed(lambda: [(x @ w, x @ t, x.T @ x, x @ w.T, x @ t) for _ in range(reps)], sync=True)
    mm_flops = reps * 2 * b * d * (d * 2 + c * 2 + c) / mm
    peak = (
        torch.cuda.max_memory_allocated()
        if a.device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    write(
        a.label,
        {
            "rows": n,
            "epochs": a.epochs,
            "wall_s": round(wall, 2),
            "peak_mem_mib": round(peak / 2**20),
            "achieved_gflops": round(flops / wall / 1e9, 1),
            "mm_gflops": round(mm_flops / 1e9, 1),
            "fraction_of_mm": round(flops / wall / mm_flops, 2),
            "target": ">= 0.5",
        },
    )


if __name__ == "__main__":
    main()
