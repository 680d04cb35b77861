"""16 sweep points (4 ratios x 4 learning rates) trained batched vs as 16 separate fits, in one run.

python bench/sweep.py [--scale 0.05] [--epochs 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ballad_cache.heads.adapter import fit_adapters  # noqa: E402
from ballad_cache.heads.config import AdapterConfig  # noqa: E402
from ballad_cache.pipelines.phase_b import expand_grid  # noqa: E402
from bench.common import imagenet_lt_shaped, timed, write  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=0.05, help="fraction of ImageNet-LT's rows per class")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default="sweep", help="name of the JSON written to bench/out/")
    a = p.parse_args()
    rows, text = imagenet_lt_shaped(a.scale)
    grid = expand_grid(AdapterConfig(epochs=a.epochs), ratio=[0.1, 0.2, 0.4, 0.6], lr=[0.05, 0.1, 0.2, 0.4])
    batched = timed(lambda: fit_adapters(rows, text, grid, device=a.device), sync=True)
    separate = timed(lambda: [fit_adapters(rows, text, [c], device=a.device) for c in grid], sync=True)
    write(
        a.label,
        {
            "points": len(grid),
            "rows": len(rows.image_labels),
            "epochs": a.epochs,
            "batched_s": round(batched, 2),
            "separate_s": round(separate, 2),
            "speedup": round(separate / batched, 2),
            "target": ">= 3",
        },
    )


if __name__ == "__main__":
    main()
