"""Phase A: tune CLIP on the long-tailed train split (BALLAD's first phase; LIFT's with a method other than full).

    logits = scale * norm(image_features) · class_embeddingsᵀ,   cross-entropy (or logit-adjusted, --loss la)

What trains, the classifier and saving are `phase_a.py` (`prepare`, `PhaseANet`, `save`); this module runs the
epochs: the batch order, the schedule, checkpoints and resume, validation and the choice of the kept model.
The epoch order comes from a generator seeded by (seed, epoch) and augmentations are seeded per image, so a
resumed run replays exactly the batches an uninterrupted one would, and N ranks with per-rank batch B/N see
together the same batches as one process with batch B.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Sampler

from ..atomic import LOCK_FILE, append_jsonl, remove_stale_temps, write_json
from ..distributed import DistContext
from ..errors import BalladError, setting
from ..heads.metrics import classification_report, summary
from ..heads.terms import LOGIT_SCALE
from ..inputs.datasets import LTDataset
from ..inputs.longtail import ShotThresholds, unseen_classes
from ..inputs.reader import ImageRows, make_loader, skipped_row, usable_rows
from ..inputs.transforms import train_transform
from ..models.clip import ClipModel, LoadedModel, PromptBank
from ..models.encoder import autocast, effective_precision
from ..options import DEFAULT_MAX_PIXELS
from ..progress import NullProgress, Progress
from ..schedules import SCHEDULES, batches_per_epoch
from ..store.runs import SUMMARY, RunFolder
from ..tracking import Tracker, report_metrics
from .configs import FINETUNE_PRECISIONS, OPTIMIZERS, PHASE_A_LOSSES, FinetuneConfig, Reporting
from .phase_a import TrainState, prepare, save, trainable_count

CHECKPOINT = "checkpoint.pt"


FINISHED = (SUMMARY, CHECKPOINT, "model")


def run_folder(out: str | Path, overwrite: bool = False, resume: bool = False, main: bool = True) -> RunFolder:
    """The run folder of `finetune`: a folder with a checkpoint or a model is continued only with `resume` and
    replaced only with `overwrite`; rank 0 prepares and locks it."""
    return RunFolder(
        out, "finetune", FINISHED, overwrite=overwrite, resume=resume, main=main, lock=LOCK_FILE if main else None
    )


class EpochSampler(Sampler[int]):
    """A permutation of the split seeded by (seed, epoch), interleaved over ranks, optionally started mid-way.

    Rank r takes positions r, r+N, ...; with per-rank batch B/N, step s of all ranks covers positions
    [sB, (s+1)B) of the permutation: exactly the batch of one process with batch B.
    """

    def __init__(self, size: int, seed: int, epoch: int, rank: int = 0, world: int = 1, start: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(size, generator=gen)
        usable = size - size % world  # drop the tail so every rank runs the same number of steps
        self.indices = perm[:usable][rank::world][start:].tolist()

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` widened to float32 when it is narrower (float16, bfloat16), otherwise unchanged.

    The loss and the val scores of a float16/bfloat16 forward are computed in float32, as the official code's
    `.float()` does; a plain `.float()` would also narrow a float64 model's features to float32, and then the
    float64 run that checks phase A against the official loop (tests/pipelines/test_phase_a_reference.py) could
    not be compared at float64 precision.
    """
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


def phase_a_loss(
    image: torch.Tensor,
    classes: torch.Tensor,
    labels: torch.Tensor,
    kind: str,
    scale: float = LOGIT_SCALE,
    adjust: torch.Tensor | None = None,
) -> torch.Tensor:
    """The phase-A loss registered as `kind` (`PHASE_A_LOSSES`): `ce` or `la` over all classes, or `contrastive`;
    `adjust` is `la`'s tau · log prior."""
    return PHASE_A_LOSSES.get(kind)(image, classes, labels, scale, adjust)


def lr_at(config: FinetuneConfig, step: int, total: int, epoch: int, base: float | None = None) -> float:
    """Learning rate of optimizer step `step` (of `total`) in 0-based `epoch` for a group whose peak is `base`
    (default `config.lr`): linear warm-up over the first `warmup_steps`, then the schedule (`SCHEDULES`): the
    official per-epoch cosine, LIFT's `epoch-end`, or with `step` a cosine over the steps after the warm-up."""
    peak = config.lr if base is None else base
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    schedule = SCHEDULES.get(config.schedule)
    return schedule(peak, step - config.warmup_steps, max(total - config.warmup_steps, 1), epoch, config.epochs)


