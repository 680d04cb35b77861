"""Heads that remember: classifiers built from the cached training features themselves, beside the text head.

    tip    100 · f·Tᵀ + α · Σ_{k ∈ nearest(f)} exp(−β (1 − f·k)) · w_{y_k} · e_{y_k}  − τ · log prior
    tip-f  tip with the keys trained (Tip-Adapter-F)
    gda    100 · f·Tᵀ + α · (f·Wᵀ + b),  W = M Σ⁻¹,  b = −½ diag(M Σ⁻¹ Mᵀ)           − τ · log prior
    ncm    100 · f·Tᵀ + α · 100 · f·Pᵀ,  P = the normalised class means              − τ · log prior

f is an L2-normalised image feature and T the class text embeddings (the prompt ensemble where the cache has one).
Tip-Adapter (Zhang et al., ECCV 2022; gaopengcuhk/Tip-Adapter) keeps every training image as a key k with its
label y_k as value; on long-tailed data its cache term sums n_c kernels for class c, so head classes win by count.
Two balancing knobs fix that: at most `keys_per_class` keys per class (drawn with the seed), and values of class c
weighted w_c = n_c^−γ (γ = 1: each class's keys carry the same total weight). The sum runs over each query's
`neighbours` nearest keys (0: all keys, Tip-Adapter exactly); a bounded neighbour set is what lets a search
precompute val's top affinities once and score thousands of (α, β, γ, τ) points with a gather each.

GDA (Wang et al., ICLR 2024) is linear discriminant analysis on the features: class means M and one shared
covariance. Here the covariance is the mean of the per-class covariances (each class weighs the same, so the head
classes do not set the shape alone; scikit-learn's LDA does the same with uniform priors) shrunk towards its mean
variance, (1 − s)·Σ + s·tr(Σ)/d·I: in d = 1024 dimensions the estimate is poorly conditioned (its small eigenvalues
are noise that Σ⁻¹ amplifies), and a fixed s searched on val is simpler than Ledoit-Wolf's estimate. The
prior is uniform, so the head is balanced by construction. NCM (nearest class mean, cosine) is its cheapest end.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import BalladError, setting
from .metrics import per_image
from .registry import LOGIT_SCALE, Head, HeadContext

if TYPE_CHECKING:
    from ..progress import Progress
    from ..store.cache import SplitFeatures
    from .config import AdapterConfig

KEY_VIEWS = ("mean", "eval")
AFFINITY_BUDGET = 256 << 20  # bytes of query×key affinities held at once


def key_features(split: SplitFeatures, key_view: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One L2-normalised feature per training image and its label and image index: the mean of its augmented views
    (`mean`, Tip-Adapter's average over augmentation epochs; the eval view where the cache has no augmented views)
    or its eval view (`eval`)."""
    view = split.view
    use = view == 0 if key_view == "eval" or not bool((view > 0).any()) else view > 0
    rows = torch.nonzero(use).flatten()
    index = split.index[rows]
    images, inverse = torch.unique(index, return_inverse=True)
    sums = torch.zeros(len(images), split.features.shape[1]).index_add_(0, inverse, split.features[rows].float())
    labels = torch.zeros(len(images), dtype=torch.int64).scatter_(0, inverse, split.labels[rows].long())
    return F.normalize(sums, dim=-1), labels, images


def cap_per_class(labels: torch.Tensor, cap: int, seed: int) -> torch.Tensor:
    """Indices of at most `cap` items per class (all with cap 0), drawn with `seed`, in ascending order."""
    if cap <= 0:
        return torch.arange(len(labels))
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    y = labels.numpy()[order]
    ranks = np.zeros(len(order), dtype=np.int64)
    seen: dict[int, int] = {}
    for i, c in enumerate(y.tolist()):
        ranks[i] = seen.get(c, 0)
        seen[c] = ranks[i] + 1
    return torch.from_numpy(np.sort(order[ranks < cap]))


def class_weights(values: torch.Tensor, num_classes: int, gamma: float) -> torch.Tensor:
    """w_c = n_c^−γ for the n_c keys of class c (0 for a class with no key)."""
    counts = torch.bincount(values, minlength=num_classes).double()
    weights = torch.where(counts > 0, counts.clamp_min(1.0) ** -gamma, torch.zeros_like(counts))
    return weights.float()


