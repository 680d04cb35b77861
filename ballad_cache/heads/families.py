"""The built-in head families, registered as `--head NAME` (see `heads/registry.py` for the interface).

    text    BALLAD's residual adapter, scored against the class text embeddings at scale 100   heads/adapter.py
    cosine  the adapter with a learnable cosine classifier initialised from the text (LIFT)   heads/adapter.py
    tip     Tip-Adapter's training-free cache of the training features, balanced            heads/memory.py
    tip-f   tip with its keys trained (Tip-Adapter-F)                                        heads/memory.py
    gda     closed-form Gaussian discriminant + text head                                    heads/memory.py
    ncm     nearest class mean + text head                                                   heads/memory.py

Each class is the family's whole behaviour; the arithmetic lives in the modules named above, imported when a
method runs, so that listing the families (`ballad --help`) imports no torch.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from ..errors import setting
from ..tracking import curve_steps
from .registry import ADAPTER_STEP, FAMILIES, TRAINING, FitData, Fitted, HeadFamily, Score, fit_record, register_head

if TYPE_CHECKING:
    import torch

    from ..progress import Progress
    from .config import AdapterConfig
    from .registry import Head, HeadContext


class AdapterFamily(HeadFamily):
    """BALLAD's residual adapter trained with SGD on the cached rows; configurations that share an index stream
    train as one batched fit (`heads/adapter.py` `fit_adapters`)."""

    def check(self, config: AdapterConfig) -> tuple[str, str] | None:
        """A ratio of 0 with fixed class rows trains nothing."""
        if config.ratio == 0 and not self.trains_rows:
            return (
                "ratio",
                f"0 with a fixed head trains nothing (x' = f); use a ratio above 0 or {setting('head', 'cosine')}",
            )
        return None

    def idle_reason(self, config: AdapterConfig) -> str | None:
        """0 epochs, a zero rate with nothing else trained, or one epoch at the per-epoch cosine's rate 0."""
        head_lr = config.head_lr if config.head_lr is not None else config.lr
        if config.epochs == 0:
            return "0 epochs: the initial weights are kept"
        if config.lr == 0 and not (self.trains_rows and head_lr):
            return "lr 0: the weights keep their initial values"
        if config.schedule == "epoch" and config.epochs == 1:
            return (
                f"1 epoch with {setting('schedule', 'epoch')} runs at lr 0 (the official CosineAnnealingLR is stepped "
                f"at each epoch start): the weights keep their initial values; use {setting('epochs', 2)} or more, or "
                f"{setting('schedule', 'step')}"
            )
        return None

    def fit(
        self, data: FitData, config: AdapterConfig, device: str | torch.device = "cpu", progress: Progress | None = None
    ) -> Fitted:
        """One adapter, its best val epoch kept (official)."""
        return self._fit_group(data, [config], device, progress)[0]

    def sweep(
        self,
        data: FitData,
        configs: Sequence[AdapterConfig],
        score: Score,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
    ) -> Iterator[tuple[int, Fitted]]:
        """Configurations that share an index stream train together; each is scored through its head, and a group's
        points are yielded as soon as it has trained."""
        from .adapter import group_by_stream

        assert data.val is not None
        for group in group_by_stream(configs):
            for i, fitted in zip(
                group, self._fit_group(data, [configs[i] for i in group], device, progress), strict=True
            ):
                assert fitted.head is not None
                fitted.val = score(fitted.head.logits(data.val.features))
                yield i, fitted

    def _fit_group(
        self, data: FitData, configs: list[AdapterConfig], device: str | torch.device, progress: Progress | None
    ) -> list[Fitted]:
        from .adapter import AdapterHead, fit_adapters
        from .batches import TrainRows

        val = (data.val.features, data.val.labels) if data.val is not None else None
        fit = fit_adapters(TrainRows.from_split(data.train), data.context.text, configs, device, progress, val=val)
        logged = curve_steps(fit.steps)  # a bounded curve: every k-th step's loss and learning rate
        return [
            Fitted(
                AdapterHead(c, data.context, fit.weights[j], fit.heads[j]),
                {
                    "final_loss": float(fit.losses[j, -1]) if fit.losses.size else None,
                    "steps": fit.steps,
                    "best_epoch": fit.best_epoch[j],
                    "val_top1_per_epoch": fit.val_top1[j].round(4).tolist(),
                    "train_seconds": fit.seconds / len(configs),
                    "curve": {
                        "step": [s + 1 for s in logged],
                        "loss": [float(v) for v in fit.losses[j, logged]],
                        "lr": [float(v) for v in fit.lrs[j, logged]],
                    },
                    "draws_per_s": fit.steps * c.batch_size * len(configs) / max(fit.seconds, 1e-9),
                },
                val_classes=fit.val_classes[j] if fit.val_classes.size else None,
            )
            for j, c in enumerate(configs)
        ]

    def load(self, config: AdapterConfig, state: dict[str, torch.Tensor], context: HeadContext) -> Head:
        """`weight` (d×d) and, for a cosine head, `head` (C×d)."""
        from .adapter import load_adapter_head

        return load_adapter_head(config, state, context)


