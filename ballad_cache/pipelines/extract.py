"""Extraction runner: reader → encoder → shard writer, resumable shard by shard, one rank's share at a time."""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..atomic import disk_error, remove_stale_temps, sha256_json
from ..distributed import DistContext
from ..errors import BalladError, setting
from ..inputs.datasets import SPLITS, LTDataset, load_templates
from ..inputs.device_augment import DeviceAugment, assemble
from ..inputs.reader import ImageRows, grouped_loader, skipped_row, usable_rows
from ..inputs.transforms import EVAL_VIEWS, crop_views, image_size, train_transform
from ..models.clip import LoadedModel, PromptBank
from ..models.encoder import ImageEncoder, effective_precision
from ..progress import NullProgress, Progress
from ..store.cache import (
    MANIFEST,
    ShardWriter,
    read_shard_entry,
    shard_count,
    shard_name,
    write_manifest,
    write_text_embeddings,
)
from ..store.runs import RunFolder
from .configs import ExtractConfig


def cache_folder(out: str | Path, rank: int = 0, main: bool = True) -> RunFolder:
    """The run folder of an extraction: always resumable (finished shards of the same fingerprint are kept), one
    lock per rank (each writes its own shards)."""
    return RunFolder(out, "extract-features", (), main=main, lock=f".ballad.rank{rank}.lock")


def split_rows(num_images: int, views: int, crops: int = 0) -> np.ndarray:
    """(index, view) rows of a split, image-major: every view of an image lands in the same shard. Each image has
    view 0 (eval), `views` augmented views 1..K, then `crops` test-time crops -1..-V."""
    codes = np.concatenate([np.arange(views + 1), -np.arange(1, crops + 1)]).astype(np.int64)
    index = np.repeat(np.arange(num_images, dtype=np.int64), len(codes))
    view = np.tile(codes, num_images)
    return np.stack([index, view], axis=1)


def views_of(config: ExtractConfig, split: str) -> tuple[int, int]:
    """(augmented views, test-time crops) per image of `split`: augmented views in train, crops in val and test."""
    if split == "train":
        return config.train_views, 0
    return 0, EVAL_VIEWS.get(config.eval_views)


def resolve_splits(config: ExtractConfig, dataset: LTDataset) -> ExtractConfig:
    """`config` with its splits spelled out: empty `splits` means every one of train, val, test the dataset has."""
    if config.splits:
        return config
    return replace(config, splits=tuple(s for s in SPLITS if s in dataset.splits))


def augment_of(loaded: LoadedModel, config: ExtractConfig) -> Callable[[Any], torch.Tensor]:
    """The transform of the augmented training views."""
    return train_transform(config.augment, loaded.preprocess_cfg, loaded.preprocess_train)


def templates_of(dataset: LTDataset, config: ExtractConfig) -> list[str]:
    """The prompt templates to encode: `config.templates` when given, else the dataset's."""
    return load_templates(config.templates) if config.templates else list(dataset.templates)


def config_fingerprint(dataset: LTDataset, loaded: LoadedModel, config: ExtractConfig, templates: list[str]) -> str:
    """Hash of everything that determines the cache's contents (not batch size, workers or ranks)."""
    splits = {s: sha256_json([dataset.split(s).labels.tolist(), dataset.split(s).paths]) for s in config.splits}
    return sha256_json(
        {
            "dataset": dataset.name,
            "splits": splits,
            "model": loaded.provenance(),
            "preprocess": [repr(loaded.preprocess_eval), repr(augment_of(loaded, config))],
            "templates": templates,
            "dtype": config.dtype,
            "train_views": config.train_views,
            "shard_size": config.shard_size,
            "seed": config.seed,
            "precision": config.precision,
            "skip_bad": config.skip_bad,
            # absent when off: caches made before these options keep their hash
            **({"draft": True} if config.draft else {}),
            # and only where augmented views exist: eval-only caches are the same rows either way
            **({"augment_on": config.augment_on} if config.augment_on != "worker" and augmented(config) else {}),
            # and only with test-time crops: center caches keep their hash
            **({"eval_views": [config.eval_views, config.eval_expand]} if config.eval_views != "center" else {}),
        }
    )[:16]


def draft_size(loaded: LoadedModel, config: ExtractConfig) -> int:
    """The shorter side JPEG decoding may reduce images to (`--draft`): the model's input size; 0 without it."""
    return max(image_size(loaded.preprocess_cfg)) if config.draft else 0


def augmented(config: ExtractConfig) -> bool:
    """Whether the cache holds augmented views (train views > 0 and train among the splits)."""
    return config.train_views > 0 and "train" in config.splits


