"""BALLAD's phase B against the additions later work showed matter (LIFT, Shi et al. 2024; Menon et al. 2021), each
alone and combined, on one cache, measured in one run:

- `la`: the logit-adjusted loss (logits + tau * log prior in training);
- `cosine`: a learnable cosine classifier initialised from the class text embeddings (scale 25);
- `instance sampling`: instance-balanced batches instead of BALLAD's class-aware ones (LIFT's setting for `la`);
- `ensemble`: the class embeddings as the renormalised mean over OpenAI's 80 ImageNet prompt templates. The image
  rows do not depend on the prompts, so the cache's features are reused with the ensemble's text embeddings,
  which the phase-A model encodes here (what `extract-features --templates openai-imagenet` would store).

Then the heads that remember (`heads/memory.py`): tip, tip-f, gda and ncm, each family's default grid
(`FAMILIES`) searched on val as `sweep --family` does, its best point reported on test; seconds are the family's
whole search (or fit, for tip-f).

Every configuration is ranked on val; the best is reported on test. Then the same grid's wall time on the
ImageNet-LT-shaped synthetic cache (115,846 × 1024, 1000 classes; one epoch, since 2 CPU cores take a minute per
adapter epoch there).

    python bench/heads.py [--cache ballad-demo/cache] [--batch 128] [--imagenet-epochs 1]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from ballad_cache.heads.adapter import adapter_logits, fit_adapters  # noqa: E402
from ballad_cache.heads.batches import TrainRows  # noqa: E402
from ballad_cache.heads.config import AdapterConfig  # noqa: E402
from ballad_cache.heads.metrics import classification_report, summary  # noqa: E402
from ballad_cache.heads.registry import HEADS, FitData, HeadContext  # noqa: E402
from ballad_cache.inputs.datasets import load_templates  # noqa: E402
from ballad_cache.inputs.longtail import class_log_prior  # noqa: E402
from ballad_cache.models.clip import PromptBank, load_model  # noqa: E402
from ballad_cache.pipelines.phase_b import family_grid  # noqa: E402
from ballad_cache.store.cache import FeatureCache, SplitFeatures  # noqa: E402
from bench.common import imagenet_lt_shaped, timed, write  # noqa: E402

KEYS = ("top1", "many", "medium", "few")


def ensemble_text(cache: FeatureCache) -> torch.Tensor:
    """Class embeddings over OpenAI's ImageNet templates, from the model the cache was extracted with."""
    loaded = load_model(cache.manifest["model"]["name"], cache.manifest["model"]["pretrained"])
    if loaded.checkpoint_sha256 != cache.manifest["model"]["checkpoint_sha256"]:
        sys.exit(f"the model at {cache.manifest['model']['name']} is not the one {cache.path} was extracted with")
    bank = PromptBank(loaded, cache.classnames, load_templates("openai-imagenet"))
    with torch.no_grad():
        return bank.encode(loaded.model.eval()).float()


