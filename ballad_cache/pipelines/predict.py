"""Classifying images with an exported classifier: inputs resolved to an image list, batched decode and encode,
top-k predictions written as CSV or JSON lines."""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import write_bytes
from ..errors import BalladError, setting
from ..heads.metrics import classification_report, summary
from ..inputs.datasets import IMAGE_SUFFIXES, ImageSplit, read_lines
from ..inputs.longtail import ShotThresholds
from ..inputs.reader import ImageRows, grouped_loader, skipped_row, usable_rows
from ..inputs.transforms import crop_views
from ..models.encoder import autocast
from ..progress import NullProgress, Progress
from .configs import PLOTTED_PREDICTIONS, PredictConfig
from .export import Classifier


def run_predict(
    model: str,
    out: str | Path,
    config: PredictConfig,
    inputs: list[str] | None = None,
    data: str | None = None,
    adapter: str | Path | None = None,
    pretrained: str | None = None,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    overwrite: bool = False,
    plot: str | Path | None = None,
) -> Predictions:
    """`ballad predict`: check `out` can be written (an existing file is replaced only with `overwrite`), collect
    the images (`inputs`, or split `config.split` of dataset `data`), load the classifier, classify and write the
    predictions (and, with `plot`, a PNG grid of the first of them).

    Raises:
        ValueError: both or neither of `inputs` and `data`.
        BalladError: an unwritable `out`, missing inputs, a model that is no export (and no adapter).
    """
    from ..inputs.datasets import load_dataset
    from ..store.runs import check_writable
    from .export import load_classifier

    if bool(inputs) == bool(data):
        raise ValueError("give image paths or a dataset (one of them)")
    stream = to_stdout(out)
    if not stream:
        check_writable(out)
    if not stream and Path(out).exists() and not overwrite:
        raise BalladError(f"{out} already exists; pass {setting('overwrite', True)} or pick another {setting('out')}")
    if plot is not None:
        check_writable(plot)
        if Path(plot).suffix.lower() != ".png":
            raise BalladError(f"{plot}: the prediction grid is a PNG; name it .png")
        if Path(plot).exists() and not overwrite:
            raise BalladError(
                f"{plot} already exists; pass {setting('overwrite', True)} or pick another {setting('plot')}"
            )
    if Path(out).suffix in (".json", ".jsonl") and config.format == "csv":
        raise BalladError(
            f"{out} names JSON lines but {setting('format', 'csv')}; pass {setting('format', 'jsonl')} or a .csv name"
        )
    images = load_dataset(data).split(config.split) if data else collect_images(list(inputs or []))
    classifier = load_classifier(model, adapter, pretrained)
    result = predict_split(classifier, images, config, torch.device(device), progress)
    write_predictions(result, out, config.format, config.top_k)
    if plot is not None and result.rows:  # every image skipped: nothing to draw
        plot_predictions(result, images, plot)
    return result


def plot_predictions(
    predictions: Predictions, images: ImageSplit, path: str | Path, limit: int = PLOTTED_PREDICTIONS
) -> Path:
    """Draw the first `limit` classified images with their predicted class (and true class, green when right, red
    when wrong, where the images have labels) as one PNG."""
    from .plots import plot_prediction_grid

    rows = predictions.rows[:limit]
    return plot_prediction_grid(
        [images.load(r["index"]) for r in rows],
        [r["pred_name"] for r in rows],
        [r.get("label_name") for r in rows],
        path,
    )


