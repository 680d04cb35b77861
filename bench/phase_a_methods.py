"""Phase A's tuning methods against `full`, measured in one run, one job at a time.

`cost` (default): for each method on one model, in a fresh process each: trainable parameters (count and share of
the image tower), training memory at the same batch (the bytes autograd saves for the backward, counted through
`saved_tensors_hooks` with each storage once, plus gradients and optimizer state: a machine-independent count) and
the peak resident memory the first step adds to the process (sampled every 2 ms), the FLOPs of a step (torch's
FlopCounterMode) and the step time; ratios against `full` (the image tower trained whole, the same cosine head;
BALLAD's `full` also trains the text tower, reported as `full+text`). `lora@16`: rank 16, `adaptformer@64`:
bottleneck 64 (default: LIFT's rule).

    python bench/phase_a_methods.py cost --model ballad-micro --batch 32
    python bench/phase_a_methods.py cost --model ViT-B-16 --batch 4 --classes 1000   # random weights serve for cost
    python bench/phase_a_methods.py cost --model ViT-B-16 --batch 128 --device cuda --precision bf16

`demo`: on Fashion-MNIST-LT, each method through the whole pipeline: phase A (the demo's settings, the method's own
learning rate; `NAME+text` also tunes the text tower, `NAME+lift` trains LIFT's cosine head with the LA loss),
extraction, and every cached head searched on val (`sweep --family all`); zero-shot -> phase A ->
best cached head, chosen on val, reported on test; and the epochs and seconds each method took to reach full's best
val top-1.

    python bench/phase_a_methods.py demo --model ballad-lite --out bench/out/phase_a_demo
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import write  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
METHODS = ("full", "full+text", "bitfit", "ssf", "lora", "adaptformer", "vpt")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one(
    method: str,
    model_name: str,
    batch: int,
    classes: int,
    steps: int,
    device_name: str,
    precision: str,
    peak_tflops: float = 0.0,
) -> dict:
    """Measure one method in this process (called in a fresh process per method)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from ballad_cache.inputs.transforms import image_size
    from ballad_cache.models.clip import load_model, resolve_device
    from ballad_cache.models.encoder import autocast
    from ballad_cache.tuning import METHODS as REGISTERED
    from ballad_cache.tuning import TuningOptions
    from ballad_cache.tuning.tuned import refuse_inapplicable, tune

    device = resolve_device(device_name)
    loaded = load_model(model_name, None if model_name.startswith("ballad-") else "none")
    model = loaded.model.to(device).eval()
    name, _, size = method.partition("@")
    name, towers = ("full", ["image", "text"]) if name == "full+text" else (name, ["image"])
    try:
        refuse_inapplicable(model, name, towers)
    except Exception as exc:  # noqa: BLE001 - a method that does not apply: reported, not measured
        return {"method": method, "applies": False, "why": str(exc)}
    assert name in REGISTERED
    tower_size = sum(p.numel() for n, p in model.named_parameters() if n.startswith("visual."))
    sizes = {"rank": int(size)} if name == "lora" and size else {"bottleneck": int(size)} if size else {}
    params = tune(model, name, towers, TuningOptions(num_classes=classes, **sizes))
    torch.manual_seed(0)
    dim = loaded.embed_dim
    head = torch.nn.Parameter(F.normalize(torch.randn(classes, dim, device=device), dim=-1))
    tokens = loaded.tokenizer(["a photo of a thing"] * min(classes, 64)).to(device)
    opt = torch.optim.SGD([*params, head], lr=1e-3, momentum=0.9, weight_decay=5e-4)
    h, w = image_size(loaded.preprocess_cfg)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, h, w, generator=gen).to(device)
    labels = torch.randint(classes, (batch,), generator=gen).to(device)
    saved: dict[int, int] = {}  # storage -> bytes, each storage once; the weights themselves are not counted
    weights = {p.untyped_storage().data_ptr() for p in [*model.parameters(), head]}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    def step(count: bool = False) -> None:
        ctx = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count else contextlib.nullcontext()
        flops = FlopCounterMode(display=False) if count else contextlib.nullcontext()
        with ctx, flops, autocast(device, precision):
            image = F.normalize(model.encode_image(images), dim=-1)
            if method == "full+text":  # BALLAD: the prompts re-encoded through the trained text tower
                classes_emb = F.normalize(model.encode_text(tokens), dim=-1)
                logits = 100 * image @ classes_emb.T
                loss = F.cross_entropy(logits.float(), labels % len(tokens))
            else:
                loss = F.cross_entropy(25 * image.float() @ F.normalize(head, dim=-1).T, labels)
        with flops:
            loss.backward()
        if count:
            counted.append(flops.get_total_flops())
        opt.step()
        opt.zero_grad(set_to_none=True)

    counted: list[int] = []

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    base, peak, running = _rss(), [0], [True]

    def sample() -> None:
        while running[0]:
            peak[0] = max(peak[0], _rss())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    # the first step, from the state before it: the peak resident memory it adds (activations, gradients, optimizer
    # state), what autograd saves, the FLOPs of forward and backward
    step(count=True)
    running[0] = False
    thread.join()
    activations = sum(saved.values())
    grads = sum(p.numel() * p.element_size() for p in [*params, head])
    state = sum(
        t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if isinstance(t, torch.Tensor)
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(steps):
        sync()
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    trainable = sum(p.numel() for p in params)
    record = {
        "method": method,
        "applies": True,
        "trainable": trainable,
        "share_of_image_tower_pct": round(100.0 * trainable / tower_size, 3),
        "head": head.numel(),
        "activations_MB": round(activations / 2**20, 1),
        "train_memory_MB": round((activations + grads + state) / 2**20, 1),
        "rss_first_step_MB": round(max(peak[0] - base, 0) / 2**20, 1),
        "step_s": round(sorted(times)[len(times) // 2], 4),
        "step_tflop": round(counted[0] / 1e12, 4),
        "tflop_per_s": round(counted[0] / 1e12 / sorted(times)[len(times) // 2], 3),
    }
    if peak_tflops:
        record["mfu"] = round(record["tflop_per_s"] / peak_tflops, 4)
    if device.type == "cuda":
        record["cuda_peak_MB"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return record


def cost(a: argparse.Namespace) -> None:
    records = []
    for method in a.methods.split(","):
        cmd = [sys.executable, __file__, "one", method, "--model", a.model, "--batch", str(a.batch)]
        cmd += ["--classes", str(a.classes), "--steps", str(a.steps), "--device", a.device, "--precision", a.precision]
        cmd += ["--peak-tflops", str(a.peak_tflops)]
        done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if done.returncode:
            raise SystemExit(f"{method} failed:\n{done.stderr[-3000:]}")
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(records[-1]), flush=True)
    full = next(r for r in records if r["method"] == "full")
    for r in records:
        if r["applies"]:
            r["memory_vs_full"] = round(r["train_memory_MB"] / full["train_memory_MB"], 3)
            r["rss_vs_full"] = round(r["rss_first_step_MB"] / max(full["rss_first_step_MB"], 1e-9), 3)
            r["step_vs_full"] = round(r["step_s"] / full["step_s"], 3)
    print(
        f"{'method':12} {'trainable':>11} {'share %':>8} {'train MB':>9} {'x full':>7} {'RSS MB':>8} {'x full':>7} "
        f"{'step s':>8} {'x full':>7} {'TFLOP/s':>8}" + (" MFU" if a.peak_tflops else "")
    )
    for r in records:
        if not r["applies"]:
            print(f"{r['method']:12} does not apply: {r['why']}")
            continue
        print(
            f"{r['method']:12} {r['trainable']:>11,} {r['share_of_image_tower_pct']:>8.3f} "
            f"{r['train_memory_MB']:>9.1f} "
            f"{r['memory_vs_full']:>7.3f} {r['rss_first_step_MB']:>8.1f} {r['rss_vs_full']:>7.3f} "
            f"{r['step_s']:>8.3f} {r['step_vs_full']:>7.3f} {r['tflop_per_s']:>8.3f}"
            + (f" {r['mfu']:.3f}" if "mfu" in r else "")
        )
    write(
        a.label or f"phase_a_methods_{a.model}",
        {"model": a.model, "batch": a.batch, "device": a.device, "precision": a.precision, "records": records},
    )


def demo(a: argparse.Namespace) -> None:
    """Each method through phase A, extraction and the cached heads on the demo data."""
    import dataclasses

    import torch

    from ballad_cache.heads.config import AdapterConfig  # noqa: F401 - registers the head families
    from ballad_cache.pipelines.configs import ExtractConfig, FinetuneConfig
    from ballad_cache.pipelines.demo import phase_a_settings
    from ballad_cache.pipelines.extract import run_extract
    from ballad_cache.pipelines.finetune import run_finetune
    from ballad_cache.pipelines.phase_b import family_grid, run_sweep
    from ballad_cache.store.cache import FeatureCache

    device = torch.device("cpu")
    out = Path(a.out)
    base = FinetuneConfig(
        epochs=a.epochs, batch_size=32, lr=3e-4, warmup_steps=30, workers=1, **phase_a_settings("ballad-lite")
    )
    runs = {
        "full": dataclasses.replace(base),
        "bitfit": dataclasses.replace(base, method="bitfit", lr=a.peft_lr),
        "ssf": dataclasses.replace(base, method="ssf", lr=a.peft_lr),
        "lora": dataclasses.replace(base, method="lora", lr=a.peft_lr),
        "lora+text": dataclasses.replace(base, method="lora", lr=a.peft_lr, tune_text=True),
    }
    lift = {"classifier": "cosine", "loss": "la"}  # LIFT's head and loss: a cosine head from the prompts, LA
    runs["full+lift"] = dataclasses.replace(base, **lift)
    for method in ("bitfit", "ssf", "lora"):
        runs[f"{method}+lift"] = dataclasses.replace(base, method=method, lr=a.peft_lr, **lift)
    results = []
    for name in a.runs.split(","):
        cfg = runs[name]
        t0 = time.perf_counter()
        summary = run_finetune("fmnist-lt", a.model, None, out / name / "finetune", cfg, device)
        phase_a_s = time.perf_counter() - t0
        epochs = [
            json.loads(line)
            for line in (out / name / "finetune" / "metrics.jsonl").read_text().splitlines()
            if '"val"' in line and "images_per_s" in line
        ]
        model = f"local-dir:{out / name / 'finetune' / 'model'}"
        ext = ExtractConfig(train_views=a.views, shard_size=4096, workers=1)
        run_extract("fmnist-lt", model, None, out / name / "cache", ext, device)
        cache = FeatureCache(out / name / "cache")
        from ballad_cache.pipelines.configs import EvalConfig
        from ballad_cache.pipelines.evaluate import evaluate_cache

        phase_a_test = evaluate_cache(cache, None, EvalConfig(split="test"))["heads"]["zero-shot"]
        sweep = run_sweep(cache, family_grid("all"), out / name / "sweep")
        best = sweep.best
        record = {
            "run": name,
            "lr": cfg.lr,
            "trainable": summary["trainable"],
            "zero_shot_val": summary["start"]["top1"] if summary["start"] else None,
            "phase_a_val": summary["best_val_top1"],
            "phase_a_test": {k: round(phase_a_test[k], 2) for k in ("top1", "many", "medium", "few")},
            "best_head": best["config"].get("head"),
            "best_head_val": best["val"]["top1"],
            "best_head_test": {k: round(sweep.test[k], 2) for k in ("top1", "many", "medium", "few")},
            "phase_a_s": round(phase_a_s, 1),
            "val_by_epoch": [(e["epoch"], e["val"]["top1"], round(e["epoch"] * 1.0, 1)) for e in epochs],
            "seconds_by_epoch": [round(phase_a_s * e["epoch"] / len(epochs), 1) for e in epochs],
        }
        results.append(record)
        print(json.dumps(record), flush=True)
    full = next((r for r in results if r["run"] == "full"), None)
    if full is not None:
        target = full["phase_a_val"]
        for r in results:
            reached = [i for i, (_, v, _) in enumerate(r["val_by_epoch"]) if v >= target]
            r["reaches_full_best_val"] = (
                {"epoch": reached[0] + 1, "seconds": r["seconds_by_epoch"][reached[0]]} if reached else None
            )
    write(a.label or "phase_a_methods_demo", {"model": a.model, "results": results})
    for r in results:
        print(
            f"{r['run']:10} zero-shot val {r['zero_shot_val']:.2f} | phase A val {r['phase_a_val']:.2f} test "
            f"{r['phase_a_test']['top1']:.2f} | best head {r['best_head']} val {r['best_head_val']:.2f} test "
            f"{r['best_head_test']['top1']:.2f} ({r['best_head_test']['many']:.1f}/{r['best_head_test']['medium']:.1f}/"
            f"{r['best_head_test']['few']:.1f}) | phase A {r['phase_a_s']:.0f} s | reaches full's best val: "
            f"{r.get('reaches_full_best_val')}"
        )


def main() -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="mode")
    for mode in ("cost", "one"):
        q = sub.add_parser(mode)
        if mode == "one":
            q.add_argument("method")
        else:
            q.add_argument("--methods", default=",".join(METHODS))
            q.add_argument("--label", default="")
        q.add_argument("--model", default="ballad-micro")
        q.add_argument("--batch", type=int, default=32)
        q.add_argument("--classes", type=int, default=10)
        q.add_argument("--steps", type=int, default=3)
        q.add_argument("--device", default="cpu")
        q.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
        q.add_argument("--peak-tflops", type=float, default=0.0, help="the device's dense peak, for MFU (H100: 989)")
    d = sub.add_parser("demo")
    d.add_argument("--model", default="ballad-lite")
    d.add_argument("--out", default="bench/out/phase_a_demo")
    d.add_argument("--runs", default="full,bitfit,ssf,lora,lora+text")
    d.add_argument("--epochs", type=int, default=4)
    d.add_argument("--peft-lr", type=float, default=3e-3)
    d.add_argument("--views", type=int, default=4)
    d.add_argument("--label", default="")
    a = p.parse_args()
    if a.mode == "one":
        import logging
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        logging.getLogger().setLevel(logging.ERROR)
        print(json.dumps(one(a.method, a.model, a.batch, a.classes, a.steps, a.device, a.precision, a.peak_tflops)))
    elif a.mode == "demo":
        demo(a)
    else:
        cost(a)


if __name__ == "__main__":
    main()