def memory_points(cache: FeatureCache, val: SplitFeatures, test: SplitFeatures) -> list[dict[str, Any]]:
    """The best point on val of each memory-head family's default grid, and its test scores."""
    text, train = cache.text_embeddings(), cache.load_split("train")
    log_prior = class_log_prior(cache.train_counts)

    def report(logits: torch.Tensor, split: SplitFeatures) -> dict[str, float]:
        return summary(classification_report(logits, split.labels, cache.train_counts))

    out = []
    data = FitData(train, HeadContext(text, log_prior), val)
    for family in ("tip", "tip-f", "gda", "ncm"):
        configs = family_grid(family)
        t = time.perf_counter()
        fitted = [
            f for _, f in sorted(HEADS.get(family).sweep(data, configs, lambda lg: report(lg, val)), key=lambda x: x[0])
        ]
        scored = [f.val for f in fitted]
        seconds = time.perf_counter() - t
        i = max(range(len(configs)), key=lambda j: scored[j]["top1"])
        head = fitted[i].head or HEADS.get(family).fit(data, configs[i]).head
        chosen = {k: v for k, v in configs[i].to_dict().items() if k in HEADS.get(family).reads and k != "seed"}
        out.append(
            {
                "name": f"{family} (best of {len(configs)}: "
                + ", ".join(
                    f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in chosen.items() if k != "head_lr"
                )
                + ")",
                "additions": [family, "memory"],
                "val": scored[i],
                "test": report(head.logits(test.features), test),
                "seconds": round(seconds, 2),
            }
        )
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--cache", type=Path, default=Path("ballad-demo/cache"))
    p.add_argument("--batch", type=int, default=128, help="phase-B batch (the demo's)")
    p.add_argument("--imagenet-epochs", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--label", default="heads", help="name of the JSON written to bench/out/")
    a = p.parse_args()
    cache = FeatureCache(a.cache)
    rows = TrainRows.from_split(cache.load_split("train"))
    val, test = cache.load_split("val").eval_view(), cache.load_split("test").eval_view()
    texts = {"ballad": cache.text_embeddings(), "ensemble": ensemble_text(cache)}
    grid = [
        (templates, AdapterConfig(batch_size=a.batch, loss=loss, head=head, sampler=sampler))
        for templates, sampler, loss, head in itertools.product(
            texts, ("class-aware", "instance"), ("ce", "la"), ("text", "cosine")
        )
    ]
    points = []
    for templates, configs in itertools.groupby(grid, key=lambda g: g[0]):
        cfgs = [c for _, c in configs]
        text = texts[templates]
        for cfg in cfgs:  # one at a time, so each point's seconds are its own
            fit = fit_adapters(rows, text, [cfg], a.device, val=(val.features, val.labels))
            head = fit.heads[0] if fit.heads[0] is not None else text
            scores = {}
            for name, split in (("val", val), ("test", test)):
                logits = adapter_logits(split.features, fit.weights[0], cfg.ratio, head, cfg.logit_scale)
                scores[name] = summary(classification_report(logits, split.labels, cache.train_counts))
            additions = [x for x in (cfg.loss == "la" and "la", cfg.head == "cosine" and "cosine") if x]
            additions += ["instance sampling"] if cfg.sampler == "instance" else []
            additions += ["ensemble"] if templates == "ensemble" else []
            points.append(
                {
                    "name": " + ".join(additions) or "BALLAD defaults",
                    "additions": additions,
                    "val": scores["val"],
                    "test": scores["test"],
                    "seconds": round(fit.seconds, 2),
                }
            )
    points += memory_points(cache, val, test)
    best = max(points, key=lambda q: q["val"]["top1"])
    lines = [
        "| phase B on the demo cache | val top-1 | test top-1 | many | medium | few | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    for q in sorted(points, key=lambda q: (len(q["additions"]), q["name"])):
        label = f"**{q['name']}** (best on val)" if q is best else q["name"]
        cells = " | ".join(f"{q['test'][m]:.2f}" for m in KEYS)
        lines.append(f"| {label} | {q['val']['top1']:.2f} | {cells} | {q['seconds']:.1f} |")

    rows_in, text_in = imagenet_lt_shaped(1.0)
    shape_grid = [
        AdapterConfig(epochs=a.imagenet_epochs, loss=loss, head=head, select="last")
        for loss, head in itertools.product(("ce", "la"), ("text", "cosine"))
    ]
    batched = timed(lambda: fit_adapters(rows_in, text_in, shape_grid, a.device), sync=True)
    lines += [
        "",
        f"The grid's 4 loss × head points on the ImageNet-LT-shaped cache ({len(rows_in.image_labels):,} × 1024, "
        f"1000 classes), {a.imagenet_epochs} epoch(s) of batch 512, trained as one batched fit: {batched:.1f} s.",
    ]
    print("\n".join(lines))
    (Path(__file__).resolve().parent / "heads.md").write_text(
        "Written by `python bench/heads.py`.\n\n" + "\n".join(lines) + "\n"
    )
    write(a.label, {"points": points, "best_on_val": best["name"], "imagenet_shape_grid_s": round(batched, 2)})


if __name__ == "__main__":
    main()