def collect_images(inputs: list[str]) -> ImageSplit:
    """Image files, folders (searched recursively, sorted) and text files of paths (one per line, relative to the
    text file's folder unless absolute) as one unlabelled split.

    Raises:
        BalladError: an input that does not exist, or no image found.
    """
    files: list[str] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            files += [str(p) for p in sorted(path.rglob("*")) if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES]
        elif path.suffix.lower() == ".txt" and path.is_file():
            files += [str(p if Path(p).is_absolute() else path.parent / p) for p in read_lines(path)]
        elif path.is_file() or path.suffix.lower() in IMAGE_SUFFIXES:
            files.append(str(path))  # a missing image file is reported when it is read, with its path
        else:
            raise BalladError(f"{path} does not exist; give image files, folders or a .txt list of paths")
    if not files:
        raise BalladError(f"no images found in {', '.join(inputs)} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return ImageSplit("inputs", np.full(len(files), -1, dtype=np.int64), files, files=files)


@dataclass
class Predictions:
    """Per-image predictions (input order) and, when the inputs carry labels, a report."""

    rows: list[dict[str, Any]]
    report: dict[str, Any] | None
    images_per_s: float
    skipped: list[dict[str, Any]]

    def in_order(self) -> list[tuple[dict[str, Any], bool]]:
        """Every input in input order: (its prediction, False) or (its skipped record, True)."""
        merged = [(r, False) for r in self.rows] + [(s, True) for s in self.skipped]
        return sorted(merged, key=lambda item: int(item[0].get("index", 0)))


def predict_split(
    classifier: Classifier,
    split: ImageSplit,
    config: PredictConfig,
    device: torch.device,
    progress: Progress | None = None,
) -> Predictions:
    """Classify every image of `split`; labels (>= 0) add `label`, `label_name`, `correct` and a report.

    Raises:
        BalladError: the first unreadable image (path and index), unless `config.skip_bad`.
    """
    progress = progress or NullProgress()
    model = classifier.loaded.model.eval().to(device)
    views = classifier.meta.get("eval_views", {"name": "center", "crops": 0})
    crops = int(views.get("crops", 0))
    # one row per image (view 0), or its test-time crops -1..-V, decoded once and scored by their mean logits
    codes = -np.arange(1, crops + 1) if crops else np.zeros(1, dtype=np.int64)
    per = len(codes)
    rows = np.stack([np.repeat(np.arange(len(split)), per), np.tile(codes, len(split))], axis=1).astype(np.int64)
    reader = ImageRows(
        split,
        rows,
        classifier.loaded.preprocess_eval,
        max_pixels=config.max_pixels,
        crop_views=crop_views(views["name"], classifier.loaded.preprocess_cfg, int(views["expand"])) if crops else None,
    )
    starts = range(0, len(split), config.batch_size)
    batches = [list(range(a * per, min(a + config.batch_size, len(split)) * per)) for a in starts]
    loader = grouped_loader(reader, batches, config.batch_size, config.workers, pin_memory=device.type == "cuda")
    k = min(config.top_k, len(classifier.classnames))
    names = classifier.classnames
    labelled = bool(len(split)) and bool((split.labels >= 0).all())
    out: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    all_logits, all_labels = [], []
    progress.start("predict", len(split))
    t0, done = time.perf_counter(), 0
    for batch in loader:
        ok = usable_rows(batch, config.skip_bad)  # an unreadable image fails in each of its rows
        keep = ok[::per]
        first = {k: v[::per] for k, v in batch.items() if k in ("label", "index", "error", "path")}
        for i in np.flatnonzero(~keep):
            skipped.append(skipped_row(first, i))
        if not keep.any():  # every image of the batch was skipped: nothing to encode
            done += len(keep)
            progress.advance(len(keep))
            continue
        with torch.inference_mode(), autocast(device, config.precision):
            feats = model.encode_image(batch["image"][torch.from_numpy(ok)].to(device, non_blocking=True))
        # the head's scoring path, as evaluate's: the mean logits of an image's crops (image-major rows here)
        scores = classifier.score(feats.float(), config.tau)
        logits = scores.reshape(-1, per, scores.shape[1]).mean(dim=1) if per > 1 else scores
        batch = first
        probs = logits.softmax(dim=1)
        top = probs.topk(k, dim=1)
        top_p, top_i = top.values.cpu().numpy(), top.indices.cpu().numpy()
        for j, i in enumerate(np.flatnonzero(keep)):
            row: dict[str, Any] = {
                "index": int(batch["index"][i]),  # input position: skipped rows are written in their place
                "path": batch["path"][i],
                "pred": int(top_i[j, 0]),
                "pred_name": names[top_i[j, 0]],
                "prob": float(top_p[j, 0]),
                "top_k": [(names[c], float(p)) for c, p in zip(top_i[j], top_p[j], strict=True)],
            }
            if labelled:
                label = int(batch["label"][i])
                row.update(label=label, label_name=names[label], correct=int(top_i[j, 0] == label))
            out.append(row)
        if labelled:
            all_logits.append(logits.cpu())
            all_labels.append(batch["label"][torch.from_numpy(keep)])
        done += len(keep)
        progress.advance(len(keep), images_per_s=f"{done / max(time.perf_counter() - t0, 1e-9):.0f}")
    rate = done / max(time.perf_counter() - t0, 1e-9)
    report = None
    if labelled and all_logits:
        counts = np.asarray(classifier.meta.get("train_class_counts", [0] * len(names)), dtype=np.int64)
        thresholds = ShotThresholds(**classifier.meta.get("shot_thresholds", {}))
        report = summary(classification_report(torch.cat(all_logits), torch.cat(all_labels), counts, thresholds))
    return Predictions(out, report, rate, skipped)


STDOUT = "-"  # `--out -` (or /dev/stdout): the predictions go to standard output


def to_stdout(out: str | Path) -> bool:
    """Whether `out` names standard output: `-` or `/dev/stdout`."""
    return str(out) in (STDOUT, "/dev/stdout")


def _write_stdout(path: Path, data: bytes) -> None:
    """`write_bytes` for `--out -`: the bytes to standard output; a reader that stops early (`| head`) ends the
    output, not the run."""
    try:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more reaches the closed pipe


def write_predictions(predictions: Predictions, path: str | Path, fmt: str = "csv", top_k: int = 5) -> Path:
    """Write predictions atomically as CSV (`path, pred, pred_name, prob, top1_name, top1_prob, ...` and, with
    labels, `label, label_name, correct`) or JSON lines, to standard output when `path` is `-`; skipped images get
    their reason and no prediction.

    A path that is not valid UTF-8 is written as its raw bytes in CSV (read it back with
    `errors="surrogateescape"`) and as `\\udcXX` escapes in JSON lines (json.loads gives the same str back)."""
    path = Path(path)
    emit = _write_stdout if to_stdout(path) else write_bytes
    if fmt == "jsonl":
        lines = [
            json.dumps({"path": r["path"], "skipped": r["reason"]})
            if skipped
            else json.dumps({k: v for k, v in r.items() if k != "index"})
            for r, skipped in predictions.in_order()
        ]
        emit(path, ("\n".join(lines) + "\n").encode())
        return path
    if fmt != "csv":
        raise ValueError("format must be csv or jsonl")
    labelled = bool(predictions.rows) and "label" in predictions.rows[0]
    k = max((len(r["top_k"]) for r in predictions.rows), default=top_k)
    header = ["path", "pred", "pred_name", "prob"]
    header += [f"top{i + 1}_{part}" for i in range(k) for part in ("name", "prob")]
    header += ["label", "label_name", "correct"] if labelled else []
    header += ["skipped"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    for r, skipped in predictions.in_order():
        if skipped:
            w.writerow([r["path"], "", "", "", *([""] * (2 * k)), *([""] * (3 if labelled else 0)), r["reason"]])
            continue
        tops = [v for name, p in r["top_k"] for v in (name, f"{p:.6f}")]
        extra = [r["label"], r["label_name"], r["correct"]] if labelled else []
        w.writerow([r["path"], r["pred"], r["pred_name"], f"{r['prob']:.6f}", *tops, *extra, ""])
    # a file name that is not valid UTF-8 arrives as str with surrogate escapes (os.fsdecode); it is written back
    # as its original bytes, so the CSV holds the name exactly as the file system does
    emit(path, buf.getvalue().encode("utf-8", errors="surrogateescape"))
    return path
