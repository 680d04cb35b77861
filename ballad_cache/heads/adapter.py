"""BALLAD phase B on cached features: the residual linear adapter, trained K configurations at once.

    x' = ratio * W f + (1 - ratio) * f        W: d×d, no bias, nn.Linear's default init
    logits = 100 * norm(x') · text_cᵀ          cross-entropy, SGD with momentum

Defaults are the official code's step for step (gaopengcuhk/BALLAD `train.py`, `clip_B_rn50.yaml`): floor(N/B)
full batches per epoch from OLTR's class-aware sampler, `CosineAnnealingLR(T_max=epochs)` stepped at each epoch
start, and the weights of the epoch with the best val top-1 kept.

Features in the cache are L2-normalised; the adapter is linear and the logits use norm(x'), so the image
norm cancels in the loss and its gradient: training on normalised features is exact.

Configurations that share an index stream (sampler, epochs, batch size, seed) train together: their weights
stack into one (K·d)×d matrix, so each step is one matmul for all K adapters, and SGD runs on the stack with a
per-adapter learning rate. Each adapter's arithmetic is the same as training it alone.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import setting
from ..inputs.longtail import class_log_prior
from ..progress import NullProgress, Progress
from ..registry import PRECISIONS
from ..schedules import SCHEDULES
from .batches import TrainRows, batch_schedule
from .metrics import per_image
from .registry import HEADS, LOGIT_SCALE, Head, HeadContext
from .terms import LOSSES, LossContext, LossTerm, cross_entropy

if TYPE_CHECKING:
    from .config import AdapterConfig


def init_weight(dim: int, seed: int) -> torch.Tensor:
    """W's initial value: `nn.Linear(dim, dim, bias=False)`'s default init under `torch.manual_seed(seed)`."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.empty(dim, dim)
    bound = 1.0 / math.sqrt(dim)  # kaiming_uniform_(a=sqrt(5)) reduces to U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    return w.uniform_(-bound, bound, generator=gen)


def adapt(features: torch.Tensor, weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """`ratio * W f + (1 - ratio) * f`, L2-normalised."""
    x = features.to(weight.dtype)
    return F.normalize(ratio * x @ weight.T + (1.0 - ratio) * x, dim=-1)


def adapter_logits(
    features: torch.Tensor,
    weight: torch.Tensor | None,
    ratio: float,
    text: torch.Tensor,
    scale: float = LOGIT_SCALE,
) -> torch.Tensor:
    """Class logits `scale * norm(x') · norm(text)ᵀ`; zero-shot (`norm(f)`) when `weight` is None.

    `text` is the class text embeddings or a cosine head's rows (normalised here; text embeddings already are).
    """
    # in the weight's dtype (float32 for a loaded head; float64 where a test scores float64 weights)
    x = F.normalize(features.float(), dim=-1) if weight is None else adapt(features, weight, ratio)
    return scale * x @ F.normalize(text.to(x.dtype), dim=-1).T


@dataclass
class FitResult:
    """Trained adapters of one stream group.

    `weights` are the selected ones (per `select`: the best val epoch or the last); `losses` holds every step's
    loss (K × steps); `val_top1` each epoch's val top-1 (K × epochs, empty without val); `best_epoch` the epoch
    whose weights were kept (0: the initial weights, as the official code's initial `best_epoch`).
    """

    configs: list[AdapterConfig]
    weights: torch.Tensor  # K×d×d
    losses: np.ndarray
    seconds: float
    steps: int = 0
    best_epoch: list[int] = field(default_factory=list)
    val_top1: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    heads: list[torch.Tensor | None] = field(default_factory=list)  # a cosine head's C×d rows (normalised), or None
    lrs: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))  # K × steps: each step's learning rate
    val_classes: np.ndarray = field(default_factory=lambda: np.zeros((0, 0, 0)))  # K×epochs×C per-class val acc


