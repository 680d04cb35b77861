"""The pluggable losses of phase B, each registered by name (heads are families: `heads/registry.py`).

A loss maps one chunk's logits (k adapters × B images × C classes) and the labels to k losses. `fit_adapters`
batches any mix of them, so adding a loss is one function and one `register_loss` call:

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
from .registry import LOGIT_SCALE

if TYPE_CHECKING:
    import torch

__all__ = ["LOGIT_SCALE", "LOSSES", "LossContext", "LossTerm", "cross_entropy", "logit_adjusted", "register_loss"]


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
            # the prior's dtype: float32 in training, float64 where a test trains in float64 (heads/adapter.py)
            param = torch.tensor(values, device=self.log_prior.device, dtype=self.log_prior.dtype)
            self._params[name] = param.view(-1, 1, 1)
        return self._params[name]


LossFn = Callable[["torch.Tensor", "torch.Tensor", LossContext], "torch.Tensor"]


@dataclass(frozen=True)
class LossTerm:
    """A registered phase-B loss: `fn(logits k×B×C, labels B, context) -> k` mean losses."""

    fn: LossFn
    params: tuple[str, ...] = ()  # AdapterConfig fields this loss reads (sweeps vary them only where it is used)


LOSSES: Registry[LossTerm] = Registry("loss")


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
