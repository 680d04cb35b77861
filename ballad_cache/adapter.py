"""BALLAD phase B on cached features: the residual linear adapter, trained K configurations at once.

    x' = ratio * W f + (1 - ratio) * f        W: d×d, no bias, nn.Linear's default init
    logits = 100 * norm(x') · text_cᵀ          cross-entropy, SGD with momentum, cosine per step

Features in the cache are L2-normalised; the adapter is linear and the logits use norm(x'), so the image
norm cancels in the loss and its gradient: training on normalised features is exact.

Configurations that share an index stream (sampler, epochs, batch size, seed) train together: their weights
stack into one (K·d)×d matrix, so each step is one matmul for all K adapters, and SGD runs on the stack with a
per-adapter learning rate. Each adapter's arithmetic is the same as training it alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .atomic import atomic_path, read_json, write_json
from .cache import FeatureCache, SplitFeatures
from .errors import BalladError
from .progress import NullProgress, Progress
from .samplers import SAMPLERS, index_stream

LOGIT_SCALE = 100.0  # CLIP's learned scale, fixed at 100 as in BALLAD


@dataclass
class AdapterConfig:
    """One phase-B configuration; defaults follow the official BALLAD code."""

    ratio: float = 0.2  # residual mix: ratio * W f + (1 - ratio) * f (BALLAD)
    sampler: str = "class-aware"  # index stream; see ballad_cache.samplers
    samples_per_class: int = 4  # consecutive draws from one class (OLTR ClassAwareSampler)
    lr: float = 0.2  # SGD learning rate, cosine-annealed per step to ~0
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 10  # one epoch = as many draws as training images
    batch_size: int = 512
    seed: int = 0  # seeds W's init and the index stream

    def __post_init__(self) -> None:
        if not 0.0 <= self.ratio <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.epochs < 0 or self.batch_size < 1 or self.lr < 0 or self.samples_per_class < 1:
            raise ValueError("epochs and lr must be >= 0, batch_size and samples_per_class >= 1")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler '{self.sampler}'; known: {', '.join(SAMPLERS)}")

    def stream_key(self) -> tuple[Any, ...]:
        """Configurations with equal keys draw the same batches and can train together."""
        return (self.sampler, self.samples_per_class, self.epochs, self.batch_size, self.seed)

    def to_dict(self) -> dict[str, Any]:
        """As a plain dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AdapterConfig:
        """From a dict, ignoring unknown keys."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


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
    features: torch.Tensor, weight: torch.Tensor | None, ratio: float, text: torch.Tensor
) -> torch.Tensor:
    """Class logits `100 * norm(x') · textᵀ`; zero-shot (`norm(f) · textᵀ`) when `weight` is None."""
    x = F.normalize(features.float(), dim=-1) if weight is None else adapt(features.float(), weight, ratio)
    return LOGIT_SCALE * x @ text.T.to(x.dtype)


def cosine_lr(base: float, step: int, total: int) -> float:
    """Cosine annealing per step: `base` at step 0, approaching 0 (never reaching it) at the last step."""
    return 0.5 * base * (1.0 + math.cos(math.pi * step / max(total, 1)))


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


def batch_schedule(rows: TrainRows, config: AdapterConfig) -> list[np.ndarray]:
    """The feature rows of every step, in order: the index stream cut into batches (last partial batch kept)."""
    epochs = index_stream(rows.image_labels, config.sampler, config.epochs, config.seed, config.samples_per_class)
    view_rng = np.random.default_rng(config.seed + 1)
    steps = []
    for images in epochs:
        picked = rows.draw(images, view_rng)
        steps += [picked[i : i + config.batch_size] for i in range(0, len(picked), config.batch_size)]
    return steps


@dataclass
class FitResult:
    """Trained adapters of one stream group, with their loss at every step (K × steps)."""

    configs: list[AdapterConfig]
    weights: torch.Tensor  # K×d×d
    losses: np.ndarray
    seconds: float


def fit_adapters(
    rows: TrainRows,
    text: torch.Tensor,
    configs: Sequence[AdapterConfig],
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    on_step: Callable[[int, torch.Tensor], None] | None = None,
    chunk: int | None = None,
) -> FitResult:
    """Train K adapters that share an index stream as one batched computation.

    Args:
        rows: cached training rows.
        text: class embeddings C×d (L2-normalised).
        configs: K configurations with equal `stream_key()`; ratio, lr, momentum and weight decay may differ.
        device: where to train.
        progress: progress sink (one unit per step).
        on_step: called with (step, per-adapter losses) after every step (tests, logging).
        chunk: adapters computed together per step; default all K on GPU (one wide matmul fills the device),
            `cpu_chunk(...)` on CPU, where K×B×(d+C) intermediates that spill out of cache cost more than the
            per-step work batching saves. Every chunk size gives the same result.
    """
    if not configs:
        raise ValueError("no configurations to fit")
    keys = {c.stream_key() for c in configs}
    if len(keys) != 1:
        raise ValueError("configurations in one batched fit must share sampler, epochs, batch size and seed")
    progress = progress or NullProgress()
    device = torch.device(device)
    cfg0 = configs[0]
    k = len(configs)
    dim = rows.features.shape[1]
    feats = rows.features.to(device)
    text = text.to(device, torch.float32)
    w = torch.stack([init_weight(dim, c.seed) for c in configs]).to(device)  # K×d×d
    ratio = torch.tensor([c.ratio for c in configs], device=device).view(k, 1, 1)
    lr0 = [c.lr for c in configs]
    mom = torch.tensor([c.momentum for c in configs], device=device).view(k, 1, 1)
    wd = torch.tensor([c.weight_decay for c in configs], device=device).view(k, 1, 1)
    buf = torch.zeros_like(w)
    steps = batch_schedule(rows, cfg0)
    n = len(steps)
    if chunk is None:
        chunk = k if device.type == "cuda" else cpu_chunk(cfg0.batch_size, dim, text.shape[0])
    spans = [(a, min(a + chunk, k)) for a in range(0, k, chunk)]
    # the whole schedule, learning rates and losses live on the device: no host round trip inside the loop
    bounds = np.concatenate([[0], np.cumsum([len(b) for b in steps])]).tolist()
    flat = torch.as_tensor(np.concatenate(steps) if n else np.zeros(0, np.int64), device=device)
    lr_table = torch.tensor([[cosine_lr(base, s, n) for base in lr0] for s in range(n)], device=device).view(n, k, 1, 1)
    loss_dev = torch.zeros(k, n, device=device)
    report_every = max(1, n // 200)  # a progress update reads the loss back: a device sync
    progress.start(f"fit {k} adapter(s)", n)
    t0 = time.perf_counter()
    row_labels = _row_labels(rows, device)
    for step in range(n):
        idx = flat[bounds[step] : bounds[step + 1]]
        x = feats.index_select(0, idx).float()  # B×d
        y = row_labels.index_select(0, idx)
        lr = lr_table[step]
        for a, e in spans:
            loss_dev[a:e, step] = _adapter_step(
                x, y, w[a:e], ratio[a:e], text, wd[a:e], mom[a:e], lr[a:e], buf[a:e], step
            )
        if on_step is not None:
            on_step(step, loss_dev[:, step])
        if (step + 1) % report_every == 0 or step + 1 == n:
            done = (step % report_every) + 1
            progress.advance(done, loss=f"{loss_dev[:, step].mean().item():.3f}")
    losses = loss_dev.double().cpu().numpy()
    return FitResult(list(configs), w.cpu(), losses, time.perf_counter() - t0)


def cpu_chunk(batch_size: int, dim: int, num_classes: int, budget_bytes: int = 8 << 20) -> int:
    """Adapters per chunk on CPU: as many as keep one step's B×(d+C) float32 intermediates within `budget`."""
    return max(1, budget_bytes // (batch_size * (dim + num_classes) * 4))


def _adapter_step(
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
) -> torch.Tensor:
    """One SGD step, in place, for the adapters `w` (k×d×d views) on batch (x, y); returns their k losses."""
    k, dim, _ = w.shape
    b = x.shape[0]
    leaf = w.detach().view(k * dim, dim).requires_grad_()
    h = (x @ leaf.T).view(b, k, dim).transpose(0, 1)  # k×B×d, one matmul for the chunk
    h = F.normalize(ratio * h + (1.0 - ratio) * x.unsqueeze(0), dim=-1)
    logits = LOGIT_SCALE * h.reshape(k * b, dim) @ text.T
    per = F.cross_entropy(logits, y.repeat(k), reduction="none").view(k, b).mean(dim=1)
    grad = torch.autograd.grad(per.sum(), leaf)[0].view(k, dim, dim)
    with torch.no_grad():
        g = grad.add_(wd * w)  # torch.optim.SGD: weight decay added to the gradient
        if step == 0:
            buf.copy_(g)  # first step: buf = g, as torch does
        else:
            buf.mul_(mom).add_(g)
        w.sub_(lr * buf)
    return per.detach()


def _row_labels(rows: TrainRows, device: torch.device) -> torch.Tensor:
    labels = torch.full((rows.features.shape[0],), -1, dtype=torch.int64)
    flat = torch.as_tensor(rows.view_rows.reshape(-1))
    labels[flat] = torch.as_tensor(np.repeat(rows.image_labels, rows.view_rows.shape[1]))
    return labels.to(device)


def group_by_stream(configs: Sequence[AdapterConfig]) -> list[list[int]]:
    """Indices of `configs` grouped by shared index stream, in first-seen order."""
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(c.stream_key(), []).append(i)
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

    def logits(self, features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Class logits of cached features."""
        return adapter_logits(features, self.weight, self.config.ratio, text)


def save_adapter(
    folder: str | Path,
    weight: torch.Tensor,
    config: AdapterConfig,
    cache: FeatureCache,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write `adapter.safetensors` and `adapter.json` (config, cache fingerprint and model, extra metrics)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / ADAPTER_WEIGHTS) as tmp:
        save_file({"weight": weight.detach().float().contiguous().cpu()}, str(tmp))
    meta = {
        "kind": "ballad-adapter",
        "config": config.to_dict(),
        "cache_fingerprint": cache.fingerprint,
        "cache": str(cache.path),
        "model": cache.manifest["model"],
        "embed_dim": int(weight.shape[1]),
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
        weight = load_file(str(folder / ADAPTER_WEIGHTS))["weight"]
    except FileNotFoundError:
        raise BalladError(f"{folder / ADAPTER_WEIGHTS} does not exist; fit the adapter first") from None
    except (SafetensorError, KeyError, OSError) as exc:
        raise BalladError(f"{folder / ADAPTER_WEIGHTS} is not a valid adapter file ({exc}); refit it") from None
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
    return Adapter(weight, AdapterConfig.from_dict(meta["config"]), str(meta.get("cache_fingerprint")), meta)
