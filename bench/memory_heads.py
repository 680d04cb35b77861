"""Memory heads at ImageNet-LT's shape: the training-free search and each head's fit, against BALLAD's phase B on
the same synthetic cache, measured in one run; each phase in its own process so its peak memory is its own.

    python bench/memory_heads.py                       # 115,846 keys × 1024, 20,000 val rows, 1000 classes
    python bench/memory_heads.py --scale 0.1 --val 2000 --alphas 20 --betas 10

Prints seconds per phase, ratios to BALLAD's phase B (10 epochs, batch 512), the search's points per second and
each phase's peak resident memory (ru_maxrss of its process, the inputs included).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ballad_cache.heads.adapter import fit_adapters  # noqa: E402
from ballad_cache.heads.batches import TrainRows  # noqa: E402
from ballad_cache.heads.config import AdapterConfig  # noqa: E402
from ballad_cache.heads.metrics import classification_report, summary  # noqa: E402
from ballad_cache.heads.registry import HEADS, FitData, HeadContext  # noqa: E402
from ballad_cache.inputs.longtail import class_log_prior  # noqa: E402
from ballad_cache.pipelines.phase_b import expand_grid  # noqa: E402
from ballad_cache.store.cache import SplitFeatures  # noqa: E402
from bench.common import imagenet_lt_counts, machine, write  # noqa: E402

PHASES = ("ballad", "search", "tip", "tip-f", "gda", "ncm")


def synthetic(scale: float, val_rows: int, dim: int = 1024, classes: int = 1000):  # type: ignore[no-untyped-def]
    """Train (ImageNet-LT's counts × scale, one eval view each), val rows, text; features near their class's text."""
    gen = torch.Generator().manual_seed(0)
    counts = [max(1, int(c * scale)) for c in imagenet_lt_counts(classes)]
    text = F.normalize(torch.randn(classes, dim, generator=gen), dim=-1)
    labels = torch.as_tensor(np.repeat(np.arange(classes), counts))
    feats = F.normalize(text[labels] + 0.9 * torch.randn(len(labels), dim, generator=gen) / dim**0.5 * 8, dim=-1)
    train = SplitFeatures(feats, labels, torch.arange(len(labels)), torch.zeros(len(labels), dtype=torch.int64))
    val_labels = torch.arange(val_rows) % classes
    val = F.normalize(text[val_labels] + 0.9 * torch.randn(val_rows, dim, generator=gen) / dim**0.5 * 8, dim=-1)
    return train, val, val_labels, text, np.asarray(counts)


def phase(name: str, a: argparse.Namespace) -> dict[str, float]:
    """Run one phase; returns its seconds and what it produced."""
    train, val, val_labels, text, counts = synthetic(a.scale, a.val)
    log_prior = class_log_prior(counts)
    t = time.perf_counter()
    out: dict[str, float] = {}
    context = HeadContext(text, log_prior)
    if name == "ballad":
        fit_adapters(TrainRows.from_split(train), text, [AdapterConfig()], val=(val, val_labels))
    elif name == "search":
        alphas = np.geomspace(0.1, 20, a.alphas).tolist()
        betas = np.linspace(0.5, 12, a.betas).tolist()
        configs = expand_grid(AdapterConfig(head="tip"), alpha=alphas, beta=betas)
        queries = SplitFeatures(val, val_labels, torch.arange(len(val_labels)), torch.zeros(len(val_labels)))
        fitted = HEADS.get("tip").sweep(
            FitData(train, context, queries), configs, lambda lg: summary(classification_report(lg, val_labels, counts))
        )
        reports = [f.val for _, f in fitted]
        out["points"] = len(configs)
        out["best_val_top1"] = max(r["top1"] for r in reports)
    elif name == "tip-f":  # 16 keys a class: every step scores its batch against all keys, forward and backward
        config = AdapterConfig(head="tip-f", epochs=1, keys_per_class=16)
        queries = SplitFeatures(val, val_labels, torch.arange(len(val_labels)), torch.zeros(len(val_labels)))
        HEADS.get("tip-f").fit(FitData(train, context, queries), config)
    else:
        head = HEADS.get(name).fit(FitData(train, context), AdapterConfig(head=name)).head
        head.logits(val)  # a fit is of no use unscored: include one val pass
    out["seconds"] = time.perf_counter() - t
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--scale", type=float, default=1.0, help="ImageNet-LT's class counts times this")
    p.add_argument("--val", type=int, default=20_000)
    p.add_argument("--alphas", type=int, default=80)
    p.add_argument("--betas", type=int, default=50)
    p.add_argument("--phase", choices=PHASES, help="run one phase and print its JSON (used by the parent run)")
    p.add_argument("--only", default=",".join(PHASES))
    a = p.parse_args()
    if a.phase:
        print(json.dumps(phase(a.phase, a)))
        return
    base = [sys.executable, __file__, "--scale", str(a.scale), "--val", str(a.val)]
    base += ["--alphas", str(a.alphas), "--betas", str(a.betas)]
    results = {}
    for name in a.only.split(","):
        done = subprocess.run([*base, "--phase", name], capture_output=True, text=True, check=True)
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
        print(name, results[name], flush=True)
    _, _, _, _, counts = synthetic(a.scale, 1)
    ballad = results.get("ballad", {}).get("seconds")
    record = {
        "keys": int(counts.sum()),
        "val_rows": a.val,
        "phases": results,
        "ratio_to_ballad_phase_b": {k: v["seconds"] / ballad for k, v in results.items()} if ballad else {},
    }
    if "search" in results:
        record["search_points_per_s"] = results["search"]["points"] / results["search"]["seconds"]
    write("memory_heads", record)
    lines = [
        f"Written by `python bench/memory_heads.py` on {machine()}: a synthetic cache of ImageNet-LT's shape",
        f"({record['keys']:,} train rows × 1024, {a.val:,} val rows, 1000 classes); each phase in its own process.",
        "",
        "| phase | seconds | / BALLAD phase B | peak RSS (MiB) |",
        "|---|---|---|---|",
    ]
    names = {
        "ballad": "BALLAD phase B (10 epochs, batch 512, val each epoch)",
        "search": f"tip: training-free search of {results.get('search', {}).get('points', 0):.0f} (α, β) points on val",
        "tip": "tip: build the keys and score val",
        "tip-f": "tip-f: 1 epoch of key training (16 keys a class)",
        "gda": "gda: means, shared covariance, solve, score val",
        "ncm": "ncm: class means, score val",
    }
    for k, v in results.items():
        ratio = record["ratio_to_ballad_phase_b"].get(k)
        lines.append(
            f"| {names[k]} | {v['seconds']:.1f} | {ratio:.3f} | {v['peak_rss_mb']:.0f} |"
            if ratio is not None
            else f"| {names[k]} | {v['seconds']:.1f} | – | {v['peak_rss_mb']:.0f} |"
        )
    if "search" in results:
        lines += ["", f"The search scores {record['search_points_per_s']:.0f} points/s."]
    (Path(__file__).resolve().parent / "memory_heads.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
