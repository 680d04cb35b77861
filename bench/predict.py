"""`ballad predict` against a bare decode + encode loop over the same images, measured in one run.

`predict_split` decodes, encodes, classifies (one C×D matmul, softmax, top-k) and builds an output row per image;
the bare loop only decodes and encodes. Both use the same DataLoader settings; best of --repeats, alternated.

    python bench/predict.py [--model ballad-tiny] [--images 2048] [--image-size 64] [--device auto]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from ballad_cache.heads.adapter import AdapterHead  # noqa: E402
from ballad_cache.heads.config import AdapterConfig  # noqa: E402
from ballad_cache.heads.registry import HeadContext  # noqa: E402
from ballad_cache.inputs.reader import ImageRows, make_loader  # noqa: E402
from ballad_cache.models.clip import load_model, resolve_device  # noqa: E402
from ballad_cache.models.encoder import autocast  # noqa: E402
from ballad_cache.options import default_workers  # noqa: E402
from ballad_cache.pipelines.export import Classifier  # noqa: E402
from ballad_cache.pipelines.predict import PredictConfig, predict_split  # noqa: E402
from bench.common import write  # noqa: E402
from bench.extract import jpeg_split, rate  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="ballad-tiny")
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--image-size", type=int, default=64, help="side of the synthetic JPEGs")
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--label", default="predict", help="name of the JSON written to bench/out/")
    a = p.parse_args()
    device = resolve_device(a.device)
    loaded = load_model(a.model, device=device)
    loaded.model.eval()
    split = jpeg_split(Path(tempfile.mkdtemp(prefix="ballad-bench-")) / "jpeg", a.images, a.image_size)
    dim = loaded.embed_dim
    weight = torch.nn.functional.normalize(torch.randn(a.classes, dim), dim=-1)
    names = [f"class {i}" for i in range(a.classes)]
    log_prior = torch.full((a.classes,), -float(np.log(a.classes)))
    context = HeadContext(weight, log_prior, folded=True)
    classifier = Classifier(loaded, AdapterHead(AdapterConfig(), context, None), context, names, {})
    config = PredictConfig(batch_size=a.batch, workers=a.workers, precision=a.precision)
    rows = np.stack([np.arange(a.images), np.zeros(a.images, dtype=np.int64)], 1)

    @torch.inference_mode()
    def bare() -> None:
        loader = make_loader(
            ImageRows(split, rows, loaded.preprocess_eval), a.batch, a.workers, pin_memory=device.type == "cuda"
        )
        for batch in loader:
            with autocast(device, a.precision):
                feats = loaded.model.encode_image(batch["image"].to(device, non_blocking=True))
            feats.float().cpu()

    def ours() -> None:
        predict_split(classifier, split, config, device)

    bare()  # warm-up
    r_bare = r_ours = 0.0
    for _ in range(a.repeats):
        r_bare = max(r_bare, rate(a.images, bare))
        r_ours = max(r_ours, rate(a.images, ours))
    write(
        a.label,
        {
            "model": a.model,
            "images": a.images,
            "classes": a.classes,
            "images_per_s": {"ballad_predict": round(r_ours, 1), "bare_decode_encode": round(r_bare, 1)},
            "ratio": round(r_ours / r_bare, 3),
            "target": ">= 0.9",
        },
    )


if __name__ == "__main__":
    main()