class TextFamily(AdapterFamily):
    """The adapter scored against the fixed class text embeddings at CLIP's scale 100 (BALLAD)."""

    reads = (*ADAPTER_STEP, *TRAINING, "seed")

    grids = {
        "ballad": ("BALLAD's adapter", {"loss": ["ce"], "ratio": [0.1, 0.2, 0.4]}),
        "la": ("logit-adjusted adapter", {"loss": ["la"], "la_tau": [0.5, 1.0]}),
    }


class CosineFamily(AdapterFamily):
    """The adapter with C×d rows initialised from the text embeddings and trained with it, normalised, at
    `head_scale` (LIFT's cosine classifier)."""

    reads = (*ADAPTER_STEP, *TRAINING, "seed", "head_scale", "head_lr")
    trains_rows = True
    grids = {"cosine": ("LIFT's cosine head", {"loss": ["ce", "la"]})}

    def scale(self, config: AdapterConfig) -> float:
        """`head_scale`."""
        return float(config.head_scale)


_TIP = ("alpha", "beta", "gamma", "keys_per_class", "neighbours", "key_view", "adjust_tau")


class TipKeysFamily(HeadFamily):
    """A head of Tip-Adapter's cache: the keys, their labels and class weights (`heads/memory.py` `TipHead`)."""

    def load(self, config: AdapterConfig, state: dict[str, torch.Tensor], context: HeadContext) -> Head:
        """`keys`, `values`, `class_weight`."""
        from .memory import TipHead

        return TipHead.from_state(config, state, context)


class TipFamily(TipKeysFamily):
    """Tip-Adapter's cache of the training features, balanced by a per-class cap and class weights (closed form)."""

    reads: tuple[str, ...] = (*_TIP, "seed")  # the seed draws the keys a class keeps
    closed_form = True
    grids = {
        "tip": (
            "training-free cache (1008 points)",
            {
                "alpha": [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0],
                "beta": [0.5, 1.0, 2.0, 3.5, 5.5, 8.0],
                "gamma": [0.0, 0.5, 1.0],
                "keys_per_class": [0, 16],
                "adjust_tau": [0.0, 0.5, 1.0, 1.5],
            },
        )
    }

    def fit(
        self, data: FitData, config: AdapterConfig, device: str | torch.device = "cpu", progress: Progress | None = None
    ) -> Fitted:
        """The keys (one per image, capped per class) and their class weights."""
        from .memory import image_keys, tip_head

        t0 = time.perf_counter()
        keys, values = image_keys(data.train, config, cap=True)
        head = tip_head(keys, values, config, data.context)
        return Fitted(head, _closed_form_record(t0))

    def sweep(
        self,
        data: FitData,
        configs: Sequence[AdapterConfig],
        score: Score,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
    ) -> Iterator[tuple[int, Fitted]]:
        """One batched search over shared top affinities (`heads/memory.py` `search_tip`)."""
        from .memory import search_tip

        assert data.val is not None
        t0 = time.perf_counter()
        reports = search_tip(configs, data.train, data.val.features, data.context, score)
        record = _closed_form_record(t0, len(configs))
        yield from ((i, Fitted(None, dict(record), report)) for i, report in enumerate(reports))


class TipFFamily(TipKeysFamily):
    """tip with its keys trained (Tip-Adapter-F: AdamW at `head_lr`) with the configured loss and sampler."""

    reads = (*_TIP, "seed", "head_lr", *TRAINING)
    grids = {"tip-f": ("cache with trained keys", {"gamma": [0.0, 1.0]})}

    def idle_reason(self, config: AdapterConfig) -> str | None:
        """A zero key rate, or no epoch."""
        if config.head_lr == 0:
            return f"{setting('head_lr', 0)}: tip-f's keys keep their values"
        if config.epochs == 0:
            return "0 epochs: the initial weights are kept"
        return None

    def fit(
        self, data: FitData, config: AdapterConfig, device: str | torch.device = "cpu", progress: Progress | None = None
    ) -> Fitted:
        """tip's head, then its keys trained; the best val epoch kept."""
        import torch

        from ..errors import BalladError
        from .memory import image_keys, tip_head, train_tip_f
        from .terms import LOSSES

        t0 = time.perf_counter()
        keys, values = image_keys(data.train, config, cap=True)
        val = (data.val.features, data.val.labels) if data.val is not None else None
        loss = LOSSES.get(config.loss).fn
        head, tops, best_epoch, steps = train_tip_f(
            tip_head(keys, values, config, data.context), data.train, config, loss, val, progress
        )
        if not torch.isfinite(head.tensors["keys"]).all():
            raise BalladError(f"tip-f diverged: its keys hold NaN/Inf after {steps} steps; lower {setting('head_lr')}")
        record = fit_record(time.perf_counter() - t0)
        record.update(steps=steps, best_epoch=best_epoch, val_top1_per_epoch=[round(t, 4) for t in tops])
        return Fitted(head, record)


