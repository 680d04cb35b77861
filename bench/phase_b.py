"""Phase B on the feature cache against the official recipe, which runs the frozen image encoder every step:
one epoch each over the same long-tailed images with the same model, class-aware sampling and batch size,
measured in one run.

    python bench/phase_b.py [--model ballad-tiny] [--images-per-head 300] [--batch 128] [--device auto]
    python bench/phase_b.py --model ViT-B-32 --images-per-head 1280 --image-size 256 --batch 512 --device cuda

The cache side also reports its one-off extraction time, and how many phase-B epochs it takes before
extract-once + train-on-cache beats the official recipe in total.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from ballad_cache.heads.adapter import fit_adapters  # noqa: E402
from ballad_cache.heads.batches import TrainRows  # noqa: E402
from ballad_cache.heads.config import AdapterConfig  # noqa: E402
from ballad_cache.inputs.datasets import ImageSplit, LTDataset  # noqa: E402
from ballad_cache.inputs.longtail import exponential_profile  # noqa: E402
from ballad_cache.inputs.reader import ImageRows, make_loader  # noqa: E402
from ballad_cache.inputs.samplers import index_stream  # noqa: E402
from ballad_cache.models.clip import load_model, resolve_device  # noqa: E402
from ballad_cache.models.encoder import ImageEncoder, autocast  # noqa: E402
from ballad_cache.options import default_workers  # noqa: E402
from ballad_cache.pipelines.extract import ExtractConfig, extract_features  # noqa: E402
from ballad_cache.store.cache import FeatureCache  # noqa: E402
from bench.common import write  # noqa: E402
from bench.extract import jpeg_split  # noqa: E402


def official_epoch(
    split: ImageSplit,
    loaded,
    text: torch.Tensor,
    cfg: AdapterConfig,
    device: torch.device,
    workers: int,
    precision: str,
) -> float:  # type: ignore[no-untyped-def]
    """One epoch of the official phase B: decode, encode with the frozen backbone, adapter step. Seconds."""
    model = loaded.model.eval().to(device)
    d = text.shape[1]
    adapter = torch.nn.Linear(d, d, bias=False).to(device)
    opt = torch.optim.SGD(adapter.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    order = index_stream(split.labels, cfg.sampler, 1, cfg.seed, cfg.samples_per_class)[0]
    rows = np.stack([order, np.zeros(len(order), dtype=np.int64)], 1)
    loader = make_loader(ImageRows(split, rows, loaded.preprocess_eval), cfg.batch_size, workers, device.type == "cuda")
    steps = math.ceil(len(order) / cfg.batch_size)
    text = text.to(device)
    start = time.perf_counter()
    for step, batch in enumerate(loader):
        with torch.no_grad(), autocast(device, precision):
            f = F.normalize(model.encode_image(batch["image"].to(device, non_blocking=True)).float(), dim=-1)
        x = cfg.ratio * adapter(f) + (1 - cfg.ratio) * f
        loss = F.cross_entropy(100.0 * F.normalize(x, dim=-1) @ text.T, batch["label"].to(device))
        for g in opt.param_groups:
            g["lr"] = 0.5 * cfg.lr * (1 + math.cos(math.pi * step / steps))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ballad-tiny")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--images-per-head", type=int, default=300, help="training images of the largest class")
    p.add_argument("--imbalance", type=float, default=20.0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--label", default="phase_b", help="name of the JSON written to bench/out/")
    a = p.parse_args()
    device = resolve_device(a.device)
    loaded = load_model(a.model, device=device)
    counts = exponential_profile(a.classes, a.images_per_head, a.imbalance)
    tmp = Path(tempfile.mkdtemp(prefix="ballad-bench-"))
    split = jpeg_split(tmp / "jpeg", int(sum(counts)), a.image_size, a.classes)
    split.labels = np.repeat(np.arange(a.classes), counts)
    split.name = "train"
    dataset = LTDataset("bench", [f"class {i}" for i in range(a.classes)], {"train": split})
    cfg = AdapterConfig(epochs=1, batch_size=a.batch)

    t = time.perf_counter()
    xcfg = ExtractConfig(splits=("train",), train_views=0, batch_size=a.batch, workers=a.workers, precision=a.precision)
    extract_features(
        dataset, loaded, tmp / "cache", xcfg, device, encoder=ImageEncoder(loaded.model, device, a.precision)
    )
    t_extract = time.perf_counter() - t
    cache = FeatureCache(tmp / "cache")
    rows, text = TrainRows.from_split(cache.load_split("train")), cache.text_embeddings()

    fit_adapters(rows, text, [cfg], device=device)  # warm-up
    t_cache = min(fit_adapters(rows, text, [cfg], device=device).seconds for _ in range(3))
    official_epoch(split, loaded, text, cfg, device, a.workers, a.precision)  # warm-up: workers, page cache
    t_official = official_epoch(split, loaded, text, cfg, device, a.workers, a.precision)
    break_even = math.ceil(t_extract / max(t_official - t_cache, 1e-9)) if t_official > t_cache else None
    write(
        a.label,
        {
            "model": a.model,
            "images": int(sum(counts)),
            "batch": a.batch,
            "precision": a.precision,
            "epoch_s": {"cache": round(t_cache, 4), "official_encoder_every_step": round(t_official, 3)},
            "speedup_per_epoch": round(t_official / t_cache, 1),
            "extraction_once_s": round(t_extract, 2),
            "epochs_to_break_even": break_even,
            "ten_epochs_speedup_incl_extraction": round(10 * t_official / (t_extract + 10 * t_cache), 2),
        },
    )


if __name__ == "__main__":
    main()
