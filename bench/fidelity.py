"""What the cache's fixed augmented views cost against the official phase B, which augments afresh at every step.

The official phase B (BALLAD `train.py` with `data/dataloader.py`'s train transform) decodes every drawn image,
augments it with a new random RandomResizedCrop(0.5-1) + flip + ColorJitter(0.4) view, and encodes it with the
frozen phase-A model at every step. Here that run draws the same class-aware stream, augments and encodes every
draw afresh with the official transform, and feeds those features, in draw order, to the same adapter update
(the encoder is frozen, so encoding a batch before its step or during it gives the same numbers). Against it:
phase B on a cache holding K augmented views per training image (official transform, K in --views), each draw
picking one of them at random (K = 0: the eval view only). Val/test use the eval view; every run keeps its best
val epoch, as the official code does. Mean ± std over seeds (the seed draws the stream, the adapter's init and the
views), on fmnist-lt with the demo's phase-A ballad-tiny model, measured in one run.

    python bench/fidelity.py [--phase-a DIR/model] [--views 0,1,2,4,8,16] [--seeds 3] [--batch 128]
    python bench/fidelity.py --views 16 --augment-on worker,device    # the device-made views against PIL's

The cached K views are made by PIL in the loader workers (`--augment-on worker`). With `--augment-on worker,device`,
the largest K is also extracted with `--augment-on device` (views made on the
encoding device from the same drawn parameters) and compared with the worker path's K on the same seeds.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ballad_cache.heads.adapter import adapter_logits, fit_adapters  # noqa: E402
from ballad_cache.heads.batches import TrainRows, steps_per_epoch  # noqa: E402
from ballad_cache.heads.config import AdapterConfig  # noqa: E402
from ballad_cache.heads.metrics import classification_report, summary  # noqa: E402
from ballad_cache.inputs.datasets import load_dataset  # noqa: E402
from ballad_cache.inputs.reader import ImageRows, make_loader  # noqa: E402
from ballad_cache.inputs.samplers import index_stream  # noqa: E402
from ballad_cache.models.clip import load_model, resolve_device  # noqa: E402
from ballad_cache.models.encoder import ImageEncoder  # noqa: E402
from ballad_cache.options import default_workers  # noqa: E402
from ballad_cache.pipelines.demo import demo_recipe  # noqa: E402
from ballad_cache.pipelines.extract import ExtractConfig, augment_of, extract_features  # noqa: E402
from ballad_cache.pipelines.finetune import finetune  # noqa: E402
from ballad_cache.store.cache import FeatureCache, SplitFeatures  # noqa: E402
from bench.common import machine, write  # noqa: E402

OUT = Path(__file__).resolve().parent / "out" / "fidelity"
KEYS = ("top1", "many", "medium", "few")


def fresh_view_rows(
    dataset, loaded, stream: list[np.ndarray], seed: int, device: torch.device, workers: int
) -> tuple[TrainRows, list[np.ndarray]]:  # type: ignore[no-untyped-def]
    """Encode every draw of `stream` from a new random official view: one feature row per draw, in draw order."""
    split = dataset.split("train")
    draws = np.concatenate(stream)
    # view = position of the draw (1-based): ImageRows seeds each (seed, index, view), so every draw gets its own view
    rows = np.stack([draws, np.arange(1, len(draws) + 1)], axis=1)
    config = ExtractConfig()
    reader = ImageRows(split, rows, loaded.preprocess_eval, augment_of(loaded, config), seed=1000 + seed)
    encoder = ImageEncoder(loaded.model, device)
    feats = [torch.from_numpy(encoder(batch["image"])) for batch in make_loader(reader, 256, workers)]
    per_draw = TrainRows(torch.cat(feats).float(), split.labels[draws].astype(np.int64), np.arange(len(draws))[:, None])
    bounds = np.cumsum([0, *(len(e) for e in stream)])
    return per_draw, [np.arange(a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def with_views(train: SplitFeatures, k: int) -> SplitFeatures:
    """The rows of views 0..k (k = 0: the eval view alone)."""
    keep = train.view <= k
    return SplitFeatures(train.features[keep], train.labels[keep], train.index[keep], train.view[keep])


def test_report(cache: FeatureCache, weight: torch.Tensor, ratio: float, counts: np.ndarray) -> dict[str, float]:
    """Test top-1 and many/medium/few of one adapter."""
    test = cache.load_split("test")
    logits = adapter_logits(test.features, weight, ratio, cache.text_embeddings())
    return summary(classification_report(logits, test.labels, counts))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--phase-a", type=Path, default=None, help="phase-A model folder (default: train the demo's)")
    p.add_argument("--views", default="0,1,2,4,8,16")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--batch", type=int, default=128, help="phase-B batch (the demo's; 512 gives 2 steps an epoch)")
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--device", default="auto")
    p.add_argument("--augment-on", default="worker", help="worker, or worker,device: also the device-made views")
    p.add_argument("--label", default="fidelity", help="name of the JSON written to bench/out/")
    a = p.parse_args()
    device = resolve_device(a.device)
    views = [int(v) for v in a.views.split(",")]
    dataset = load_dataset("fmnist-lt")
    model_dir = a.phase_a
    if model_dir is None:
        model_dir = OUT / "finetune" / "model"
        if not (OUT / "finetune" / "summary.json").exists():
            print("training the demo's phase-A model ...", file=sys.stderr)
            config = demo_recipe("full", "ballad-tiny").stage("finetune").config()
            finetune(dataset, load_model("ballad-tiny"), OUT / "finetune", config, device)
    loaded = load_model(f"local-dir:{model_dir}")
    loaded.model.eval()
    on_device = "device" in a.augment_on.split(",")
    results: dict[str, list[dict[str, float]]] = {"fresh": [], **{f"K={k}": [] for k in views}}
    if on_device:
        results[f"K={max(views)} device"] = []
    seconds: dict[str, list[float]] = {k: [] for k in results}
    for seed in range(a.seeds):
        if seed == 0:  # val and test (eval view) are the same for every seed
            xcfg = ExtractConfig(splits=("val", "test"), workers=a.workers, shard_size=1 << 16)
            extract_features(dataset, loaded, OUT / "cache-eval", xcfg, device)
            cache = FeatureCache(OUT / "cache-eval")
            text, val = cache.text_embeddings(), cache.load_split("val")
        t = time.perf_counter()
        xcfg = ExtractConfig(  # the K rows: views made by PIL in the workers, as the official transform makes them
            splits=("train",),
            train_views=max(views),
            seed=seed,
            workers=a.workers,
            shard_size=1 << 16,
            augment_on="worker",
        )
        extract_features(dataset, loaded, OUT / f"cache-train-seed{seed}", xcfg, device)
        t_extract = time.perf_counter() - t
        train = FeatureCache(OUT / f"cache-train-seed{seed}").load_split("train")
        counts = dataset.class_counts("train")
        cfg = AdapterConfig(batch_size=a.batch, seed=seed)
        n_images = int((train.view == 0).sum())
        draws = steps_per_epoch(n_images, cfg) * cfg.batch_size
        labels = TrainRows.from_split(with_views(train, 0)).image_labels
        stream = index_stream(labels, cfg.sampler, cfg.epochs, seed, cfg.samples_per_class, draws)

        t = time.perf_counter()
        rows, per_draw_stream = fresh_view_rows(dataset, loaded, stream, seed, device, a.workers)
        fit = fit_adapters(rows, text, [cfg], device, val=(val.features, val.labels), stream=per_draw_stream)
        seconds["fresh"].append(time.perf_counter() - t)
        results["fresh"].append(test_report(cache, fit.weights[0], cfg.ratio, counts))

        for k in views:
            rows = TrainRows.from_split(with_views(train, k))
            fit = fit_adapters(rows, text, [cfg], device, val=(val.features, val.labels), stream=stream)
            # the extraction's share for K views: K + 1 of the max + 1 views encoded per image
            seconds[f"K={k}"].append(fit.seconds + t_extract * (k + 1) / (max(views) + 1))
            results[f"K={k}"].append(test_report(cache, fit.weights[0], cfg.ratio, counts))
        if on_device:
            k, name = max(views), f"K={max(views)} device"
            t = time.perf_counter()
            dcfg = replace(xcfg, augment_on="device")
            extract_features(dataset, loaded, OUT / f"cache-train-device-seed{seed}", dcfg, device)
            t_device = time.perf_counter() - t
            dtrain = FeatureCache(OUT / f"cache-train-device-seed{seed}").load_split("train")
            rows = TrainRows.from_split(with_views(dtrain, k))
            fit = fit_adapters(rows, text, [cfg], device, val=(val.features, val.labels), stream=stream)
            seconds[name].append(fit.seconds + t_device)
            results[name].append(test_report(cache, fit.weights[0], cfg.ratio, counts))
        print(f"seed {seed}: fresh top1 {results['fresh'][-1]['top1']:.2f}", file=sys.stderr)

    table: dict[str, dict[str, float]] = {}
    for name, runs in results.items():
        table[name] = {
            **{f"{m}_mean": round(float(np.mean([r[m] for r in runs])), 2) for m in KEYS},
            **{f"{m}_std": round(float(np.std([r[m] for r in runs])), 2) for m in KEYS},
            "wall_s": round(float(np.mean(seconds[name])), 2),
        }
    fresh = table["fresh"]
    within = [
        k
        for k in views
        if all(abs(table[f"K={k}"][f"{m}_mean"] - fresh[f"{m}_mean"]) <= fresh[f"{m}_std"] for m in ("top1", "few"))
    ]
    lines = ["| phase B | top-1 | many | medium | few | wall s |", "|---|---|---|---|---|---|"]
    for name, row in table.items():
        cells = " | ".join(f"{row[f'{m}_mean']:.2f} ± {row[f'{m}_std']:.2f}" for m in KEYS)
        label = "fresh views every step (official)" if name == "fresh" else f"cache, {name} views"
        label = label.replace(" device views", " views made on the device")
        lines.append(f"| {label} | {cells} | {row['wall_s']:.1f} |")
    smallest = min(within) if within else None
    lines += [
        "",
        f"Mean ± std over {a.seeds} seeds, test split, phase-B batch {a.batch}; wall s: the fresh-view run's",
        "encoding and training, or the cached run's training plus its share of the extraction. Within one std of",
        f"the fresh-view run on mean top-1 and few-shot: K in {within}; smallest: {smallest}.",
    ]
    device_within = None
    if on_device:  # the device-made views against the worker path's at the same K
        ref, dev = table[f"K={max(views)}"], table[f"K={max(views)} device"]
        device_within = all(abs(dev[f"{m}_mean"] - ref[f"{m}_mean"]) <= ref[f"{m}_std"] for m in ("top1", "few"))
        lines.append(
            f"Views made on the device (--augment-on device), K={max(views)}: "
            f"{'within' if device_within else 'NOT within'} one std of the worker path's on mean top-1 and few-shot."
        )
    print("\n".join(lines))
    md = "fidelity_device.md" if on_device else "fidelity.md"  # the K sweep's table stays in fidelity.md
    (Path(__file__).resolve().parent / md).write_text(
        f"Written by `python bench/fidelity.py` ({machine()}).\n\n" + "\n".join(lines) + "\n"
    )
    write(
        a.label,
        {
            "phase_a_model": str(model_dir),
            "seeds": a.seeds,
            "batch": a.batch,
            "table": table,
            "views_within_one_std_of_fresh": within,
            "smallest_k_within_one_std": smallest,
            "device_views_within_one_std_of_worker": device_within,
        },
    )


if __name__ == "__main__":
    main()