class ClassMeansFamily(HeadFamily):
    """A closed-form head from the class means of one feature per image, blended with the text head."""

    closed_form = True

    def build(self, keys: torch.Tensor, values: torch.Tensor, config: AdapterConfig, context: HeadContext) -> Head:
        """The head from one normalised feature per image and its label."""
        raise NotImplementedError

    def fit(
        self, data: FitData, config: AdapterConfig, device: str | torch.device = "cpu", progress: Progress | None = None
    ) -> Fitted:
        """The head from every training image's feature."""
        from .memory import image_keys

        t0 = time.perf_counter()
        keys, values = image_keys(data.train, config, cap=False)
        return Fitted(self.build(keys, values, config, data.context), _closed_form_record(t0))

    def sweep(
        self,
        data: FitData,
        configs: Sequence[AdapterConfig],
        score: Score,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
    ) -> Iterator[tuple[int, Fitted]]:
        """One pass: each key view's means once, each shrinkage's term once (`search_class_means`)."""
        from .memory import search_class_means

        assert data.val is not None
        t0 = time.perf_counter()
        reports = search_class_means(configs, data.train, data.val.features, data.context, score, self.build)
        record = _closed_form_record(t0, len(configs))
        yield from ((i, Fitted(None, dict(record), report)) for i, report in enumerate(reports))


class GdaFamily(ClassMeansFamily):
    """Gaussian discriminant: class means, one shared covariance shrunk towards its mean variance, uniform prior."""

    reads = ("alpha", "shrinkage", "key_view", "adjust_tau")
    grids = {
        "gda": (
            "closed-form Gaussian head (112 points)",
            {
                "alpha": [0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0],
                "shrinkage": [0.001, 0.01, 0.1, 0.5],
                "adjust_tau": [0.0, 0.5, 1.0, 1.5],
            },
        )
    }

    def build(self, keys: torch.Tensor, values: torch.Tensor, config: AdapterConfig, context: HeadContext) -> Head:
        """`weight` = M Σ⁻¹ and `bias`."""
        from .memory import gda_from_keys

        return gda_from_keys(keys, values, config, context)

    def load(self, config: AdapterConfig, state: dict[str, torch.Tensor], context: HeadContext) -> Head:
        """`weight`, `bias`."""
        from .memory import GdaHead

        return GdaHead.from_state(config, state, context)


class NcmFamily(ClassMeansFamily):
    """Nearest class mean: cosine to the normalised class means, blended with the text head."""

    reads = ("alpha", "key_view", "adjust_tau")
    grids = {
        "ncm": (
            "class means (28 points)",
            {"alpha": [0.0625, 0.125, 0.25, 0.5, 1.0, 2.0, 4.0], "adjust_tau": [0.0, 0.5, 1.0, 1.5]},
        )
    }

    def build(self, keys: torch.Tensor, values: torch.Tensor, config: AdapterConfig, context: HeadContext) -> Head:
        """`prototypes`."""
        from .memory import ncm_from_keys

        return ncm_from_keys(keys, values, config, context)

    def load(self, config: AdapterConfig, state: dict[str, torch.Tensor], context: HeadContext) -> Head:
        """`prototypes`."""
        from .memory import NcmHead

        return NcmHead.from_state(config, state, context)


def _closed_form_record(t0: float, points: int = 1) -> dict[str, Any]:
    """What adapter.json records of a head built in one pass (no step, no epoch)."""
    return fit_record((time.perf_counter() - t0) / max(points, 1))


register_head("text", TextFamily(), help="the fixed class text embeddings at CLIP's scale 100 (BALLAD)")
register_head(
    "cosine",
    CosineFamily(),
    help="a learnable classifier initialised from the text embeddings, rows normalised, scale --head-scale (LIFT)",
)
register_head(
    "tip",
    TipFamily(),
    help="training-free cache of the training features (Tip-Adapter), balanced by --keys-per-class and --gamma",
)
register_head(
    "tip-f",
    TipFFamily(),
    help="tip with its keys trained (Tip-Adapter-F: AdamW at --head-lr, default 1e-3) with --loss and --sampler",
)
register_head(
    "gda",
    GdaFamily(),
    help="closed-form Gaussian discriminant (class means, shared shrunk covariance, uniform prior) + text head",
)
register_head("ncm", NcmFamily(), help="nearest class mean (cosine to the normalised class means) + text head")
FAMILIES.register("all", {}, help="every family above, ranked together")