@torch.inference_mode()
def evaluate_model(
    model: ClipModel,
    loaded: LoadedModel,
    dataset: LTDataset,
    split: str,
    prompts: PromptBank,
    device: torch.device,
    batch_size: int,
    workers: int,
    precision: str = "fp32",
    skip_bad: bool = False,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    classes: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Accuracy of `model` on a split, scored against the class prompts (or `classes`, a cosine head's normalised
    rows): top-1/top-5 and many/medium/few.

    Raises:
        BalladError: an unreadable image (path and index), unless `skip_bad`: then it is left out of the scores
            and counted under `skipped`.
    """
    was_training = model.training
    model.eval()
    image_split = dataset.split(split)
    rows = np.stack([np.arange(len(image_split)), np.zeros(len(image_split), dtype=np.int64)], axis=1)
    loader = make_loader(
        ImageRows(image_split, rows, loaded.preprocess_eval, max_pixels=max_pixels), batch_size, workers
    )
    if classes is not None:
        text = at_least_float32(classes.detach())
    else:
        with autocast(device, precision, FINETUNE_PRECISIONS):
            text = at_least_float32(prompts.encode(model))
    logits, labels, skipped = [], [], 0
    for batch in loader:
        keep = torch.from_numpy(usable_rows(batch, skip_bad))
        skipped += int((~keep).sum())
        with autocast(device, precision, FINETUNE_PRECISIONS):
            feats = model.encode_image(batch["image"][keep].to(device, non_blocking=True))
        logits.append(LOGIT_SCALE * F.normalize(at_least_float32(feats), dim=-1) @ text.T)
        labels.append(batch["label"][keep])
    model.train(was_training)
    report = classification_report(
        torch.cat(logits).cpu(), torch.cat(labels), dataset.class_counts("train"), ShotThresholds()
    )
    return {**summary(report), **({"skipped": skipped} if skipped else {})}


def _start_report(metrics: Path) -> dict[str, Any] | None:
    """The val report before training, as the run that wrote `metrics.jsonl` logged it (epoch 0), or None."""
    if not metrics.is_file():
        return None
    for line in metrics.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("epoch") == 0 and "val" in record:
            return dict(record["val"])
    return None


def finetune(
    dataset: LTDataset,
    loaded: LoadedModel,
    out: str | Path,
    config: FinetuneConfig,
    device: torch.device,
    dist: DistContext | None = None,
    resume: bool = False,
    progress: Progress | None = None,
    report: Reporting | None = None,
) -> dict[str, Any]:
    """Run phase A; writes `model/` (best on val), `model-last/`, `checkpoint.pt`, `metrics.jsonl`.

    `config.max_steps` stops the run (the schedule is the whole run's). A stop inside an epoch checkpoints that
    epoch and batch, so `resume` continues there and ends with the weights of an uninterrupted run; its val report
    is logged (`"stopped": true` in `metrics.jsonl`) but never competes for `model/`, except when no epoch has
    finished: then `model/` holds the weights at the stop, and the summary's best is theirs.

    Returns:
        `{"best_val_top1", "best_epoch", "start": val summary before training, "steps", "stopped": where
        `max_steps` stopped inside an epoch (epoch, batch, val) or None, ...}`.
    """
    dist = dist or DistContext()
    progress = progress or NullProgress()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:  # temporaries of a killed run (checkpoint, model files) are never resumed from
        remove_stale_temps(out, out / "model", out / "model-last")
    if config.batch_size % dist.world_size:
        raise BalladError(
            f"{setting('batch_size', config.batch_size)} must be divisible by the {dist.world_size} ranks"
        )
    torch.manual_seed(config.seed)
    phase_net, groups, base = prepare(loaded, dataset, config, device)
    model, prompts, templates = phase_net.model, phase_net.prompts, phase_net.prompts.templates
    augment = train_transform(config.augment, loaded.preprocess_cfg, loaded.preprocess_train)
    net: torch.nn.Module = phase_net
    if dist.enabled:
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
    fused = device.type == "cuda"  # one multi-tensor kernel per step instead of a launch per parameter
    opt = OPTIMIZERS.get(config.optimizer)(groups, config, fused)
    counts = trainable_count(phase_net)

    def save_model(folder: Path) -> None:
        save(phase_net, loaded, folder, config, dataset.classnames, base)

    if config.idle_reason() and dist.is_main:
        progress.log(f"warning: this phase A trains nothing: {config.idle_reason()}")
    ran = effective_precision(device, config.precision, FINETUNE_PRECISIONS)
    if ran != config.precision and dist.is_main:  # bf16 on a GPU without bfloat16
        progress.log(f"warning: {setting('precision', config.precision)} cannot run on {device}; phase A runs {ran}")
    train = dataset.split("train")
    per_rank = config.batch_size // dist.world_size
    usable = len(train) - len(train) % dist.world_size
    # usable and batch_size are both multiples of the ranks: the global count is each rank's count
    epoch_batches = batches_per_epoch(usable, config.batch_size, config.keep_last_batch, config.epochs)
    steps_per_epoch = math.ceil(epoch_batches / config.accum_steps)
    # the schedule spans every epoch: `max_steps` stops the run, it does not shorten the schedule, so a run stopped
    # by it and resumed takes the steps an uninterrupted run takes
    total_steps = steps_per_epoch * config.epochs
    has_val = "val" in dataset.splits
    start_epoch, batch_offset, step, best, best_epoch, start_report = 0, 0, 0, -1.0, -1, None
    rng_state: torch.Tensor | None = None  # the global generator at the checkpoint resumed from (dropout draws)
    ckpt_path = out / CHECKPOINT

    def validate() -> dict[str, Any]:
        return evaluate_model(
            model,
            loaded,
            dataset,
            "val",
            prompts,
            device,
            per_rank * 2,
            config.workers,
            config.precision,
            config.skip_bad,
            config.max_pixels,
            classes=phase_net.classes() if phase_net.head is not None else None,
        )

    resumed = resume and ckpt_path.exists()
    if resumed:
        state = TrainState.restore(ckpt_path, phase_net, opt, config, device)
        start_epoch, batch_offset, step = state.epoch, state.batch_in_epoch, state.step
        best, best_epoch, rng_state = state.best, state.best_epoch, state.rng
        progress.log(f"resumed from {ckpt_path}: epoch {start_epoch + 1}, batch {batch_offset}, step {step}")
        start_report = _start_report(out / "metrics.jsonl")
    elif has_val:
        if dist.is_main and (unseen := unseen_classes(dataset.split("val").labels, dataset.classnames)):
            progress.log(unseen)
        start_report = validate()
        if dist.is_main:
            append_jsonl(out / "metrics.jsonl", {"epoch": 0, "step": 0, "val": start_report})
    if dist.is_main:
        towers = " and ".join(config.towers)
        progress.log(
            f"phase A: {config.method} on the {towers} tower{'s' if len(config.towers) > 1 else ''} trains "
            f"{counts['method']:,} parameters ({100.0 * counts['method'] / max(counts['image_tower'], 1):.2f}% as "
            "many as the image tower holds)"
            + (f" and a {counts['head']:,}-parameter cosine head" if counts["head"] else "")
        )

    # the viewers see what metrics.jsonl records (rank 0); a resumed run continues its curves after its step
    tracker = Tracker(
        report.report_to if report else (),
        out,
        report.run_name if report else None,
        {"command": "finetune", "data": dataset.name, "model": loaded.name, **asdict(config)},
        resume_step=step + 1 if resumed else None,
        progress=progress,
        main=dist.is_main,
    )
    if start_report is not None and not resumed:
        tracker.scalars(report_metrics("val", start_report), 0)

    def checkpoint(epoch: int, batch_in_epoch: int) -> None:
        if dist.is_main:
            TrainState(epoch, batch_in_epoch, step, best, best_epoch).save(ckpt_path, phase_net, opt, config, device)
        dist.barrier()

    with tracker:
        images_done, t0 = 0, time.perf_counter()
        skipped: dict[int, dict[str, Any]] = {}  # unreadable training images seen (with --skip-bad), by index
        stopped: dict[str, Any] | None = None  # where `max_steps` stopped the run inside an epoch
        for epoch in range(start_epoch, config.epochs):
            if config.max_steps and step >= config.max_steps:
                break
            sampler = EpochSampler(
                len(train), config.seed, epoch, dist.rank, dist.world_size, start=batch_offset * per_rank
            )
            rows = np.stack([np.arange(len(train)), np.ones(len(train), dtype=np.int64)], axis=1)
            reader = ImageRows(
                train,
                rows,
                loaded.preprocess_eval,
                augment,
                seed=config.seed * 1000 + epoch,
                max_pixels=config.max_pixels,
            )
            loader = make_loader(
                reader,
                per_rank,
                config.workers,
                pin_memory=device.type == "cuda",
                sampler=sampler,
                drop_last=not config.keep_last_batch,
            )
            progress.start(f"finetune epoch {epoch + 1}/{config.epochs}", len(loader))
            batch_i = batch_offset
            batch_offset = 0
            # the loss stays on the device and is read back every log_every batches: no host sync in between
            window_loss, window = torch.zeros((), device=device), 0
            # creating the iterator draws from the global generator: an epoch resumed at its start restores the state
            # before that draw, one resumed inside restores it after (the uninterrupted run drew it at the epoch start)
            if rng_state is not None and batch_i == 0:
                torch.set_rng_state(rng_state)
            batches = iter(loader)
            if rng_state is not None and batch_i > 0:
                torch.set_rng_state(rng_state)
            rng_state = None
            stop = False
            for batch in batches:
                keep_rows = usable_rows(batch, config.skip_bad)
                for i in np.flatnonzero(~keep_rows):
                    row = skipped_row(batch, i)
                    skipped[row["index"]] = row
                keep = torch.from_numpy(keep_rows)
                images = batch["image"][keep].to(device, non_blocking=True)
                labels = batch["label"][keep].to(device, non_blocking=True)
                for g in opt.param_groups:
                    g["lr"] = lr_at(config, step, total_steps, epoch, g.get("base_lr"))
                with autocast(device, config.precision, FINETUNE_PRECISIONS):
                    image_feats, text_feats = net(images)
                    loss = phase_a_loss(
                        at_least_float32(image_feats),
                        at_least_float32(text_feats),
                        labels,
                        config.loss,
                        phase_net.scale,
                        phase_net.adjust,
                    )
                (loss / config.accum_steps).backward()
                batch_i += 1
                if batch_i % config.accum_steps == 0 or batch_i == epoch_batches:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    if config.checkpoint_every and step % config.checkpoint_every == 0 and batch_i < epoch_batches:
                        checkpoint(epoch, batch_i)
                images_done += len(labels) * dist.world_size
                window_loss += loss.detach()
                window += 1
                stop = bool(config.max_steps and step >= config.max_steps)
                if window == config.log_every or batch_i == epoch_batches or stop:
                    mean_loss = float(window_loss.item()) / window
                    if not math.isfinite(mean_loss):  # nothing after a NaN step is worth keeping: stop, say where
                        kept = f"; {out / 'model-last'} holds the last finished epoch" if epoch > start_epoch else ""
                        raise BalladError(
                            f"phase A diverged: the loss is {mean_loss} at step {step} (epoch {epoch + 1}){kept}; "
                            f"rerun with a lower {setting('lr')}"
                            + (f" or {setting('precision', 'fp32')}" if config.precision != "fp32" else "")
                        )
                    rate = images_done / max(time.perf_counter() - t0, 1e-9)
                    lr = opt.param_groups[0]["lr"]
                    progress.advance(window, loss=f"{mean_loss:.3f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}")
                    if dist.is_main:
                        record_ = {"epoch": epoch + 1, "step": step, "loss": mean_loss, "lr": lr, "batches": window}
                        append_jsonl(out / "metrics.jsonl", record_)
                        tracker.scalars({"train/loss": mean_loss, "train/lr": lr, "train/images_per_s": rate}, step)
                    window_loss.zero_()
                    window = 0
                if stop:
                    break
            if stop and batch_i < epoch_batches:  # `max_steps` inside an epoch: a resume continues it at this batch
                checkpoint(epoch, batch_i)  # with the finished epochs' best: the val below never enters it
                stopped = {"epoch": epoch + 1, "batch": batch_i, "epoch_batches": epoch_batches, "step": step}
                if has_val:
                    stopped["val"] = validate()
                if dist.is_main:
                    append_jsonl(out / "metrics.jsonl", {**stopped, "stopped": True})
                    # under its own name: the val curve holds finished epochs only, as an uninterrupted run's
                    tracker.scalars(report_metrics("val_at_stop", stopped.get("val")), step)
                    save_model(out / "model-last")
                    if best_epoch < 0:  # no finished epoch kept a model: model/ holds the weights at the stop
                        save_model(out / "model")
                progress.log(
                    f"stopped by {setting('max_steps')} at step {step}, batch {batch_i}/{epoch_batches} of epoch "
                    f"{epoch + 1}; {setting('resume', True)} continues from there"
                )
                break
            record: dict[str, Any] = {
                "epoch": epoch + 1,
                "step": step,
                "images_per_s": images_done / (time.perf_counter() - t0),
                "skipped_images": len(skipped),
            }
            if has_val:
                record["val"] = validate()
                if record["val"]["top1"] > best:
                    best, best_epoch = record["val"]["top1"], epoch + 1
                    if dist.is_main:
                        save_model(out / "model")
            elif dist.is_main:
                save_model(out / "model")
            if dist.is_main:
                append_jsonl(out / "metrics.jsonl", record)
                tracker.scalars({**report_metrics("val", record.get("val")), "train/epoch": epoch + 1}, step)
                save_model(out / "model-last")
            checkpoint(epoch + 1, 0)
            progress.log(f"epoch {epoch + 1}: " + (f"val top1 {record['val']['top1']:.2f}" if has_val else "done"))
        if dist.is_main and not (out / "model").exists():
            save_model(out / "model")
            save_model(out / "model-last")
        if stopped is not None and best_epoch < 0 and "val" in stopped:  # what model/ holds: the weights at the stop
            best, best_epoch = stopped["val"]["top1"], stopped["epoch"]
        if dist.enabled:  # each rank saw its own share of the bad images
            shares: list[Any] = [None] * dist.world_size
            torch.distributed.all_gather_object(shares, skipped)
            skipped = {k: v for share in shares for k, v in share.items()}
        summary_ = {
            "start": start_report,
            "best_epoch": best_epoch,
            "best_val_top1": best,
            "steps": step,
            "stopped": stopped,
            "templates": templates,
            "skipped": [skipped[i] for i in sorted(skipped)],
            "random_weights": loaded.random_weights,
            "has_val": has_val,
            "method": config.method,
            "towers": config.towers,
            "classifier": config.classifier,
            "trainable": counts,
        }
        if stopped is None:  # a run stopped by max_steps is not over: its resumed run reports the summary
            tracker.summary({"val/best_top1": best, "best_epoch": best_epoch, "output": str(out)}, step)
    if dist.is_main:
        write_json(out / SUMMARY, summary_)
    return summary_


def run_finetune(
    data: str,
    model: str,
    pretrained: str | None,
    out: str | Path,
    config: FinetuneConfig,
    device: torch.device,
    resume: bool = False,
    overwrite: bool = False,
    progress: Progress | None = None,
    report: Reporting | None = None,
) -> dict[str, Any] | None:
    """`ballad finetune`: under torchrun or alone, prepare and lock the run folder (rank 0), load the dataset and
    model, write `config.json` and run phase A (reported to `report.report_to` as it goes). Returns the summary on
    rank 0, None on the others."""
    from ..distributed import distributed
    from ..inputs.datasets import load_dataset
    from ..models.clip import load_model
    from ..tracking import check_reporters

    check_reporters(report.report_to if report else ())

    with distributed(device) as (dist, dev):
        folder = run_folder(out, overwrite, resume, main=dist.is_main)
        folder.prepare()
        dist.barrier()
        dataset, loaded = load_dataset(data), load_model(model, pretrained)
        with folder:
            if not resume:
                folder.write_config(config, data=data, model=model, pretrained=pretrained)
            result = finetune(dataset, loaded, out, config, dev, dist, resume=resume, progress=progress, report=report)
        return result if dist.is_main else None
