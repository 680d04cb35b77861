"""Phase A with the official float16 weights (`--precision fp16-official`) against float32 weights, on fmnist-lt.

    python bench/fp16_official.py                  # both demo models, lr 1e-5 (official) and 1e-3
    python bench/fp16_official.py --models ballad-lite --lrs 1e-5

Each run is phase A with the official settings (SGD, momentum 0.9, wd 5e-4, eval mode, the official augmentation)
except 2 epochs of batch 32 under a per-step cosine: float16 arithmetic on a CPU without native float16 runs about
ten times slower than float32, so the demo's 8 and 4 epochs do not fit, and the official per-epoch cosine would
spend the second of 2 epochs at lr 0. (The demo's own phase A uses AdamW, which float16 weights cannot take: its
eps of 1e-8 is 0 in float16, and `finetune` refuses the pair.) It records val top-1 per epoch and, for the tensors
`convert_weights` makes float16, the fraction of entries that changed at least once over the run (compared before
and after every optimizer step). Writes bench/fp16_official.md and bench/out/fp16_official.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook  # noqa: E402

from ballad_cache.inputs.datasets import load_dataset  # noqa: E402
from ballad_cache.models.clip import convert_weights_official, load_model, resolve_device  # noqa: E402
from ballad_cache.pipelines.demo import DEMO_MODELS, demo_recipe  # noqa: E402
from ballad_cache.pipelines.finetune import FinetuneConfig, finetune  # noqa: E402
from bench.common import machine, write  # noqa: E402

HERE = Path(__file__).resolve().parent


class MovedEntries:
    """Marks, for the named parameters, every entry an optimizer step changed (hooks on every optimizer)."""

    def __init__(self, model: torch.nn.Module, names: set[str]) -> None:
        self.params = {n: p for n, p in model.named_parameters() if n in names}
        self.moved = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in self.params.items()}
        self.before: dict[str, torch.Tensor] = {}
        self.handles = [
            register_optimizer_step_pre_hook(self.pre),
            register_optimizer_step_post_hook(self.post),
        ]

    def pre(self, *_: Any) -> None:
        self.before = {n: p.detach().clone() for n, p in self.params.items()}

    def post(self, *_: Any) -> None:
        for n, p in self.params.items():
            self.moved[n] |= p.detach() != self.before[n]

    def fraction(self) -> float:
        for h in self.handles:
            h.remove()
        return sum(int(m.sum()) for m in self.moved.values()) / sum(m.numel() for m in self.moved.values())


def half_names(model_name: str) -> set[str]:
    """Names of the parameters `convert_weights` stores in float16 for this architecture."""
    model = copy.deepcopy(load_model(model_name).model)
    convert_weights_official(model)
    return {n for n, p in model.named_parameters() if p.dtype == torch.float16}


def run(model_name: str, lr: float, precision: str, device: torch.device) -> dict[str, Any]:
    """One phase A: val top-1 per epoch, moved fraction of the float16 tensors' entries, seconds."""
    dataset = load_dataset("fmnist-lt")
    workers = demo_recipe("full", model_name).stage("finetune").config().workers
    config = FinetuneConfig(epochs=2, batch_size=32, lr=lr, schedule="step", precision=precision, workers=workers)
    loaded = load_model(model_name)
    tracker = MovedEntries(loaded.model, half_names(model_name))
    out = Path(tempfile.mkdtemp())
    t = time.perf_counter()
    summary = finetune(dataset, loaded, out, config, device)
    seconds = time.perf_counter() - t
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "model": model_name,
        "lr": lr,
        "precision": precision,
        "val_top1_per_epoch": [round(r["val"]["top1"], 2) for r in records if "val" in r],
        "best_val_top1": round(summary["best_val_top1"], 2),
        "moved_fraction": round(tracker.fraction(), 4),
        "steps": summary["steps"],
        "seconds": round(seconds, 1),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """The markdown table of bench/fp16_official.md."""
    lines = [
        "| model | lr | precision | val top-1 per epoch (epoch 0: before) | best | fp16-matrix entries moved | s |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        epochs = " / ".join(f"{v:.1f}" for v in r["val_top1_per_epoch"])
        lines.append(
            f"| {r['model']} | {r['lr']:g} | {r['precision']} | {epochs} | {r['best_val_top1']:.2f} "
            f"| {100 * r['moved_fraction']:.1f}% | {r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(DEMO_MODELS))
    p.add_argument("--lrs", default="1e-5,1e-3", help="SGD learning rates (official: 1e-5)")
    p.add_argument("--device", default="auto")
    a = p.parse_args()
    device = resolve_device(a.device)
    rows = []
    for model_name in a.models.split(","):
        for lr in a.lrs.split(","):
            for precision in ("fp32", "fp16-official"):
                rows.append(run(model_name, float(lr), precision, device))
                print(json.dumps(rows[-1]), flush=True)
    text = (
        f"Written by `python bench/fp16_official.py` on {machine()}: fmnist-lt val split, top-1 %. Phase A with\n"
        "the official settings (SGD, momentum 0.9, wd 5e-4, eval mode) for 2 epochs of batch 32, per-step cosine.\n"
        "'fp16-matrix entries moved' counts, over the tensors `convert_weights` makes float16, the entries that\n"
        "changed at least once in the run.\n\n" + table(rows) + "\n"
    )
    (HERE / "fp16_official.md").write_text(text)
    write("fp16_official", {"rows": rows})


if __name__ == "__main__":
    main()