def device_views_of(loaded: LoadedModel, config: ExtractConfig) -> DeviceAugment | None:
    """The augmentation split into draws and device pixels for `--augment-on device`; None for the worker path.

    Raises:
        BalladError: the augmentation has a step the device path does not run.
    """
    if config.augment_on != "device" or not augmented(config):
        return None
    try:
        return DeviceAugment(augment_of(loaded, config))
    except ValueError as exc:
        raise BalladError(
            f"{setting('augment_on', 'device')} cannot run {setting('augment', config.augment)}: {exc}; use "
            f"{setting('augment_on', 'worker')}"
        ) from None


def refuse_other_finished_cache(
    out: Path,
    fingerprint: str,
    config: ExtractConfig,
    made_of: dict[str, Any] | None = None,
) -> None:
    """A finished cache in `out` made with other settings is recomputed only with `config.overwrite`.

    `made_of`: what this run's cache is made of besides `config` (`dataset`, `model` provenance, `templates`), so a
    refusal names those too.

    Raises:
        BalladError: `out` holds a finished cache of another fingerprint; names each setting that differs with both
            values.
    """
    path = out / MANIFEST
    if config.overwrite or not path.exists():
        return
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # an unreadable manifest is an unfinished cache: its shards are checked one by one
    if not isinstance(manifest, dict) or manifest.get("config_fingerprint") == fingerprint:
        return
    recorded = manifest.get("config")
    old: dict[str, Any] = recorded if isinstance(recorded, dict) else {}
    new = json.loads(json.dumps(_recorded_config(config)))
    changed = [f"{k} {old[k]!r} -> {v!r}" for k, v in new.items() if k in old and old[k] != v]
    if "augment_on" not in old and config.augment_on != "worker" and augmented(config):
        changed.append("augment_on worker (made before the option) -> device")
    if "eval_views" not in old and config.eval_views != "center":
        changed.append(f"eval_views center (made before the option) -> {config.eval_views!r}")
    for key, value in (made_of or {}).items():
        before = manifest.get(key)
        if key == "model" and isinstance(before, dict) and isinstance(value, dict):
            before = f"{before.get('name')} (weights {str(before.get('checkpoint_sha256'))[:12]})"
            value = f"{value.get('name')} (weights {str(value.get('checkpoint_sha256'))[:12]})"
        if before is not None and before != value:
            if isinstance(value, list) and (len(value) > 3 or len(before) > 3):  # a long prompt set: its size
                changed.append(f"{key} ({len(before)}) -> ({len(value)}, others)")
            else:
                changed.append(f"{key} {before!r} -> {value!r}")
    what = ", ".join(changed) or "another dataset, model or templates"
    raise BalladError(
        f"{out} is a finished cache made with other settings ({what}); pass {setting('overwrite', True)} to "
        "recompute it, or "
        "its own settings to keep it"
    )


def _recorded_config(config: ExtractConfig) -> dict[str, Any]:
    """The settings a manifest records (not how the work was spread: workers, batch size, overwrite)."""
    return {k: v for k, v in asdict(config).items() if k not in ("workers", "overwrite", "batch_size")}