def _chunks(rows: int, width: int, budget: int = AFFINITY_BUDGET) -> Iterator[slice]:
    step = max(1, budget // (4 * max(width, 1)))
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


def top_affinities(
    queries: torch.Tensor, keys: torch.Tensor, k: int, budget: int = AFFINITY_BUDGET
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each query's `k` largest affinities f·key (sorted, descending) and the keys they belong to (0: all keys);
    computed in query chunks so that at most `budget` bytes of affinities exist at once."""
    k = len(keys) if k <= 0 else min(k, len(keys))
    values, index = [], []
    for part in _chunks(len(queries), len(keys), budget):
        affinity = queries[part].float() @ keys.float().T
        top = affinity.topk(k, dim=1) if k < len(keys) else affinity.sort(dim=1, descending=True)
        values.append(top.values)
        index.append(top.indices)
    return torch.cat(values), torch.cat(index)


def cache_term_from(
    affinity: torch.Tensor, key_labels: torch.Tensor, weights: torch.Tensor, beta: float, num_classes: int
) -> torch.Tensor:
    """Σ_k exp(−β(1 − a_k)) · w_{y_k} per class, from each query's affinities `a` (Q×k) to keys of labels `y` (Q×k)."""
    kernel = torch.exp(-beta * (1.0 - affinity)) * weights[key_labels]
    return torch.zeros(len(affinity), num_classes, dtype=kernel.dtype).scatter_add_(1, key_labels, kernel)


def cache_term(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    weights: torch.Tensor,
    beta: float,
    neighbours: int,
    num_classes: int,
    budget: int = AFFINITY_BUDGET,
) -> torch.Tensor:
    """Tip-Adapter's cache logits of `queries` (Q×d, normalised) over their `neighbours` nearest keys (0: all)."""
    out = []
    for part in _chunks(len(queries), len(keys), budget):
        affinity, index = top_affinities(queries[part], keys, neighbours, budget)
        out.append(cache_term_from(affinity, values[index], weights, beta, num_classes))
    return torch.cat(out) if out else torch.zeros(0, num_classes)


def gda_head(
    features: torch.Tensor, labels: torch.Tensor, num_classes: int, shrinkage: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LDA with a uniform prior: class means M, Σ the mean of the per-class (biased) covariances shrunk to
    (1 − s)·Σ + s·tr(Σ)/d·I; returns W = M Σ⁻¹ (C×d) and b = −½ diag(M Σ⁻¹ Mᵀ) (C), computed in float64."""
    x, y = features.double(), labels.long()
    d = x.shape[1]
    counts = torch.bincount(y, minlength=num_classes).double()
    means = torch.zeros(num_classes, d, dtype=torch.float64).index_add_(0, y, x) / counts.clamp_min(1).unsqueeze(1)
    centred = x - means[y]
    weight = (1.0 / counts.clamp_min(1))[y]  # each class's covariance weighs the same in the mean
    present = int((counts > 0).sum())
    cov = (centred * weight.unsqueeze(1)).T @ centred / max(present, 1)
    cov = (1.0 - shrinkage) * cov + shrinkage * (torch.trace(cov) / d) * torch.eye(d, dtype=torch.float64)
    try:
        w = torch.linalg.solve(cov, means.T).T  # M Σ⁻¹ (Σ is symmetric)
    except RuntimeError:  # torch.linalg.LinAlgError: a singular covariance (too few images for its dimension)
        raise BalladError(
            f"gda: the covariance is singular at shrinkage {shrinkage}; use a larger {setting('shrinkage')}"
        ) from None
    b = -0.5 * (w * means).sum(dim=1)
    return w.float(), b.float()


def class_prototypes(features: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The L2-normalised mean feature of each class (zero for a class with no image)."""
    sums = torch.zeros(num_classes, features.shape[1]).index_add_(0, labels.long(), features.float())
    return F.normalize(sums, dim=-1)


class MemoryHead(Head):
    """A head built from the training features: `100 · f·Tᵀ + α · term(f) − τ · log prior`, the term its kind's.

    Subclasses name their tensors (`names`), compute their term (`extra_logits`) and check their shapes.
    """

    names: tuple[str, ...] = ()

    def __init__(self, config: AdapterConfig, tensors: dict[str, torch.Tensor], context: HeadContext) -> None:
        self.config = config
        self.tensors = tensors
        self.context = context

    @property
    def log_prior(self) -> torch.Tensor:
        """C, log of the training class frequencies."""
        return self.context.log_prior

    def extra_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The head's own term (before α) for normalised features."""
        raise NotImplementedError

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits of cached or encoded features: `100 · f·Tᵀ + α · term − τ · log prior`, on the CPU."""
        f = F.normalize(features.cpu().float(), dim=-1)
        logits = LOGIT_SCALE * f @ self.context.text.float().T + self.config.alpha * self.extra_logits(f)
        return logits - self.config.adjust_tau * self.log_prior if self.config.adjust_tau else logits

    def state(self) -> dict[str, torch.Tensor]:
        """The head's tensors, contiguous on the CPU."""
        return {k: v.detach().contiguous().cpu() for k, v in self.tensors.items()}

    def check(self) -> None:
        """Shapes against the context (subclasses); every float tensor finite.

        Raises:
            ValueError: what does not fit.
        """
        for name, tensor in self.tensors.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise ValueError(f"the {self.config.head} head's '{name}' holds NaN/Inf")

    @classmethod
    def from_state(cls, config: AdapterConfig, state: dict[str, torch.Tensor], context: HeadContext) -> MemoryHead:
        """The head from its saved tensors, checked.

        Raises:
            ValueError: a tensor the head needs is missing, misshapen or not finite.
        """
        missing = [n for n in cls.names if n not in state]
        if missing:
            raise ValueError(f"the {config.head} head lacks its '{missing[0]}' tensor")
        tensors = {n: state[n].float() if state[n].is_floating_point() else state[n] for n in cls.names}
        head = cls(config, tensors, context)
        head.check()
        return head


class TipHead(MemoryHead):
    """Tip-Adapter's cache: `keys` (N×d), `values` (N, int64 labels), `class_weight` (C)."""

    names = ("keys", "values", "class_weight")

    def extra_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The cache term over each query's `neighbours` nearest keys."""
        t = self.tensors
        return cache_term(
            features,
            t["keys"],
            t["values"],
            t["class_weight"],
            self.config.beta,
            self.config.neighbours,
            self.context.num_classes,
        )

    def check(self) -> None:
        """Keys, values and class weights agree; values name the context's classes."""
        t = self.tensors
        t["values"] = t["values"].long()
        if len(t["keys"]) != len(t["values"]) or len(t["class_weight"]) != self.context.num_classes:
            raise ValueError("keys, values and class weights of the tip head disagree in length")
        if len(t["values"]) and (int(t["values"].min()) < 0 or int(t["values"].max()) >= self.context.num_classes):
            raise ValueError("the tip head's values name classes the cache does not have")
        super().check()


class RowsHead(MemoryHead):
    """A memory head of one C×d matrix (and maybe a bias) over the classes."""

    rows = ""

    def check(self) -> None:
        """One row per class."""
        rows = self.tensors[self.rows]
        if rows.dim() != 2 or rows.shape[0] != self.context.num_classes:
            raise ValueError(
                f"the {self.config.head} head has {tuple(rows.shape)} rows for {self.context.num_classes} classes"
            )
        super().check()


class GdaHead(RowsHead):
    """LDA with a uniform prior: `weight` W = M Σ⁻¹ (C×d), `bias` b (C); term `f·Wᵀ + b`."""

    names = ("weight", "bias")
    rows = "weight"

    def extra_logits(self, features: torch.Tensor) -> torch.Tensor:
        """The discriminant."""
        return features @ self.tensors["weight"].T + self.tensors["bias"]


class NcmHead(RowsHead):
    """Nearest class mean: `prototypes` (C×d, normalised class means); term `100 · f·Pᵀ`."""

    names = ("prototypes",)
    rows = "prototypes"

    def extra_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Cosine to the class means at CLIP's scale."""
        return LOGIT_SCALE * features @ self.tensors["prototypes"].T


def image_keys(train: SplitFeatures, config: AdapterConfig, cap: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One normalised feature per training image (`key_view`) and its label; with `cap`, at most
    `keys_per_class` per class (tip's keys), else every image (what gda and ncm estimate class means from)."""
    keys, labels, _ = key_features(train, config.key_view)
    if not cap:
        return keys, labels
    keep = cap_per_class(labels, config.keys_per_class, config.seed)
    return keys[keep], labels[keep]


def tip_head(keys: torch.Tensor, values: torch.Tensor, config: AdapterConfig, context: HeadContext) -> TipHead:
    """A tip head over `keys` (normalised, one per image) with labels `values`, class weights n_c^−γ."""
    weights = class_weights(values, context.num_classes, config.gamma)
    return TipHead(config, {"keys": keys, "values": values, "class_weight": weights}, context)


def gda_from_keys(keys: torch.Tensor, values: torch.Tensor, config: AdapterConfig, context: HeadContext) -> GdaHead:
    """The gda head of one feature per image."""
    weight, bias = gda_head(keys, values, context.num_classes, config.shrinkage)
    return GdaHead(config, {"weight": weight, "bias": bias}, context)


def ncm_from_keys(keys: torch.Tensor, values: torch.Tensor, config: AdapterConfig, context: HeadContext) -> NcmHead:
    """The ncm head of one feature per image."""
    return NcmHead(config, {"prototypes": class_prototypes(keys, values, context.num_classes)}, context)


def train_tip_f(
    head: TipHead,
    train: SplitFeatures,
    config: AdapterConfig,
    loss_fn: Any,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    progress: Progress | None = None,
) -> tuple[TipHead, list[float], int, int]:
    """Tip-Adapter-F: the keys trained with AdamW (eps 1e-4, Tip-Adapter-F's) at `head_lr` (default 1e-3) under a
    per-step cosine, on one cached view per draw from the configured sampler, with the configured loss. The keys
    are L2-normalised inside the forward and stored normalised (Tip-Adapter-F uses its trained keys unnormalised;
    normalising keeps β on the scale of cosine affinities). The residual adapter is not used. Returns the head of
    the best val epoch (or the last), the val top-1 per epoch, that epoch and the steps."""
    from ..schedules import SCHEDULES
    from .batches import TrainRows, batch_schedule
    from .terms import LossContext

    rows = TrainRows.from_split(train)
    epochs = batch_schedule(rows, config)
    keys = torch.nn.Parameter(head.tensors["keys"].clone())
    values, weights = head.tensors["values"], head.tensors["class_weight"]
    lr = config.head_lr if config.head_lr is not None else 1e-3
    optimizer = torch.optim.AdamW([keys], lr=lr, eps=1e-4)
    text_n = F.normalize(head.context.text.float(), dim=-1)
    labels_all = train.labels.long()
    context = LossContext([config], head.log_prior)
    total = sum(len(e) for e in epochs)
    if progress is not None:
        progress.start("fit tip-f keys", total)
    best_keys, best_acc, best_epoch, tops, step = keys.detach().clone(), -1.0, 0, [], 0
    num_classes = len(weights)
    for epoch, batches in enumerate(epochs, start=1):
        for rows_idx in batches:
            for group in optimizer.param_groups:
                group["lr"] = SCHEDULES.get("step")(lr, step, total, epoch - 1, len(epochs))
            f = F.normalize(train.features[torch.as_tensor(rows_idx)].float(), dim=-1)
            k_n = F.normalize(keys, dim=-1)
            affinity = f @ k_n.T
            if 0 < config.neighbours < len(keys):
                affinity, index = affinity.topk(config.neighbours, dim=1)
            else:
                index = torch.arange(len(keys)).expand(len(f), -1)
            term = cache_term_from(affinity, values[index], weights, config.beta, num_classes)
            logits = LOGIT_SCALE * f @ text_n.T + config.alpha * term
            loss = loss_fn(logits.unsqueeze(0), labels_all[torch.as_tensor(rows_idx)], context)[0]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
            if progress is not None:
                progress.advance(1, loss=f"{float(loss.detach()):.3f}")
        trained = TipHead(config, {**head.tensors, "keys": F.normalize(keys.detach(), dim=-1)}, head.context)
        if val is not None:
            pred = per_image(trained.logits(val[0]), len(val[1])).argmax(dim=1)
            top1 = 100.0 * float((pred == val[1]).float().mean())
            tops.append(top1)
            if top1 > best_acc or config.select == "last":
                best_acc, best_keys, best_epoch = top1, trained.tensors["keys"], epoch
        else:
            best_keys, best_epoch = trained.tensors["keys"], epoch
    if not epochs:
        best_keys = F.normalize(keys.detach(), dim=-1)
    return TipHead(config, {**head.tensors, "keys": best_keys}, head.context), tops, best_epoch, step


def search_tip(
    configs: Sequence[AdapterConfig],
    train: SplitFeatures,
    queries: torch.Tensor,
    context: HeadContext,
    score: Any,
) -> list[Any]:
    """Score tip points on `queries` (val) in one pass: points that share a key set (key view, cap, seed) share
    its top affinities (computed once, chunked), those that share β, γ and the neighbour count share the cache
    term, and every α and τ is then one weighted sum. `score(logits)` reports a point; returns the reports in
    `configs`' order. Each equals the point's `TipHead.logits` computed alone.

    Memory: the keys and queries, the top affinities and their key labels (Q × k · 12 bytes), at most
    `AFFINITY_BUDGET` bytes of full affinities while they are ranked, and three Q×C float32 matrices (text logits,
    one cache term, one point's logits). Points over every key (neighbours 0) recompute the affinities in chunks
    of the same budget for each (β, γ) instead of keeping Q × N of them."""
    q, finish, results = _search_start(configs, queries, context, score)
    num_classes = context.num_classes
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault((c.key_view, c.keys_per_class, c.seed), []).append(i)
    for members in groups.values():
        keys, values = image_keys(train, configs[members[0]], cap=True)
        by_term: dict[tuple[float, float, int], list[int]] = {}
        for i in members:
            c = configs[i]
            n = len(keys) if c.neighbours <= 0 else min(c.neighbours, len(keys))
            by_term.setdefault((c.beta, c.gamma, n), []).append(i)
        bounded = [n for (_, _, n) in by_term if n < len(keys)]
        if bounded:  # the widest neighbour set, ranked once; narrower ones are its first columns
            affinity, index = top_affinities(q, keys, max(bounded))
            labels = values[index]
        for (beta, gamma, n), sharing in by_term.items():  # one Q×C term alive at a time
            weights = class_weights(values, num_classes, gamma)
            if n < len(keys):
                term = cache_term_from(affinity[:, :n], labels[:, :n], weights, beta, num_classes)
            else:  # every key: no ranking, the affinities recomputed in bounded query chunks
                term = cache_term(q, keys, values, weights, beta, 0, num_classes)
            for i in sharing:
                finish(i, term)
    return results


def search_class_means(
    configs: Sequence[AdapterConfig],
    train: SplitFeatures,
    queries: torch.Tensor,
    context: HeadContext,
    score: Any,
    build: Any,
) -> list[Any]:
    """Score gda or ncm points (`build(keys, values, config, context)` makes one) on `queries` in one pass: the
    class means come from one feature per image (per key view), each shrinkage's term is computed once, and every
    α and τ is one weighted sum. Returns the reports in `configs`' order."""
    q, finish, results = _search_start(configs, queries, context, score)
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(c.key_view, []).append(i)
    for members in groups.values():
        keys, values = image_keys(train, configs[members[0]], cap=False)
        terms: dict[str, torch.Tensor] = {}
        for i in members:
            c = configs[i]
            # the term depends on every field but α and τ, which `finish` applies: points that differ only there
            # share it (one per shrinkage for gda)
            key = repr(sorted({**c.to_dict(), "alpha": 0.0, "adjust_tau": 0.0}.items()))
            if key not in terms:
                terms[key] = build(keys, values, c, context).extra_logits(q)
            finish(i, terms[key])
    return results


def _search_start(
    configs: Sequence[AdapterConfig], queries: torch.Tensor, context: HeadContext, score: Any
) -> tuple[torch.Tensor, Any, list[Any]]:
    """Normalised queries, a `finish(i, term)` that reports point i from its term, and the reports list."""
    q = F.normalize(queries.float(), dim=-1)
    base = LOGIT_SCALE * q @ context.text.float().T
    results: list[Any] = [None] * len(configs)

    def finish(i: int, term: torch.Tensor) -> None:
        c = configs[i]
        logits = base + c.alpha * term
        results[i] = score(logits - c.adjust_tau * context.log_prior if c.adjust_tau else logits)

    return q, finish, results
