"""Extraction with K augmented views per image: one decode per (image, view) row (before) against one decode per
image for all its rows (after), with `--draft`, and with `--augment-on device` (with and without `--draft`), each
against the encoder alone on the same rows, in one run.

    python bench/extract_views.py                                  # ballad-micro, 64 JPEGs of 500×375, K = 16
    python bench/extract_views.py --model ballad-lite --data fmnist-lt --images 0    # the demo's train split

'before' runs today's extractor with every row in a group of its own (exactly the reader before decode-once);
'encode only' runs `ImageEncoder` over ready tensors of the same shape and count. Ratios are rows/s over the
encode-only rows/s.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ballad_cache.inputs import reader as reader_module  # noqa: E402
from ballad_cache.inputs.datasets import ImageSplit, LTDataset, load_dataset  # noqa: E402
from ballad_cache.models import load_model, resolve_device  # noqa: E402
from ballad_cache.models.encoder import ImageEncoder  # noqa: E402
from ballad_cache.options import default_workers  # noqa: E402
from ballad_cache.pipelines.extract import ExtractConfig, extract_features  # noqa: E402
from bench.common import machine, write  # noqa: E402


def photo_split(folder: Path, n: int, width: int = 500, height: int = 375, classes: int = 10) -> ImageSplit:
    """n photo-sized JPEGs (smooth colour fields plus noise, quality 90: they compress like photographs)."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width] / max(width, height)
    files = []
    for i in range(n):
        path = folder / f"{i:06d}.jpg"
        if not path.exists():
            a, b, c = rng.uniform(0, 6, 3)
            base = np.stack([np.sin(a * xx + b * yy + c + k) for k in range(3)], -1) * 100 + 128
            img = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(path, quality=90)
        files.append(str(path))
    return ImageSplit("train", np.arange(n) % classes, files, files=files)


MODES = ("before", "after", "after+draft", "after+device", "after+device+draft")


def singleton_groups(rows: np.ndarray, batches):  # type: ignore[no-untyped-def]
    """The reader before decode-once: every row its own group, so every row decodes its image."""
    groups = [[p] for batch in batches for p in batch]
    grouped, start = [], 0
    for batch in batches:
        grouped.append(list(range(start, start + len(batch))))
        start += len(batch)
    return groups, grouped


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ballad-micro")
    p.add_argument("--data", default=None, help="a dataset spec; default: generated 500×375 JPEGs")
    p.add_argument("--images", type=int, default=64, help="generated JPEGs (0 with --data: its whole train split)")
    p.add_argument("--views", type=int, default=16)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--label", default="extract_views")
    p.add_argument("--md", default=str(Path(__file__).resolve().parent / "extract_views.md"), help="table to extend")
    a = p.parse_args()
    device = resolve_device(a.device)
    loaded = load_model(a.model, device=device)
    tmp = Path(tempfile.mkdtemp(prefix="ballad-bench-"))
    if a.data:
        dataset = load_dataset(a.data)
        train = dataset.split("train")
        if a.images:
            train = train.subset(np.arange(min(a.images, len(train))))
        dataset = LTDataset(dataset.name, dataset.classnames, {"train": train}, dataset.templates)
    else:
        train = photo_split(tmp / "jpeg", a.images)
        dataset = LTDataset("photos", [f"class {i}" for i in range(10)], {"train": train})
    rows = len(train) * (a.views + 1)

    def extract(mode: str) -> float:
        original = reader_module.group_batches
        if mode == "before":
            reader_module.group_batches = singleton_groups
        config = ExtractConfig(
            splits=("train",),
            train_views=a.views,
            batch_size=a.batch,
            workers=a.workers,
            precision=a.precision,
            draft="draft" in mode,
            augment_on="device" if "device" in mode else "worker",
        )
        try:
            t = time.perf_counter()
            extract_features(dataset, loaded, tmp / f"cache-{mode}", config, device)
            return rows / (time.perf_counter() - t)
        finally:
            reader_module.group_batches = original

    size = loaded.preprocess_cfg.get("size", 224)
    size = size if isinstance(size, int) else size[0]
    encoder = ImageEncoder(loaded.model, device, a.precision)
    batch = torch.randn(a.batch, 3, size, size, device=device)  # on the device: the encoder alone, no copies
    encoder(batch)  # warm-up

    def encode_only() -> float:
        t = time.perf_counter()
        for _ in range(-(-rows // a.batch)):
            encoder(batch)
        return rows / (time.perf_counter() - t)

    def decode_only(draft: int) -> float:
        """Rows/s if decoding each image once (one process, no transform) were all the work: the ceiling of any
        reader with one loader worker."""
        t = time.perf_counter()
        for i in range(len(train)):
            train.load(i, draft=draft)
        return rows / (time.perf_counter() - t)

    size2 = 2 * size
    ceilings = {"decode only": decode_only(0), "decode only, draft": decode_only(size2)}
    results = {"encode only": encode_only()}
    for mode in MODES:
        results[mode] = extract(mode)
    results["encode only (again)"] = encode_only()
    encode = max(results["encode only"], results["encode only (again)"])
    record = {
        "model": a.model,
        "data": a.data or f"{a.images} generated 500x375 JPEGs",
        "images": len(train),
        "views": a.views,
        "rows": rows,
        "rows_per_s": {k: round(v, 1) for k, v in results.items()},
        "ratio_to_encode_only": {k: round(results[k] / encode, 3) for k in MODES},
        "after_over_before": round(results["after"] / results["before"], 2),
        "decode_ceiling_rows_per_s": {k: round(v, 1) for k, v in ceilings.items()},
    }
    write(a.label, record)
    md = Path(a.md)
    header = [
        "Written by `python bench/extract_views.py`: extraction rows/s at K views per image against the encoder",
        "alone on the same number of rows (ratio in brackets), in one run per line.",
        "",
        "| model, data | rows | encode only | before: a decode per row | after: a decode per image | + --draft "
        "| --augment-on device | device + --draft | decode only: full / draft |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    table = md.read_text().strip().splitlines() if md.exists() else []
    if table[: len(header)] != header:  # a table of other columns: start again
        table = header
    r, q = record["rows_per_s"], record["ratio_to_encode_only"]
    cells = " | ".join(f"{r[m]:.0f} ({q[m]:.2f})" for m in MODES)
    ceiling = " / ".join(f"{v:.0f}" for v in ceilings.values())
    table.append(
        f"| {a.model}, {record['data']}, K = {a.views} ({machine()}) | {rows} | {encode:.0f} | {cells} | {ceiling} |"
    )
    md.write_text("\n".join(table) + "\n")


if __name__ == "__main__":
    main()
