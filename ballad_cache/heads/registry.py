"""Head families: what `--head NAME` names, each one object that carries its behaviour.

A family knows how to fit a head from the cache (closed form or trained), how to fit many for a sweep, which
`AdapterConfig` fields it reads, its default sweep grids, and how to load a head back from the tensors it saved.
A fitted head scores features (`Head.logits`: the one scoring path of `fit-adapter`, `sweep`, `evaluate`,
`export` and `predict`), lists the tensors it saves (`Head.state`) and says what folds into the image tower
(`Head.fold`). Adding a family is one class and one `register_head` call, in any file:

    class ProjectionFamily(HeadFamily):
        reads = ("alpha", "seed")
        def fit(self, data, config, device="cpu", progress=None): ...
        def load(self, config, state, context): ...

    register_head("proj", ProjectionFamily(), help="...")

after which `fit-adapter --head proj`, `sweep --head proj`, `evaluate`, `export` and `predict` all use it.

This module is light (no torch at import): the CLI lists the families and their help in `--help`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..registry import Registry

if TYPE_CHECKING:
    import torch

    from ..progress import Progress
    from ..store.cache import SplitFeatures
    from .config import AdapterConfig

LOGIT_SCALE = 100.0  # CLIP's learned scale, fixed at 100 as in BALLAD (phase A and the text head)

# AdapterConfig fields of the residual adapter's SGD step, and of a training loop over the index stream (the
# loss's own fields, `la_tau` for `la`, are read where the loss is: `LossTerm.params`)
ADAPTER_STEP = ("ratio", "lr", "momentum", "weight_decay", "schedule", "precision")
TRAINING = ("sampler", "samples_per_class", "epochs", "batch_size", "select", "loss", "la_tau", "keep_last_batch")


@dataclass
class HeadContext:
    """What every head of a cache scores against: the class text embeddings and the training prior.

    `folded` is set when the features come from an exported model whose image tower already applies the head's
    linear map (`Head.fold`): the head then scores them as they are.
    """

    text: torch.Tensor  # C×d class embeddings, L2-normalised
    log_prior: torch.Tensor  # C, log of the training class frequencies
    folded: bool = False

    def adjusted(self, logits: torch.Tensor, tau: float | None) -> torch.Tensor:
        """Post-hoc logit adjustment `logits - tau * log prior` (Menon et al.); `logits` unchanged without tau."""
        return logits if tau is None else logits - tau * self.log_prior.to(logits.device, logits.dtype)

    @property
    def num_classes(self) -> int:
        """C."""
        return int(self.text.shape[0])

    @property
    def dim(self) -> int:
        """d."""
        return int(self.text.shape[1])


@dataclass
class FitData:
    """What a family fits on: the cache's train split, its head context and (when the cache has one) val."""

    train: SplitFeatures
    context: HeadContext
    val: SplitFeatures | None = None  # its eval views (V·N rows with test-time crops, `SplitFeatures.views`)


