"""The pluggable terms of the phase-B step: losses and classifier heads, each registered by name.

A loss maps one chunk's logits (k adapters × B images × C classes) and the labels to k losses; a head says which
rows the adapted features are scored against and at what scale. `fit_adapters` batches any mix of them, so adding a
loss is one function and one `register_loss` call:

    def balanced_softmax(logits, labels, ctx):
        return cross_entropy(logits + ctx.log_prior, labels, ctx)

    register_loss("bsm", balanced_softmax, help="balanced softmax (Ren et al., 2020)")

after which `fit-adapter --loss bsm` and `sweep --loss ce,bsm` train it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..registry import Registry

if TYPE_CHECKING:
    import torch

LOGIT_SCALE = 100.0  # CLIP's learned scale, fixed at 100 as in BALLAD (phase A and the text head)


@dataclass
class LossContext:
    """What a loss may read besides logits and labels: the chunk's configurations and the training prior."""

    configs: Sequence[Any]  # the k AdapterConfigs of the chunk, in logit order
    log_prior: torch.Tensor  # C, log of the training class frequencies (on the training device)
    _params: dict[str, torch.Tensor] = field(default_factory=dict)

    def param(self, name: str) -> torch.Tensor:
        """Config field `name` of the k configurations as a k×1×1 float tensor (made once per fit)."""
        if name not in self._params:
            import torch

            values = [float(getattr(c, name)) for c in self.configs]
            self._params[name] = torch.tensor(values, device=self.log_prior.device).view(-1, 1, 1)
        return self._params[name]


LossFn = Callable[["torch.Tensor", "torch.Tensor", LossContext], "torch.Tensor"]


@dataclass(frozen=True)
class LossTerm:
    """A registered phase-B loss: `fn(logits k×B×C, labels B, context) -> k` mean losses."""

    fn: LossFn
    params: tuple[str, ...] = ()  # AdapterConfig fields this loss reads (sweeps vary them only where it is used)


@dataclass(frozen=True)
class HeadTerm:
    """A registered classifier head of the phase-B step."""

    learnable: bool  # C×d rows initialised from the class text embeddings and trained with the adapter
    scale: Callable[[Any], float]  # the logit scale of a configuration
    params: tuple[str, ...] = ()  # AdapterConfig fields this head reads
    memory: bool = False  # built from the cached training features (heads/memory.py), not the adapter step
    ignores: tuple[str, ...] = ()  # AdapterConfig fields this head does not read (a sweep keeps their defaults)


LOSSES: Registry[LossTerm] = Registry("loss")
HEADS: Registry[HeadTerm] = Registry("head")


def register_loss(name: str, fn: LossFn, *, help: str = "", params: tuple[str, ...] = ()) -> LossFn:
    """Register a phase-B loss by name; every command that takes `--loss` can then use it.

    Args:
        name: what users type (`--loss NAME`).
        fn: `(logits k×B×C, labels B, context) -> k` losses, one mean per adapter; autograd differentiates it.
        help: one line for `--help`.
        params: AdapterConfig fields the loss reads through `context.param(...)` or `context.configs`.
    """
    LOSSES.register(name, LossTerm(fn, params), help=help)
    return fn


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, context: LossContext | None = None) -> torch.Tensor:
    """Mean cross-entropy of each of k adapters' logits (k×B×C) against the same labels (B)."""
    import torch.nn.functional as F

    k, b, c = logits.shape
    return F.cross_entropy(logits.reshape(k * b, c), labels.repeat(k), reduction="none").view(k, b).mean(dim=1)


def logit_adjusted(logits: torch.Tensor, labels: torch.Tensor, context: LossContext) -> torch.Tensor:
    """Cross-entropy on `logits + la_tau * log prior` (Menon et al., 2021): the loss of rare classes weighs more."""
    return cross_entropy(logits + context.param("la_tau") * context.log_prior.view(1, 1, -1), labels, context)


register_loss("ce", cross_entropy, help="cross-entropy (BALLAD)")
register_loss(
    "la",
    logit_adjusted,
    help="logit-adjusted cross-entropy, logits + la_tau * log prior in training (Menon et al.)",
    params=("la_tau",),
)

HEADS.register(
    "text",
    HeadTerm(learnable=False, scale=lambda config: LOGIT_SCALE),
    help="the fixed class text embeddings at CLIP's scale 100 (BALLAD)",
)
HEADS.register(
    "cosine",
    HeadTerm(learnable=True, scale=lambda config: config.head_scale, params=("head_scale", "head_lr")),
    help="a learnable classifier initialised from the text embeddings, rows normalised, scale --head-scale (LIFT)",
)

# heads built from the training features (heads/memory.py); none of them uses the residual adapter
_ADAPTER_STEP = ("ratio", "lr", "momentum", "weight_decay", "schedule", "precision")
_TRAINING = ("sampler", "samples_per_class", "epochs", "batch_size", "select", "loss", "la_tau", "keep_last_batch")
_TIP = ("alpha", "beta", "gamma", "keys_per_class", "neighbours", "key_view", "adjust_tau")
HEADS.register(
    "tip",
    HeadTerm(False, lambda config: LOGIT_SCALE, _TIP, memory=True, ignores=_ADAPTER_STEP + _TRAINING),
    help="training-free cache of the training features (Tip-Adapter), balanced by --keys-per-class and --gamma",
)
HEADS.register(
    "tip-f",
    HeadTerm(True, lambda config: LOGIT_SCALE, (*_TIP, "head_lr"), memory=True, ignores=_ADAPTER_STEP),
    help="tip with its keys trained (Tip-Adapter-F: AdamW at --head-lr, default 1e-3) with --loss and --sampler",
)
HEADS.register(
    "gda",
    HeadTerm(
        False,
        lambda config: LOGIT_SCALE,
        ("alpha", "shrinkage", "key_view", "adjust_tau"),
        memory=True,
        ignores=_ADAPTER_STEP + _TRAINING,
    ),
    help="closed-form Gaussian discriminant (class means, shared shrunk covariance, uniform prior) + text head",
)
HEADS.register(
    "ncm",
    HeadTerm(
        False,
        lambda config: LOGIT_SCALE,
        ("alpha", "key_view", "adjust_tau"),
        memory=True,
        ignores=_ADAPTER_STEP + _TRAINING,
    ),
    help="nearest class mean (cosine to the normalised class means) + text head",
)
