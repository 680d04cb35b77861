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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import atomic_path, read_json, sha256_file, sha256_json, write_json
from ..errors import BalladError
from ..inputs.longtail import class_log_prior
from ..inputs.samplers import index_stream
from ..progress import NullProgress, Progress
from ..registry import PRECISIONS
from ..schedules import SCHEDULES, batches_per_epoch
from ..store.cache import FeatureCache, SplitFeatures
from .config import AdapterConfig
from .memory import MemoryHead, load_memory_head
from .terms import HEADS, LOGIT_SCALE, LOSSES, LossContext, LossTerm, cross_entropy


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
    x = F.normalize(features.float(), dim=-1) if weight is None else adapt(features.float(), weight, ratio)
    return scale * x @ F.normalize(text.float(), dim=-1).T.to(x.dtype)


@dataclass
class TrainRows:
    """Training rows for phase B: image labels and, per image, the rows of its views in the feature matrix."""

    features: torch.Tensor  # all cached train rows
    image_labels: np.ndarray  # label per image (index stream domain)
    view_rows: np.ndarray  # images × V: the feature rows of each image's views (augmented views when present)

    @classmethod
    def from_split(cls, split: SplitFeatures) -> TrainRows:
        """Group a cached split's rows by image; with augmented views, draws use only those (as the official
        phase B trains on augmented images); otherwise the eval view."""
        view = split.view.numpy()
        use = view > 0 if (view > 0).any() else view == 0
        rows = np.flatnonzero(use)
        img = split.index.numpy()[rows]
        order = np.lexsort((view[rows], img))
        rows, img = rows[order], img[order]
        _, starts, counts = np.unique(img, return_index=True, return_counts=True)
        v = int(counts.min()) if len(counts) else 1
        view_rows = np.stack([rows[starts + j] for j in range(v)], axis=1) if len(counts) else np.empty((0, 1), int)
        labels = split.labels.numpy()[rows[starts]] if len(counts) else np.empty(0, np.int64)
        return cls(split.features, labels.astype(np.int64), view_rows)

    def draw(self, images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Feature rows for a batch of image draws, each picking one of the image's views at random."""
        if self.view_rows.shape[1] == 1:
            return self.view_rows[images, 0]
        return self.view_rows[images, rng.integers(0, self.view_rows.shape[1], size=len(images))]


def steps_per_epoch(num_images: int, config: AdapterConfig) -> int:
    """Optimizer steps in one epoch: floor(N/B) full batches (official), or ceil(N/B) with `keep_last_batch`.

    Raises:
        BalladError: fewer training images than one batch under the official floor(N/B) (no step would run).
    """
    return batches_per_epoch(num_images, config.batch_size, config.keep_last_batch, config.epochs)


def batch_schedule(
    rows: TrainRows, config: AdapterConfig, stream: Sequence[np.ndarray] | None = None
) -> list[list[np.ndarray]]:
    """The feature rows of every step, epoch by epoch.

    Args:
        rows: cached training rows.
        config: sampler, epochs, batch size and seed.
        stream: per-epoch image indices to use instead of the sampler's (tests, benchmarks); each epoch is cut
            into batches the same way, its length taking the place of the number of images.
    """
    if stream is None:
        n_steps = steps_per_epoch(len(rows.image_labels), config)
        draws = len(rows.image_labels) if config.keep_last_batch else n_steps * config.batch_size
        stream = index_stream(
            rows.image_labels, config.sampler, config.epochs, config.seed, config.samples_per_class, draws
        )
    view_rng = np.random.default_rng(config.seed + 1)
    epochs = []
    for images in stream:
        keep = len(images) if config.keep_last_batch else steps_per_epoch(len(images), config) * config.batch_size
        picked = rows.draw(np.asarray(images)[:keep], view_rng)
        epochs.append([picked[i : i + config.batch_size] for i in range(0, len(picked), config.batch_size)])
    return epochs


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
    feats = rows.features.to(device)
    text = text.to(device, torch.float32).clone()  # a plain tensor even if made in inference mode
    if init is None:
        w = torch.stack([init_weight(dim, c.seed) for c in configs]).to(device)  # K×d×d
    else:
        w = init.detach().float().reshape(-1, dim, dim).expand(k, dim, dim).clone().to(device)
    ratio = torch.tensor([c.ratio for c in configs], device=device).view(k, 1, 1)
    mom = torch.tensor([c.momentum for c in configs], device=device).view(k, 1, 1)
    wd = torch.tensor([c.weight_decay for c in configs], device=device).view(k, 1, 1)
    buf = torch.zeros_like(w)
    num_classes = text.shape[0]
    scale = torch.tensor([c.logit_scale for c in configs], device=device).view(k, 1, 1)
    # the prior of the training images, for losses that adjust logits (Menon et al.)
    log_prior = class_log_prior(np.bincount(rows.image_labels, minlength=num_classes)).to(device)
    # learnable heads (LIFT's cosine): C×d rows initialised from the text embeddings, normalised in the forward
    # pass; fixed heads ride along with a zero learning rate, so one batched step serves both
    cosine = [HEADS.get(c.head).learnable for c in configs]
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
    lr_table = torch.tensor(lr_rows, device=device, dtype=torch.float32).view(n, k, 1, 1)
    head_lr_table = torch.zeros_like(lr_table)
    for j, c in enumerate(configs):
        if cosine[j]:
            base = c.lr if c.head_lr is None else c.head_lr
            if c.lr:  # the adapter's schedule, scaled
                head_lr_table[:, j] = lr_table[:, j] * (base / c.lr)
            else:  # the adapter is frozen (lr 0): the head follows the same schedule from its own rate
                rates = [schedules[j](base, s, n, int(step_epoch[s]), cfg0.epochs) for s in range(n)]
                head_lr_table[:, j] = torch.tensor(rates, device=device).view(n, 1, 1)
    loss_dev = torch.zeros(k, n, device=device)
    report_every = max(1, n // 200)  # a progress update reads the loss back: a device sync
    select_best = [c.select == "best-val" and val is not None for c in configs]
    best_w = w.clone() if any(select_best) else None
    best_heads = heads.clone() if heads is not None and any(select_best) else None
    best_acc = [0.0] * k  # the official initial best_acc; strictly better replaces
    best_epoch = [0] * k
    val_top1 = np.zeros((k, len(per_epoch))) if val is not None else np.zeros((k, 0))
    progress.start(f"fit {k} adapter(s)", n)
    t0 = time.perf_counter()
    row_labels = _row_labels(rows, device)
    step = 0
    for e, count in enumerate(per_epoch):
        for _ in range(count):
            idx = flat[bounds[step] : bounds[step + 1]]
            x = feats.index_select(0, idx).float()  # B×d
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
            val_top1[:, e] = val_accuracy(
                w, [c.ratio for c in configs], heads if heads is not None else text, val[0], val[1]
            )
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
    return FitResult(list(configs), final.cpu(), losses, time.perf_counter() - t0, n, best_epoch, val_top1, out_heads)


@torch.no_grad()
def val_accuracy(
    weights: torch.Tensor,
    ratios: Sequence[float],
    text: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor,
    rows_per_chunk: int = 8192,
) -> np.ndarray:
    """Top-1 accuracy (percent) of each of K adapters (K×d×d) on (features, labels), in row chunks.

    `text` is the shared C×d class embeddings, or K×C×d heads (one per adapter).
    """
    device = weights.device
    correct = np.zeros(len(ratios))
    for a in range(0, len(labels), rows_per_chunk):
        x = features[a : a + rows_per_chunk].to(device, torch.float32)
        y = labels[a : a + rows_per_chunk].to(device)
        for j, r in enumerate(ratios):
            pred = adapter_logits(x, weights[j], r, text[j] if text.dim() == 3 else text).argmax(dim=1)
            correct[j] += float((pred == y).sum())
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
    h = F.normalize(ratio * h.float() + (1.0 - ratio) * x.unsqueeze(0), dim=-1)
    leaves = [leaf]
    if heads is None:
        with _matmul_precision(x.device, precision):
            logits = (LOGIT_SCALE * h.reshape(k * b, dim) @ text.T).view(k, b, -1)
        logits = logits.float()
        if scale is not None:
            logits = logits * (scale / LOGIT_SCALE)
    else:
        head_leaf = heads.rows.detach().requires_grad_()
        leaves.append(head_leaf)
        with _matmul_precision(x.device, precision):
            logits = torch.bmm(h, F.normalize(head_leaf, dim=-1).transpose(1, 2))
        logits = logits.float() * (scale if scale is not None else LOGIT_SCALE)
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


# ---------------------------------------------------------------------------------------------- adapter files

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_META = "adapter.json"


@dataclass
class Adapter:
    """A trained adapter: its weight, configuration and the cache it was fitted on."""

    weight: torch.Tensor
    config: AdapterConfig
    cache_fingerprint: str
    meta: dict[str, Any]
    head: torch.Tensor | None = None  # a trained cosine head's C×d rows; None: the class text embeddings
    memory: MemoryHead | None = None  # a head built from the training features (its weight is the identity)

    def classes(self, text: torch.Tensor) -> torch.Tensor:
        """The rows logits are taken against: the trained head, else the class text embeddings."""
        return self.head if self.head is not None else text

    def logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Class logits of cached features (`text`: the cache's class embeddings, used without a trained head)."""
        if self.memory is not None:
            return self.memory.logits(features, text)
        return adapter_logits(features, self.weight, self.config.ratio, self.classes(text), self.config.logit_scale)


def save_adapter(
    folder: str | Path,
    weight: torch.Tensor,
    config: AdapterConfig,
    cache: FeatureCache,
    extra: dict[str, Any] | None = None,
    head: torch.Tensor | None = None,
    memory: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write `adapter.safetensors` (`weight`, `head` for a cosine head; a memory head's tensors as `memory.NAME`
    and no weight) and `adapter.json` (config, cache fingerprint and model, the prompt templates of the class
    embeddings, extra metrics)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = memory_tensors(memory) if memory is not None else {"weight": weight.detach().float().contiguous().cpu()}
    if head is not None:
        tensors["head"] = head.detach().float().contiguous().cpu()
    with atomic_path(folder / ADAPTER_WEIGHTS) as tmp:
        save_file(tensors, str(tmp))
    meta = {
        "kind": "ballad-adapter",
        "weights_sha256": sha256_file(folder / ADAPTER_WEIGHTS),  # load_adapter checks the weights against it
        "config_sha256": sha256_json(config.to_dict()),  # and the config
        "config": config.to_dict(),
        "cache_fingerprint": cache.fingerprint,
        "cache": str(cache.path),
        "model": cache.manifest["model"],
        "templates": cache.manifest.get("templates", []),
        "template_set": cache.manifest.get("config", {}).get("templates"),
        "embed_dim": int(weight.shape[-1]),
        **({"train_class_counts": cache.train_counts.tolist()} if memory is not None else {}),
        **(extra or {}),
    }
    write_json(folder / ADAPTER_META, meta)
    return folder


def load_adapter(folder: str | Path, cache: FeatureCache | None = None) -> Adapter:
    """Read an adapter (safetensors only: nothing is unpickled); refuse one fitted on another cache.

    Raises:
        BalladError: missing or malformed files, or a cache fingerprint that differs from `cache`'s.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = Path(folder)
    meta = read_json(folder / ADAPTER_META)
    try:
        config = AdapterConfig.from_dict(meta["config"])
        edited = "config_sha256" in meta and sha256_json(meta["config"]) != meta["config_sha256"]
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise BalladError(f"{folder / ADAPTER_META} has no valid config ({exc!s}); refit the adapter") from None
    if edited:
        raise BalladError(f"{folder / ADAPTER_META} was edited: its config does not match its config_sha256; refit")
    recorded = meta.get("weights_sha256")  # adapters written before it was recorded have none
    if (
        recorded is not None
        and (folder / ADAPTER_WEIGHTS).exists()
        and sha256_file(folder / ADAPTER_WEIGHTS) != recorded
    ):
        raise BalladError(f"{folder / ADAPTER_WEIGHTS} does not match the sha256 in {ADAPTER_META} (changed); refit")
    try:
        tensors = load_file(str(folder / ADAPTER_WEIGHTS))
        memory = None
        if HEADS.get(config.head).memory:
            memory = _load_memory(folder, config, tensors, cache)
            tensors["weight"] = torch.eye(int(meta.get("embed_dim", 0)))  # the features pass unchanged
        weight, head = tensors["weight"].float(), tensors.get("head")
    except FileNotFoundError:
        raise BalladError(f"{folder / ADAPTER_WEIGHTS} does not exist; fit the adapter first") from None
    except (SafetensorError, KeyError, OSError) as exc:
        raise BalladError(f"{folder / ADAPTER_WEIGHTS} is not a valid adapter file ({exc}); refit it") from None
    dim = weight.shape[0] if weight.dim() == 2 else -1
    if weight.dim() != 2 or weight.shape[1] != dim or (head is not None and (head.dim() != 2 or head.shape[1] != dim)):
        raise BalladError(f"{folder / ADAPTER_WEIGHTS} holds a weight of shape {tuple(weight.shape)}; refit it")
    if not torch.isfinite(weight).all() or (head is not None and not torch.isfinite(head).all()):
        raise BalladError(f"{folder / ADAPTER_WEIGHTS} holds NaN/Inf weights (a diverged fit); refit with a lower --lr")
    if cache is not None:
        if meta.get("cache_fingerprint") != cache.fingerprint:
            same_model = meta.get("model") == cache.manifest.get("model")
            why = "another extraction of the same model" if same_model else "a cache of another model"
            raise BalladError(
                f"adapter {folder} was fitted on cache {meta.get('cache_fingerprint')}, not {cache.fingerprint} "
                f"({why}); refit it on {cache.path}"
            )
        if weight.shape != (cache.manifest["embed_dim"],) * 2:
            raise BalladError(
                f"adapter {folder} is {tuple(weight.shape)}, the cache has dim {cache.manifest['embed_dim']}"
            )
        if head is not None and head.shape != (cache.num_classes, cache.manifest["embed_dim"]):
            raise BalladError(f"adapter {folder} has a head of shape {tuple(head.shape)}, not the cache's classes")
    if HEADS.get(config.head).learnable and head is None and memory is None:
        raise BalladError(f"{folder / ADAPTER_WEIGHTS} lacks the cosine head its adapter.json names; refit it")
    return Adapter(weight, config, str(meta.get("cache_fingerprint")), meta, head, memory)


def memory_tensors(memory: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A memory head's tensors as stored: `memory.NAME`, contiguous, on the CPU."""
    return {f"memory.{k}": v.detach().contiguous().cpu() for k, v in memory.items()}


def _load_memory(
    folder: Path, config: AdapterConfig, tensors: dict[str, torch.Tensor], cache: FeatureCache | None
) -> MemoryHead:
    """The memory head stored in an adapter file; the prior comes from the training counts recorded at the fit (so
    an adapter handed another cache reaches the fingerprint check and its message)."""
    own = {k.removeprefix("memory."): v for k, v in tensors.items() if k.startswith("memory.")}
    counts = read_json(folder / ADAPTER_META).get("train_class_counts")  # recorded at the fit
    if counts is None and cache is not None:
        counts = cache.train_counts.tolist()
    if not isinstance(counts, list):
        raise BalladError(f"{folder / ADAPTER_META} lacks the training counts of its {config.head} head; refit it")
    try:
        return load_memory_head(config, own, class_log_prior(counts))
    except ValueError as exc:
        raise BalladError(f"{folder / ADAPTER_WEIGHTS}: {exc}; refit it") from None