class Head:
    """A fitted classifier head of one family over image features (cached rows or freshly encoded ones)."""

    config: AdapterConfig
    context: HeadContext

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits (N×C, float32, on the CPU) of N×d features of any norm."""
        raise NotImplementedError

    def state(self) -> dict[str, torch.Tensor]:
        """The tensors this head saves (names are the family's own; `HeadFamily.load` reads them back)."""
        raise NotImplementedError

    def fold(self) -> tuple[torch.Tensor | None, Head]:
        """A d×d linear map `M` for the image tower's last projection and the head that scores `M f`; (None, self)
        when nothing folds."""
        return None, self


@dataclass
class Fitted:
    """One fitted configuration: its head (None for a sweep point scored without materialising one), what
    `adapter.json` records of the fit, and (in a sweep) its val report."""

    head: Head | None
    record: dict[str, Any] = field(default_factory=dict)
    val: dict[str, float] | None = None
    val_classes: Any = None  # epochs × C per-class val accuracy of a trained head (numpy), for many/medium/few


Score = Callable[["torch.Tensor"], dict[str, float]]  # val logits -> report


class HeadFamily:
    """A registered `--head`: its metadata and its behaviour (override `fit` and `load`; the rest has defaults)."""

    reads: tuple[str, ...] = ()  # the AdapterConfig fields this family reads (others are refused, or kept at their
    # defaults in a sweep); `loss` among them brings the chosen loss's own fields (`la_tau` for `la`)
    grids: dict[str, tuple[str, dict[str, list[Any]]]] = {}  # `sweep --family NAME`: (help, axes) it offers
    trains_rows: bool = False  # C×d class rows initialised from the text and trained (the cosine head)
    closed_form: bool = False  # built from the cache in one pass: a sweep point keeps no tensors, it is rebuilt

    def scale(self, config: AdapterConfig) -> float:
        """The logit scale of a configuration."""
        return LOGIT_SCALE

    def idle_reason(self, config: AdapterConfig) -> str | None:
        """Why `config` would train nothing (a run that changes nothing says so), or None."""
        return None

    def check(self, config: AdapterConfig) -> tuple[str, str] | None:
        """(field, reason) when `config` is meaningless for this family, else None (`AdapterConfig` refuses it)."""
        return None

    def fit(
        self, data: FitData, config: AdapterConfig, device: str | torch.device = "cpu", progress: Progress | None = None
    ) -> Fitted:
        """Fit one head on `data.train` (selecting on `data.val` where the family trains)."""
        raise NotImplementedError

    def sweep(
        self,
        data: FitData,
        configs: Sequence[AdapterConfig],
        score: Score,
        device: str | torch.device = "cpu",
        progress: Progress | None = None,
    ) -> Iterator[tuple[int, Fitted]]:
        """Fit every configuration and report each on `data.val` through `score(head.logits(val))`, yielding
        (position in `configs`, fitted) as each finishes, so a sweep keeps what is done when it is stopped. Families
        override this to share work between points (one batched fit, one search)."""
        assert data.val is not None
        for i, config in enumerate(configs):
            fitted = self.fit(data, config, device, progress)
            assert fitted.head is not None
            fitted.val = score(fitted.head.logits(data.val.features))
            yield i, fitted

    def load(self, config: AdapterConfig, state: dict[str, torch.Tensor], context: HeadContext) -> Head:
        """A head from the tensors `Head.state` saved.

        Raises:
            ValueError: a tensor is missing, misshapen or not finite (the caller names the file).
        """
        raise NotImplementedError


HEADS: Registry[HeadFamily] = Registry("head")
FAMILIES: Registry[dict[str, list[Any]]] = Registry("family")  # `sweep --family`: the grids the heads offer


def register_head(name: str, family: HeadFamily, *, help: str = "", replace: bool = False) -> HeadFamily:
    """Register a head family as `--head NAME`, and its default grids as `sweep --family GRID`.

    Args:
        name: what users type.
        family: the family object.
        help: one line for `--help`.
        replace: replace an existing registration (tests, plugins).
    """
    clash = [g for g in family.grids if g in FAMILIES and not replace]
    if clash:  # checked first: a refused registration leaves nothing half-registered
        raise ValueError(f"family '{clash[0]}' is already registered")
    HEADS.register(name, family, help=help, replace=replace)
    for grid, (grid_help, axes) in family.grids.items():
        FAMILIES.register(grid, {"head": [name], **axes}, help=grid_help, replace=replace)
    return family


def fit_record(seconds: float) -> dict[str, Any]:
    """What adapter.json records of a fit where the family records nothing of its own: no step, no epoch."""
    return {"steps": 0, "best_epoch": 0, "val_top1_per_epoch": [], "final_loss": None, "train_seconds": seconds}


def unregister_head(name: str) -> None:
    """Remove a family and its grids (tests and plugins that register temporarily)."""
    family = HEADS.get(name) if name in HEADS else None
    HEADS.unregister(name)
    for grid in family.grids if family is not None else ():
        FAMILIES.unregister(grid)