def extract_split(
    dataset: LTDataset,
    split: str,
    encoder: Callable[[torch.Tensor], np.ndarray],
    loaded: LoadedModel,
    out: Path,
    config: ExtractConfig,
    fingerprint: str,
    dist: DistContext,
    progress: Progress,
    device_views: DeviceAugment | None = None,
) -> tuple[int, int]:
    """Encode this rank's unfinished shards of `split` (augmented views made on the device by `device_views` when
    given, see `device_views_of`); returns (shards computed, shards skipped as done)."""
    image_split = dataset.split(split)
    views, crops = views_of(config, split)
    rows = split_rows(len(image_split), views, crops)
    num_shards = shard_count(len(rows), config.shard_size)
    todo, done, other = [], 0, 0
    for s in range(dist.rank, num_shards, dist.world_size):
        if not config.overwrite and read_shard_entry(out, split, s, fingerprint) is not None:
            done += 1
        else:
            todo.append(s)
            other += int(not config.overwrite and (out / shard_name(split, s)).exists())
    if other:  # never replaced silently
        hint = ""
        if config.augment_on == "device" and augmented(config):
            hint = (
                " (shards with views made before they moved to the device resume with "
                f"{setting('augment_on', 'worker')})"
            )
        progress.log(
            f"{split}: {other} finished shard(s) in {out} were made with other settings and are recomputed{hint}"
        )
    if not todo:
        return 0, done
    if len(rows) == 0:  # an empty split still gets its (empty) shard, so the manifest can list it
        ShardWriter(out, split, 0, 0, loaded.embed_dim, fingerprint, config.dtype).close()
        return 1, done
    shard_rows = [rows[s * config.shard_size : (s + 1) * config.shard_size] for s in todo]
    reader = ImageRows(
        image_split,
        np.concatenate(shard_rows),
        loaded.preprocess_eval,
        augment_of(loaded, config),
        seed=config.seed,
        max_pixels=config.max_pixels,
        draft=draft_size(loaded, config),
        device_views=device_views if views else None,
        crop_views=crop_views(config.eval_views, loaded.preprocess_cfg, config.eval_expand) if crops else None,
    )
    # batches never cross a shard boundary, so a shard's rows are encoded in the same batches (and come out
    # bitwise the same) whichever rank computes it and whatever other shards it computes
    starts = np.concatenate([[0], np.cumsum([len(r) for r in shard_rows])])
    batches = [
        list(range(a, min(a + config.batch_size, int(end))))
        for begin, end in zip(starts[:-1], starts[1:], strict=True)
        for a in range(int(begin), int(end), config.batch_size)
    ]
    # each image is decoded once for all its views in a batch (K + 1 rows of a train image from one decode)
    device = getattr(encoder, "device", torch.device("cpu"))
    loader = grouped_loader(reader, batches, config.batch_size, config.workers, pin_memory=device.type == "cuda")
    dim = loaded.embed_dim
    progress.start(f"extract {split} rows", len(reader))
    bounds = np.cumsum([len(r) for r in shard_rows])
    shard_i, written, writer = 0, 0, None
    t0 = time.perf_counter()
    try:
        for batch in loader:
            keep = usable_rows(batch, config.skip_bad)
            feats = encoder(assemble(batch, reader.device_views, device))
            n, pos = len(feats), 0
            while pos < n:
                if writer is None:
                    writer = ShardWriter(
                        out, split, todo[shard_i], len(shard_rows[shard_i]), dim, fingerprint, config.dtype
                    )
                take = min(n - pos, int(bounds[shard_i]) - written)
                sl = slice(pos, pos + take)
                ok = keep[sl]
                writer.skipped += [skipped_row(batch, pos + i) for i in np.flatnonzero(~ok)]
                writer.write(
                    feats[sl][ok],
                    batch["label"][sl].numpy()[ok],
                    batch["index"][sl].numpy()[ok],
                    batch["view"][sl].numpy()[ok],
                    [p for p, k in zip(batch["path"][sl], ok, strict=True) if k],
                )
                pos += take
                written += take
                if written == bounds[shard_i]:
                    writer.close()
                    writer, shard_i = None, shard_i + 1
            progress.advance(n, rows_per_s=f"{written / max(time.perf_counter() - t0, 1e-9):.0f}")
    except BaseException as exc:
        target = writer.final if writer is not None else out
        if writer is not None:
            writer.abort()
        disk = disk_error(exc, target)
        if disk is not None:
            raise disk from exc
        raise
    return len(todo), done


def extract_features(
    dataset: LTDataset,
    loaded: LoadedModel,
    out: str | Path,
    config: ExtractConfig,
    device: torch.device,
    dist: DistContext | None = None,
    progress: Progress | None = None,
    encoder: Callable[[torch.Tensor], np.ndarray] | None = None,
) -> dict[str, Any] | None:
    """Build (or finish) a feature cache in `out`; returns the manifest on rank 0, None on other ranks.

    Args:
        dataset: the images.
        loaded: the frozen model, with its transforms and tokenizer.
        out: the cache folder.
        config: what to extract.
        device: where the encoder runs.
        dist: this process's rank; one process when None.
        progress: progress sink.
        encoder: replaces `ImageEncoder(loaded.model, device, config.precision)` (benchmarks, tests).

    The cache records (and fingerprints) the precision that runs on `device` (`effective_precision`): bf16 on a GPU
    without bfloat16 runs, and is recorded, as fp32, which is said in one line.
    """
    config = resolve_splits(config, dataset)
    device_views = device_views_of(loaded, config)  # refuses what the device cannot run before anything is written
    dist = dist or DistContext()
    progress = progress or NullProgress()
    ran = effective_precision(device, config.precision)
    if ran != config.precision:
        progress.log(
            f"{setting('precision', config.precision)} cannot run on {device}; extracting in {ran} (the cache says "
            f"{ran})"
        )
        config = replace(config, precision=ran)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    templates = templates_of(dataset, config)
    fingerprint = config_fingerprint(dataset, loaded, config, templates)
    made_of = {"dataset": dataset.name, "model": loaded.provenance(), "templates": templates}
    refuse_other_finished_cache(out, fingerprint, config, made_of)
    if dist.is_main:
        remove_stale_temps(out)
        (out / MANIFEST).unlink(missing_ok=True)  # the cache is incomplete until the new manifest lands
    dist.barrier()
    encoder = encoder or ImageEncoder(loaded.model, device, config.precision)
    stats = {}
    for split in config.splits:
        stats[split] = extract_split(
            dataset, split, encoder, loaded, out, config, fingerprint, dist, progress, device_views
        )
    if dist.is_main:
        bank = PromptBank(loaded, dataset.classnames, templates)
        with torch.inference_mode():
            per_template = bank.encode(loaded.model.to(device), per_template=True).float().cpu()
        class_emb = torch.nn.functional.normalize(per_template.mean(dim=1), dim=-1)
        head, source = loaded.class_head, "prompts"
        if head is not None and head.classnames == list(dataset.classnames):
            class_emb, source = head.weight, "phase-a cosine head"  # every phase-B head builds on what phase A learned
            progress.log("class embeddings: the model's phase-A cosine head (the prompts' kept per template)")
        elif head is not None:
            progress.log(
                f"the model's phase-A cosine head was trained on other classes than {dataset.name}'s; "
                "class embeddings: the prompts"
            )
        text_entry = write_text_embeddings(out, class_emb, per_template, dataset.classnames, templates)
        text_entry["class_embeddings"] = source
    dist.barrier()
    if not dist.is_main:
        return None
    for split, (computed, reused) in stats.items():
        progress.log(f"{split}: {computed} shard(s) computed, {reused} already complete")
    return _finish_manifest(dataset, loaded, out, config, fingerprint, templates, text_entry)


