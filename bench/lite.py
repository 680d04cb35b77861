"""ballad-tiny against ballad-lite through the demo recipe on fmnist-lt, measured in one run on this machine.

    python bench/lite.py --tune        # ballad-lite phase-A settings, ranked on val only
    python bench/lite.py               # both models through `ballad demo`: wall time per step, test accuracy

The second form runs the whole demo for each model into bench/out/lite/MODEL and prints each step's seconds and
test top-1/many/medium/few for zero-shot after phase A, the BALLAD adapter and a 10-NN on the cached features.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ballad_cache.inputs.datasets import load_dataset  # noqa: E402
from ballad_cache.models.clip import load_model, resolve_device  # noqa: E402
from ballad_cache.pipelines.demo import DEMO_MODELS, demo_recipe, run_demo  # noqa: E402
from ballad_cache.pipelines.finetune import finetune  # noqa: E402
from bench.common import write  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "lite"
KEYS = ("top1", "many", "medium", "few")


def tune(device) -> None:  # type: ignore[no-untyped-def]
    """ballad-lite's phase A over a small grid of rates, best val top-1 over the epochs of each run."""
    dataset = load_dataset("fmnist-lt")
    base = demo_recipe("full", "ballad-lite").stage("finetune").config()
    results = []
    for lr in (1e-4, 3e-4):  # 4 epochs each: the demo's time budget (6 minutes on 2 cores) allows no more
        for train_mode in (False,):  # BatchNorm statistics frozen, as the official phase A keeps them
            config = replace(base, lr=lr, train_mode=train_mode, epochs=4)
            t = time.perf_counter()
            summary = finetune(dataset, load_model("ballad-lite"), Path(tempfile.mkdtemp()), config, device)
            results.append(
                {
                    "lr": lr,
                    "train_mode": train_mode,
                    "epochs": config.epochs,
                    "val_start": summary["start"]["top1"],
                    "best_val_top1": summary["best_val_top1"],
                    "best_epoch": summary["best_epoch"],
                    "seconds": round(time.perf_counter() - t, 1),
                }
            )
            print(results[-1], file=sys.stderr, flush=True)
    write("lite_tune", {"runs": results, "best": max(results, key=lambda r: r["best_val_top1"])})


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--tune", action="store_true", help="rank ballad-lite phase-A settings on val")
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    device = resolve_device(a.device)
    if a.tune:
        tune(device)
        return
    table = {}
    for model in DEMO_MODELS:
        t = time.perf_counter()
        summary = run_demo(OUT / model, "full", device, overwrite=True, model=model)
        table[model] = {
            "total_s": round(time.perf_counter() - t, 1),
            "seconds": summary["seconds"],
            "test": {r["head"]: {k: round(r[k], 2) for k in KEYS} for r in summary["rows"]},
        }
    lines = ["| | " + " | ".join(DEMO_MODELS) + " |", "|---|" + "---|" * len(DEMO_MODELS)]
    for step in table[DEMO_MODELS[0]]["seconds"]:
        lines.append(f"| {step} (s) | " + " | ".join(f"{table[m]['seconds'][step]:.0f}" for m in DEMO_MODELS) + " |")
    lines.append("| whole demo (s) | " + " | ".join(f"{table[m]['total_s']:.0f}" for m in DEMO_MODELS) + " |")
    for head, label in (("zero-shot", "zero-shot after phase A"), ("adapter", "BALLAD adapter"), ("knn@10", "10-NN")):
        cells = ["/".join(f"{table[m]['test'][head][k]:.1f}" for k in KEYS) for m in DEMO_MODELS]
        lines.append(f"| {label}: top-1/many/medium/few | " + " | ".join(cells) + " |")
    print("\n".join(lines))
    (Path(__file__).resolve().parent / "lite.md").write_text(
        "Written by `python bench/lite.py` (fmnist-lt test split, accuracy %).\n\n" + "\n".join(lines) + "\n"
    )
    write("lite", table)


if __name__ == "__main__":
    main()