def fit_adapters(
    rows: TrainRows,
    text: torch.Tensor,
    configs: Sequence[AdapterConfig],
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    chunk: int | None = None,
    val: tuple[torch.Tensor, torch.Tensor] | None = None,
    stream: Sequence[np.ndarray] | None = None,
    init: torch.Tensor | None = None,
    on_epoch: Callable[[int, torch.Tensor], None] | None = None,
) -> FitResult:
    """Train K adapters that share an index stream as one batched computation.

    Args:
        rows: cached training rows.
        text: class embeddings C×d (L2-normalised).
        configs: K configurations with equal `stream_key()`; ratio, lr, momentum, weight decay, schedule and
            selection may differ.
        device: where to train.
        progress: progress sink (one unit per step).
        on_step: called with (step, per-adapter losses) after every step (tests, logging).
        chunk: adapters computed together per step; default all K on GPU (one wide matmul fills the device),
            `cpu_chunk(...)` on CPU, where K×B×(d+C) intermediates that spill out of cache cost more than the
            per-step work batching saves. Every chunk size gives the same result.
        val: (features, labels) scored after every epoch; needed by `select="best-val"` (without it the last
            epoch is kept).
        stream: per-epoch image indices replacing the sampler's (tests feed an independent sampler's stream).
        init: initial weights (d×d or K×d×d) replacing `nn.Linear`'s default init under each config's seed.
        on_epoch: called with (1-based epoch, K×d×d weights at its end).

    Training runs in the rows' dtype, at least float32: the cache's float16/float32 rows train in float32, float64
    rows in float64 (tests check the training against float64 references: float32 rounding, amplified over many
    steps, differs between CPUs; float64's is 2^29 times finer).

    The configurations' `precision` runs the step's matmuls in fp32, or in bf16 (fp32 loss, weights and optimizer
    state); bf16 pays off on GPUs and on CPUs with native bfloat16 (AVX-512-BF16, AMX), and is far slower on CPUs
    without.
    """
    if not configs:
        raise ValueError("no configurations to fit")
    keys = {c.stream_key() for c in configs}
    if len(keys) != 1:
        raise ValueError("configurations in one batched fit must share sampler, epochs, batch size and seed")
    if len({c.precision for c in configs}) != 1:
        raise ValueError("configurations in one batched fit must share their precision")
    progress = progress or NullProgress()
    device = torch.device(device)
    cfg0 = configs[0]
    k = len(configs)
    dim = rows.features.shape[1]
    dtype = torch.promote_types(rows.features.dtype, torch.float32)  # every tensor below in it (see above)
    feats = rows.features.to(device)
    text = text.to(device, dtype).clone()  # a plain tensor even if made in inference mode
    if init is None:
        w = torch.stack([init_weight(dim, c.seed) for c in configs]).to(device, dtype)  # K×d×d
    else:
        w = init.detach().to(dtype).reshape(-1, dim, dim).expand(k, dim, dim).clone().to(device)
    ratio = torch.tensor([c.ratio for c in configs], device=device, dtype=dtype).view(k, 1, 1)
    mom = torch.tensor([c.momentum for c in configs], device=device, dtype=dtype).view(k, 1, 1)
    wd = torch.tensor([c.weight_decay for c in configs], device=device, dtype=dtype).view(k, 1, 1)
    buf = torch.zeros_like(w)
    num_classes = text.shape[0]
    scale = torch.tensor([c.logit_scale for c in configs], device=device, dtype=dtype).view(k, 1, 1)
    # the prior of the training images, for losses that adjust logits (Menon et al.)
    log_prior = class_log_prior(np.bincount(rows.image_labels, minlength=num_classes)).to(device, dtype)
    # learnable heads (LIFT's cosine): C×d rows initialised from the text embeddings, normalised in the forward
    # pass; fixed heads ride along with a zero learning rate, so one batched step serves both
    cosine = [HEADS.get(c.head).trains_rows for c in configs]
    heads = text.unsqueeze(0).repeat(k, 1, 1) if any(cosine) else None
    head_buf = torch.zeros_like(heads) if heads is not None else None
    epochs = batch_schedule(rows, cfg0, stream)
    per_epoch = [len(e) for e in epochs]
    steps = [b for e in epochs for b in e]
    n = len(steps)
    if chunk is None:
        chunk = k if device.type == "cuda" else cpu_chunk(cfg0.batch_size, dim, text.shape[0])
    spans = [(a, min(a + chunk, k)) for a in range(0, k, chunk)]
    span_losses = [loss_groups(configs[a:b], log_prior) for a, b in spans]
    # the whole schedule, learning rates and losses live on the device: no host round trip inside an epoch
    bounds = np.concatenate([[0], np.cumsum([len(b) for b in steps])]).tolist()
    flat = torch.as_tensor(np.concatenate(steps) if n else np.zeros(0, np.int64), device=device)
    step_epoch = np.repeat(np.arange(len(per_epoch)), per_epoch)
    schedules = [SCHEDULES.get(c.schedule) for c in configs]
    lr_rows = [
        [f(c.lr, s, n, int(step_epoch[s]), cfg0.epochs) for f, c in zip(schedules, configs, strict=True)]
        for s in range(n)
    ]
    lr_table = torch.tensor(lr_rows, device=device, dtype=dtype).view(n, k, 1, 1)
    head_lr_table = torch.zeros_like(lr_table)
    for j, c in enumerate(configs):
        if cosine[j]:
            base = c.lr if c.head_lr is None else c.head_lr
            if c.lr:  # the adapter's schedule, scaled
                head_lr_table[:, j] = lr_table[:, j] * (base / c.lr)
            else:  # the adapter is frozen (lr 0): the head follows the same schedule from its own rate
                rates = [schedules[j](base, s, n, int(step_epoch[s]), cfg0.epochs) for s in range(n)]
                head_lr_table[:, j] = torch.tensor(rates, device=device, dtype=dtype).view(n, 1, 1)
    loss_dev = torch.zeros(k, n, device=device, dtype=dtype)
    report_every = max(1, n // 200)  # a progress update reads the loss back: a device sync
    select_best = [c.select == "best-val" and val is not None for c in configs]
    best_w = w.clone() if any(select_best) else None
    best_heads = heads.clone() if heads is not None and any(select_best) else None
    best_acc = [0.0] * k  # the official initial best_acc; strictly better replaces
    best_epoch = [0] * k
    val_top1 = np.zeros((k, len(per_epoch))) if val is not None else np.zeros((k, 0))
    val_classes = np.zeros((k, len(per_epoch) if val is not None else 0, num_classes))
    val_counts = np.bincount(val[1].cpu().numpy(), minlength=num_classes) if val is not None else None
    progress.start(f"fit {k} adapter(s)", n)
    t0 = time.perf_counter()
    row_labels = _row_labels(rows, device)
    step = 0
    for e, count in enumerate(per_epoch):
        for _ in range(count):
            idx = flat[bounds[step] : bounds[step + 1]]
            x = feats.index_select(0, idx).to(dtype)  # B×d
            y = row_labels.index_select(0, idx)
            lr = lr_table[step]
            for (a, b), groups in zip(spans, span_losses, strict=True):
                loss_dev[a:b, step] = adapter_step(
                    x,
                    y,
                    w[a:b],
                    ratio[a:b],
                    text,
                    wd[a:b],
                    mom[a:b],
                    lr[a:b],
                    buf[a:b],
                    step,
                    scale[a:b],
                    groups,
                    HeadState(heads[a:b], head_buf[a:b], head_lr_table[step, a:b])
                    if heads is not None and head_buf is not None
                    else None,
                    cfg0.precision,
                )
            if on_step is not None:
                on_step(step, loss_dev[:, step])
            if (step + 1) % report_every == 0 or step + 1 == n:
                done = (step % report_every) + 1
                progress.advance(done, loss=f"{loss_dev[:, step].mean().item():.3f}")
            step += 1
        if val is not None:
            class_correct = np.zeros((k, num_classes))
            val_top1[:, e] = val_accuracy(
                w, [c.ratio for c in configs], heads if heads is not None else text, val[0], val[1],
                class_correct=class_correct,
            )  # fmt: skip
            assert val_counts is not None
            with np.errstate(invalid="ignore", divide="ignore"):
                val_classes[:, e] = 100.0 * class_correct / val_counts  # NaN: a class without val images
            for j in range(k):
                if select_best[j] and val_top1[j, e] > best_acc[j]:
                    best_acc[j], best_epoch[j] = float(val_top1[j, e]), e + 1
                    assert best_w is not None
                    best_w[j].copy_(w[j])
                    if best_heads is not None and heads is not None:
                        best_heads[j].copy_(heads[j])
        if on_epoch is not None:
            on_epoch(e + 1, w)
    final = w.clone()
    final_heads = heads.clone() if heads is not None else None
    for j in range(k):
        if select_best[j]:
            assert best_w is not None
            final[j] = best_w[j]
            if final_heads is not None and best_heads is not None:
                final_heads[j] = best_heads[j]
        else:
            best_epoch[j] = len(per_epoch)
    losses = loss_dev.double().cpu().numpy()
    out_heads = [
        F.normalize(final_heads[j], dim=-1).cpu() if final_heads is not None and cosine[j] else None for j in range(k)
    ]
    lrs = lr_table.reshape(n, k).T.double().cpu().numpy()
    return FitResult(
        list(configs), final.cpu(), losses, time.perf_counter() - t0, n, best_epoch, val_top1, out_heads, lrs,
        val_classes,
    )  # fmt: skip


@torch.no_grad()
def val_accuracy(
    weights: torch.Tensor,
    ratios: Sequence[float],
    text: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    rows_per_chunk: int = 8192,
    class_correct: np.ndarray | None = None,
) -> np.ndarray:
    """Top-1 accuracy (percent) of each of K adapters (K×d×d) on (features, labels), in chunks of images; V views
    of each image (V·N feature rows, view-major) are scored by their mean logits (`metrics.per_image`).

    `text` is the shared C×d class embeddings, or K×C×d heads (one per adapter). `class_correct` (K×C), when
    given, receives each adapter's count of correct images per class (for many/medium/few per epoch).
    """
    device = weights.device
    correct = np.zeros(len(ratios))
    n = len(labels)
    views = features.reshape(-1, n, features.shape[-1]) if n else features[None]
    step = max(1, rows_per_chunk // views.shape[0])
    for a in range(0, n, step):
        x = views[:, a : a + step].reshape(-1, views.shape[-1]).to(device, weights.dtype)
        y = labels[a : a + step].to(device)
        for j, r in enumerate(ratios):
            logits = adapter_logits(x, weights[j], r, text[j] if text.dim() == 3 else text)
            pred = per_image(logits, len(y)).argmax(dim=1)
            correct[j] += float((pred == y).sum())
            if class_correct is not None:
                hits = torch.bincount(y[pred == y], minlength=class_correct.shape[1])
                class_correct[j] += hits.cpu().numpy()
    return 100.0 * correct / max(len(labels), 1)


def cpu_chunk(batch_size: int, dim: int, num_classes: int, budget_bytes: int = 8 << 20) -> int:
    """Adapters per chunk on CPU: as many as keep one step's B×(d+C) float32 intermediates within `budget`."""
    return max(1, budget_bytes // (batch_size * (dim + num_classes) * 4))


@dataclass
class HeadState:
    """Learnable heads of a chunk (k×C×d, trained in place), their momentum buffers and this step's learning rates."""

    rows: torch.Tensor
    buf: torch.Tensor
    lr: torch.Tensor


@dataclass
class LossGroup:
    """Adapters of one chunk that share a loss: the registered term, their positions in the chunk, its context."""

    term: LossTerm
    rows: torch.Tensor | None  # positions within the chunk; None: the whole chunk
    context: LossContext


def loss_groups(configs: Sequence[AdapterConfig], log_prior: torch.Tensor) -> list[LossGroup]:
    """The chunk's adapters grouped by loss, in first-seen order (one group when they all share one)."""
    names: dict[str, list[int]] = {}
    for j, c in enumerate(configs):
        names.setdefault(c.loss, []).append(j)
    whole = len(names) == 1
    return [
        LossGroup(
            LOSSES.get(name),
            None if whole else torch.tensor(idx, device=log_prior.device),
            LossContext([configs[j] for j in idx], log_prior),
        )
        for name, idx in names.items()
    ]


def adapter_step(
    x: torch.Tensor,
    y: torch.Tensor,
    w: torch.Tensor,
    ratio: torch.Tensor,
    text: torch.Tensor,
    wd: torch.Tensor,
    mom: torch.Tensor,
    lr: torch.Tensor,
    buf: torch.Tensor,
    step: int,
    scale: torch.Tensor | None = None,
    losses: Sequence[LossGroup] | None = None,
    heads: HeadState | None = None,
    precision: str = "fp32",
) -> torch.Tensor:
    """One SGD step, in place, for the adapters `w` (k×d×d views) on batch (x, y); returns their k losses.

    Logits are `scale * norm(x') · textᵀ` (CLIP's 100 by default), or against each adapter's normalised head rows
    when `heads` is given (those train too, at their own rate). `losses` are the registered loss terms of the
    chunk (`loss_groups`; default cross-entropy for all). With `precision="bf16"` the matmuls (forward and
    backward) run in bfloat16; normalisation, the loss, the weights and the optimizer state stay float32.
    """
    k, dim, _ = w.shape
    b = x.shape[0]
    leaf = w.detach().view(k * dim, dim).requires_grad_()
    with _matmul_precision(x.device, precision):
        h = (x @ leaf.T).view(b, k, dim).transpose(0, 1)  # k×B×d, one matmul for the chunk
    h = F.normalize(ratio * h.to(x.dtype) + (1.0 - ratio) * x.unsqueeze(0), dim=-1)
    leaves = [leaf]
    if heads is None:
        with _matmul_precision(x.device, precision):
            logits = (LOGIT_SCALE * h.reshape(k * b, dim) @ text.T).view(k, b, -1)
        logits = logits.to(x.dtype)
        if scale is not None:
            logits = logits * (scale / LOGIT_SCALE)
    else:
        head_leaf = heads.rows.detach().requires_grad_()
        leaves.append(head_leaf)
        with _matmul_precision(x.device, precision):
            logits = torch.bmm(h, F.normalize(head_leaf, dim=-1).transpose(1, 2))
        logits = logits.to(x.dtype) * (scale if scale is not None else LOGIT_SCALE)
    if not losses:
        per = cross_entropy(logits, y)
    elif len(losses) == 1 and losses[0].rows is None:
        per = losses[0].term.fn(logits, y, losses[0].context)
    else:
        per = logits.new_zeros(k)
        for group in losses:
            assert group.rows is not None
            per = per.index_put((group.rows,), group.term.fn(logits[group.rows], y, group.context))
    grads = torch.autograd.grad(per.sum(), leaves)
    with torch.no_grad():
        _sgd(w, grads[0].view(k, dim, dim), wd, mom, lr, buf, step)
        if heads is not None:
            _sgd(heads.rows, grads[1], wd, mom, heads.lr, heads.buf, step)
    return per.detach()


def _matmul_precision(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for the matmuls inside, or nothing for fp32."""
    dtype = PRECISIONS.get(precision)
    return contextlib.nullcontext() if dtype == "float32" else torch.autocast(device.type, dtype=getattr(torch, dtype))


def _sgd(
    p: torch.Tensor,
    g: torch.Tensor,
    wd: torch.Tensor,
    mom: torch.Tensor,
    lr: torch.Tensor,
    buf: torch.Tensor,
    step: int,
) -> None:
    """torch.optim.SGD's update (weight decay added to the gradient, momentum without dampening), in place."""
    g = g.add_(wd * p)
    if step == 0:
        buf.copy_(g)  # first step: buf = g, as torch does
    else:
        buf.mul_(mom).add_(g)
    p.sub_(lr * buf)


def _row_labels(rows: TrainRows, device: torch.device) -> torch.Tensor:
    labels = torch.full((rows.features.shape[0],), -1, dtype=torch.int64)
    flat = torch.as_tensor(rows.view_rows.reshape(-1))
    labels[flat] = torch.as_tensor(np.repeat(rows.image_labels, rows.view_rows.shape[1]))
    return labels.to(device)


def group_by_stream(configs: Sequence[AdapterConfig]) -> list[list[int]]:
    """Indices of `configs` that can train as one batched fit (shared index stream and precision), in first-seen
    order."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault((*c.stream_key(), c.precision), []).append(i)
    return list(groups.values())


class AdapterHead(Head):
    """BALLAD's residual adapter (or none: zero-shot) scored against the class text embeddings or a trained cosine
    head's rows: `scale * norm(ratio * W f + (1 - ratio) * f) · norm(rows)ᵀ`.

    `weight` None scores `norm(f)`: zero-shot, or features whose tower already applies the adapter (`fold`).
    """

    def __init__(
        self,
        config: AdapterConfig,
        context: HeadContext,
        weight: torch.Tensor | None,
        rows: torch.Tensor | None = None,
    ) -> None:
        self.config = config
        self.context = context
        self.weight = None if weight is None else weight.float()
        self.rows = None if rows is None else rows.float()  # normalised where scored (adapter_logits)

    @property
    def classes(self) -> torch.Tensor:
        """The rows logits are taken against: the trained head, else the class text embeddings."""
        return self.rows if self.rows is not None else self.context.text

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits of features (see the class docstring), on the CPU."""
        features = features.cpu()
        return adapter_logits(features, self.weight, self.config.ratio, self.classes, self.config.logit_scale)

    def state(self) -> dict[str, torch.Tensor]:
        """`weight` (d×d; absent once folded) and `head` (C×d, a cosine head's rows)."""
        out = {} if self.weight is None else {"weight": self.weight}
        return out if self.rows is None else {**out, "head": self.rows}

    def fold(self) -> tuple[torch.Tensor | None, Head]:
        """`M = (1 - ratio) I + ratio W` (float64) and this head without its weight."""
        if self.weight is None:
            return None, self
        return adapter_matrix(self.weight, self.config.ratio), AdapterHead(self.config, self.context, None, self.rows)


def adapter_matrix(weight: torch.Tensor, ratio: float) -> torch.Tensor:
    """`M = (1 - ratio) I + ratio W`: the adapter as one linear map, `x' = M f`."""
    dim = weight.shape[0]
    return (1.0 - ratio) * torch.eye(dim, dtype=torch.float64) + ratio * weight.double()


def load_adapter_head(config: AdapterConfig, state: dict[str, torch.Tensor], context: HeadContext) -> AdapterHead:
    """An adapter head from its saved tensors; checks shapes against the context and that they are finite.

    Raises:
        ValueError: a missing weight (unless `context.folded`), a shape that does not fit, NaN/Inf.
    """
    weight, rows = state.get("weight"), state.get("head")
    dim = context.dim
    if weight is None and not context.folded:
        raise ValueError("it holds no adapter weight")
    if weight is not None and tuple(weight.shape) != (dim, dim):
        raise ValueError(f"it holds a weight of shape {tuple(weight.shape)}, the cache has dim {dim}")
    if rows is not None and tuple(rows.shape) != (context.num_classes, dim):
        raise ValueError(f"it has a head of shape {tuple(rows.shape)}, not the cache's {context.num_classes} classes")
    if HEADS.get(config.head).trains_rows and rows is None:
        raise ValueError(f"it lacks the {config.head} head its config names")
    if any(t is not None and not torch.isfinite(t).all() for t in (weight, rows)):
        raise ValueError(f"it holds NaN/Inf weights (a diverged fit); refit with a lower {setting('lr')}")
    return AdapterHead(config, context, weight, rows)
