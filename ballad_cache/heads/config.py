"""`AdapterConfig`: one phase-B configuration, its defaults the official code's; light to import (no torch), so the
CLI builds its options from it instantly."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import setting
from ..inputs.samplers import SAMPLERS, SAMPLES_PER_CLASS
from ..options import OptionError, check_options, option
from ..registry import PRECISIONS, SELECTIONS
from ..schedules import SCHEDULES
from . import families  # noqa: F401  (registers the built-in head families)
from .metrics import METRICS
from .registry import FAMILIES, HEADS
from .terms import LOSSES


@dataclass
class AdapterConfig:
    """One phase-B configuration; defaults are the official BALLAD code's (`config/ImageNet_LT/clip_B_rn50.yaml`,
    `train.py`), every other value an option. Each field's help, range and choices are its option's."""

    ratio: float = option(
        0.2,
        "Residual mix: ratio * W f + (1 - ratio) * f (official 0.2: BALLAD train.py line 204).",
        min=0.0,
        max=1.0,
    )
    sampler: str = option("class-aware", "Index stream over the training images.", choices=SAMPLERS)
    samples_per_class: int = option(
        SAMPLES_PER_CLASS,
        f"Consecutive draws per class visit (class-aware; official {SAMPLES_PER_CLASS}: "
        "BALLAD clip_B_rn50.yaml line 30).",
        min=1,
    )
    lr: float = option(
        0.2, "SGD learning rate (official 0.2, BALLAD config/ImageNet_LT/clip_B_rn50.yaml line 16).", min=0.0
    )
    momentum: float = option(0.9, "SGD momentum (official 0.9, clip_B_rn50.yaml line 16).", min=0.0)
    weight_decay: float = option(5e-4, "SGD weight decay (official 5e-4, clip_B_rn50.yaml line 16).", min=0.0)
    epochs: int = option(
        10, "Epochs of floor(N/B) batches, N training images (official 10: clip_B_rn50.yaml line 27).", min=0
    )
    batch_size: int = option(512, "Batch size (official 512: clip_B_rn50.yaml line 21).", min=1)
    schedule: str = option("epoch", "Learning-rate schedule.", choices=SCHEDULES)
    keep_last_batch: bool = option(
        False,
        "Keep each epoch's last partial batch (ceil(N/B) steps); official: floor(N/B) full batches.",
        flag="--keep-last-batch/--drop-last-batch",
        axis=False,
    )
    select: str = option("best-val", "Which epoch's weights are kept.", choices=SELECTIONS)
    loss: str = option("ce", "Training loss.", choices=LOSSES)
    la_tau: float = option(1.0, "Logit-adjustment strength of --loss la.")
    head: str = option(
        "text",
        "Classifier head family (each reads its own options; cosine with --ratio 0 trains its rows alone).",
        choices=HEADS,
    )
    head_scale: float = option(
        25.0, "Logit scale of the cosine head (LIFT: 25, shijxcs/LIFT utils/config.py line 30).", above=0.0
    )
    head_lr: float | None = option(
        None, "Learning rate of a learnable head (default: --lr; tip-f: 1e-3 with AdamW).", min=0.0
    )
    alpha: float = option(
        1.0,
        "Weight of a memory head's term beside the text head (tip: Tip-Adapter's alpha; gda, ncm: blend).",
        min=0.0,
        max=1e6,
    )
    beta: float = option(
        5.5,
        "Sharpness of tip's affinities exp(-beta (1 - f.key)); 5.5 is ballad's default, not an official value: "
        "gaopengcuhk/Tip-Adapter configs/imagenet.yaml starts at init_beta 1, init_alpha 1.17 (lines 20-21) and "
        "searches beta in (0, 7], alpha in (0, 3] (search_scale, line 17): sweep it.",
        min=0.0,
        max=80.0,
    )
    gamma: float = option(
        0.0, "tip: keys of class c weigh n_c^-gamma (0: Tip-Adapter; 1: every class's keys weigh the same).", min=0.0
    )
    keys_per_class: int = option(0, "tip: at most K keys per class, drawn with --seed (0: every image).", min=0)
    neighbours: int = option(256, "tip: each query sums over its N nearest keys (0: all, Tip-Adapter exactly).", min=0)
    key_view: str = option(
        "mean",
        "Memory heads: an image's feature is the mean of its cached views, or its eval view.",
        choices=("mean", "eval"),
    )
    shrinkage: float = option(
        0.1,
        "gda: shared covariance shrunk to (1 - s) cov + s tr(cov)/d I (above 0: the raw one may be singular).",
        above=0.0,
        max=1.0,
    )
    adjust_tau: float = option(
        0.0, "Memory heads: logit adjustment, logits - tau * log prior (0: none).", min=-1e3, max=1e3
    )
    precision: str = option("fp32", "Matmul precision.", choices=PRECISIONS)
    seed: int = option(0, "Seeds W's init, the index stream, the view draws and tip's key cap.", min=0)

    def __post_init__(self) -> None:
        check_options(self)
        refused = HEADS.get(self.head).check(self)
        if refused is not None:
            raise OptionError(*refused)

    def idle_reason(self) -> str | None:
        """Why this configuration would train nothing, or None: a run that changes nothing says so."""
        return HEADS.get(self.head).idle_reason(self)

    @property
    def logit_scale(self) -> float:
        """The scale of this configuration's logits: CLIP's 100 for the text and memory heads, `head_scale` for a
        cosine head."""
        return HEADS.get(self.head).scale(self)

    def unused_fields(self) -> set[str]:
        """Fields this configuration does not read: those its head family does not read, and a loss's own fields
        (`la_tau`) unless the family trains with that loss."""
        family = HEADS.get(self.head)
        loss_fields = {p for n in LOSSES for p in LOSSES.get(n).params}
        reads = set(family.reads) - loss_fields
        if "loss" in family.reads:
            reads |= set(LOSSES.get(self.loss).params)
        return {f.name for f in fields(self)} - reads - {"head"}

    def unread(self) -> list[str]:
        """Fields set away from their default that this configuration does not read (a run would ignore them)."""
        defaults = AdapterConfig.__dataclass_fields__
        return [f for f in sorted(self.unused_fields()) if getattr(self, f) != defaults[f].default]

    def stream_key(self) -> tuple[Any, ...]:
        """Configurations with equal keys draw the same batches and can train together."""
        return (self.sampler, self.samples_per_class, self.epochs, self.batch_size, self.keep_last_batch, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """As a plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """From a dict, ignoring unknown keys (older files lack `precision`: fp32)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def readers(field: str) -> list[str]:
    """Where `field` applies: the losses that read it (`--loss la`), else the head families that do."""
    losses = [setting("loss", n) for n in LOSSES if field in LOSSES.get(n).params]
    return losses or [n for n in HEADS if field in HEADS.get(n).reads]


def explain_unread(config: AdapterConfig) -> str | None:
    """One line naming the options `config` sets but does not read, and where each applies; None when all are read."""
    unread = config.unread()
    if not unread:
        return None
    parts = []
    for f in unread:
        where = readers(f)
        applies = f" (read by {', '.join(where)})" if where else ""
        parts.append(f"{setting(f)}{applies}")
    by_loss = any(f in LOSSES.get(n).params for f in unread for n in LOSSES)
    head = setting("head", config.head)
    what = f"{head} with {setting('loss', config.loss)}" if by_loss else head
    return f"{what} does not read {'; '.join(parts)}; drop it or pick what reads it"


@dataclass
class SweepConfig:
    """How a sweep ranks its points (the points themselves are `AdapterConfig`s)."""

    metric: str = option("top1", "Val metric to rank the points by.", choices=METRICS)
    family: str | None = option(
        None,
        "Sweep a family's default grid instead of the given axes (options given one value apply to every point).",
        choices=FAMILIES,
    )

    def __post_init__(self) -> None:
        check_options(self)