def _finish_manifest(
    dataset: LTDataset,
    loaded: LoadedModel,
    out: Path,
    config: ExtractConfig,
    fingerprint: str,
    templates: list[str],
    text_entry: dict[str, Any],
) -> dict[str, Any]:
    import open_clip

    splits: dict[str, Any] = {}
    skipped: list[dict[str, Any]] = []
    seen: set[tuple[str, int]] = set()
    for split in config.splits:
        views, crops = views_of(config, split)
        n_rows = len(dataset.split(split)) * (views + 1 + crops)
        entries = []
        for s in range(shard_count(n_rows, config.shard_size)):
            entry = read_shard_entry(out, split, s, fingerprint)
            if entry is None:
                raise BalladError(f"shard {out / shard_name(split, s)} did not complete; rerun extract-features")
            for e in entry.pop("skipped"):  # an image with K views fails K + 1 times: list it once
                if (split, e["index"]) not in seen:
                    seen.add((split, e["index"]))
                    skipped.append({**e, "split": split})
            entries.append(entry)
        splits[split] = {
            "images": len(dataset.split(split)),
            "views": views + 1 + crops,
            "rows": sum(e["rows"] for e in entries),
            "shards": entries,
        }
    train_counts = dataset.class_counts("train") if "train" in dataset.splits else np.zeros(0, np.int64)
    if "train" in config.splits:  # count the images the cache holds: skipped ones are not there
        dropped = [e["index"] for e in skipped if e["split"] == "train"]
        train_labels = dataset.split("train").labels
        train_counts = train_counts - np.bincount(train_labels[dropped], minlength=len(train_counts))
    body = {
        "dataset": dataset.name,
        "model": loaded.provenance(),
        "preprocess": {
            "eval": repr(loaded.preprocess_eval),
            "train": repr(augment_of(loaded, config)),
            "cfg": loaded.preprocess_cfg,
        },
        "embed_dim": loaded.embed_dim,
        "dtype": config.dtype,
        "normalized": True,
        # the test-time crops val and test hold beside view 0 (`FeatureCache.eval_split`)
        "eval_views": {
            "name": config.eval_views,
            "crops": EVAL_VIEWS.get(config.eval_views),
            "expand": config.eval_expand,
        },
        "classnames": dataset.classnames,
        "templates": templates,
        "text": text_entry,
        "splits": splits,
        "train_class_counts": train_counts.tolist(),
        "skipped": skipped,
        "config": _recorded_config(config),
        "config_fingerprint": fingerprint,
        "versions": {
            "ballad": __version__,
            "torch": torch.__version__,
            "open_clip": open_clip.__version__,
            "python": platform.python_version(),
        },
    }
    return write_manifest(out, body)


def run_extract(
    data: str,
    model: str,
    pretrained: str | None,
    out: str | Path,
    config: ExtractConfig,
    device: torch.device,
    progress: Progress | None = None,
) -> dict[str, Any] | None:
    """`ballad extract-features`: under torchrun or alone, lock the cache folder (one lock per rank), load the
    dataset and model, write `config.json` and extract. Returns the manifest on rank 0, None on the others."""
    from ..distributed import distributed
    from ..inputs.datasets import load_dataset
    from ..models.clip import load_model

    with distributed(device) as (dist, dev), cache_folder(out, dist.rank, dist.is_main) as folder:
        dataset = load_dataset(data)
        config = resolve_splits(config, dataset)
        loaded = load_model(model, pretrained)
        folder.write_config(config, data=data, model=model, pretrained=pretrained)
        return extract_features(dataset, loaded, out, config, dev, dist, progress)
