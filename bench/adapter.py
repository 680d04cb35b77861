"""fit-adapter on an ImageNet-LT-shaped cache (1000 classes, counts 1280 ... 5, dim 1024): wall time, peak
memory, and achieved FLOP/s as a fraction of a plain torch.mm's, measured in one run. FLOPs on both sides are
counted by `torch.utils.flop_counter.FlopCounterMode` (one adapter step, forward and backward; the B×d by d×d mm).

    python bench/adapter.py [--scale 1.0] [--epochs 10] [--device cuda]
"""

from __future__ import annotations

import argparse
import resource
import sys
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ballad_cache.heads.adapter import adapter_step, fit_adapters  # noqa: E402
from ballad_cache.heads.batches import TrainRows  # noqa: E402
from ballad_cache.heads.config import AdapterConfig  # noqa: E402
from bench.common import imagenet_lt_shaped, timed, write  # noqa: E402


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of `fn` as torch's FlopCounterMode counts them (matmuls and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def step_flops(rows: TrainRows, text: torch.Tensor, cfg: AdapterConfig, device: str) -> int:
    """FLOPs of one adapter step (forward and backward) at the fit's batch size, counted by FlopCounterMode."""
    dim = text.shape[1]
    x = rows.features[: cfg.batch_size].float().to(device)
    y = torch.zeros(len(x), dtype=torch.int64, device=device)
    w = torch.zeros(1, dim, dim, device=device)
    t = text.to(device)
    scalars = [torch.full((1, 1, 1), v, device=device) for v in (cfg.ratio, cfg.weight_decay, cfg.momentum, cfg.lr)]
    ratio, wd, mom, lr = scalars
    return count_flops(lambda: adapter_step(x, y, w, ratio, t, wd, mom, lr, torch.zeros_like(w), 0))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default="adapter", help="name of the JSON written to bench/out/")
    p.add_argument(
        "--bf16-scale", type=float, default=0.0, help="also time --precision bf16 against fp32 at this scale"
    )
    a = p.parse_args()
    rows, text = imagenet_lt_shaped(a.scale)
    n, d, b = len(rows.image_labels), 1024, 512
    cfg = AdapterConfig(epochs=a.epochs, select="last")  # no val split in this synthetic cache
    if a.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    wall = timed(lambda: fit_adapters(rows, text, [cfg], device=a.device), sync=True)
    steps = a.epochs * (n // b)  # official epochs: floor(N/B) full batches
    flops = steps * step_flops(rows, text, cfg, a.device)
    x = torch.randn(b, d, device=a.device)
    w = torch.randn(d, d, device=a.device)
    reps = 20

    def mms() -> list[torch.Tensor]:
        return [x @ w for _ in range(reps)]

    mm_flops = count_flops(mms) / timed(mms, sync=True)
    peak = (
        torch.cuda.max_memory_allocated()
        if a.device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    bf16: dict[str, float] = {}
    if a.bf16_scale:  # bf16 against fp32 on the same rows, one epoch each
        small_rows, small_text = imagenet_lt_shaped(a.bf16_scale)
        one = AdapterConfig(epochs=1, select="last")
        t32 = timed(lambda: fit_adapters(small_rows, small_text, [one], device=a.device), sync=True)
        one16 = AdapterConfig(epochs=1, select="last", precision="bf16")
        t16 = timed(lambda: fit_adapters(small_rows, small_text, [one16], device=a.device), sync=True)
        bf16 = {"rows": len(small_rows.image_labels), "fp32_s": round(t32, 2), "bf16_s": round(t16, 2)}
        bf16["speedup"] = round(t32 / t16, 3)
        bf16["cpu_capability"] = torch.backends.cpu.get_cpu_capability() if a.device == "cpu" else a.device
    write(
        a.label,
        {
            "bf16_vs_fp32": bf16,
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
