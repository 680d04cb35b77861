"""Index streams for phase B, generated whole with numpy: no DataLoader walks the cached rows.

Each sampler maps per-image labels to one epoch of image indices (as many draws as images). Registry names:

- `class-aware`: OLTR's ClassAwareSampler: a shuffled cycle over classes, `samples_per_class` consecutive draws
  from the visited class, each class cycling through its own reshuffled images. BALLAD's phase B default.
- `sqrt`: classes drawn with probability ∝ sqrt(n_c), images uniformly within the class.
- `instance`: every image once per epoch, shuffled (the long-tailed distribution itself).
- `progressive`: Kang et al.'s interpolation from instance-balanced (epoch 0) to class-balanced (last epoch).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

Sampler = Callable[[np.ndarray, int, int, np.random.Generator, int], np.ndarray]


def _class_lists(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


def class_aware(
    labels: np.ndarray, epoch: int, epochs: int, rng: np.random.Generator, samples_per_class: int = 4
) -> np.ndarray:
    """OLTR class-aware sampling: classes in shuffled cycles, `samples_per_class` draws per visit."""
    n = len(labels)
    num_classes = int(labels.max()) + 1
    lists = [lst for lst in _class_lists(labels, num_classes)]
    present = np.asarray([c for c in range(num_classes) if len(lists[c])])
    visits = -(-n // samples_per_class)
    cycles = -(-visits // len(present))
    class_seq = np.concatenate([rng.permutation(present) for _ in range(cycles)])[:visits]
    out = np.empty(visits * samples_per_class, dtype=np.int64)
    slots = np.arange(visits * samples_per_class).reshape(visits, samples_per_class)
    for c in present:
        where = slots[class_seq == c].ravel()
        if not len(where):
            continue
        items = lists[c]
        reps = -(-len(where) // len(items))
        stream = np.concatenate([items[rng.permutation(len(items))] for _ in range(reps)])
        out[where] = stream[: len(where)]
    return out[:n]


def _weighted(labels: np.ndarray, class_weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    counts = np.bincount(labels, minlength=len(class_weight))
    w = class_weight[labels] / np.maximum(counts[labels], 1)
    return rng.choice(len(labels), size=len(labels), replace=True, p=w / w.sum())


def sqrt_sampling(
    labels: np.ndarray, epoch: int, epochs: int, rng: np.random.Generator, samples_per_class: int = 4
) -> np.ndarray:
    """Classes drawn ∝ sqrt(n_c) (Mahajan et al.; Kang et al.)."""
    counts = np.bincount(labels).astype(np.float64)
    return _weighted(labels, np.sqrt(counts), rng)


def instance(
    labels: np.ndarray, epoch: int, epochs: int, rng: np.random.Generator, samples_per_class: int = 4
) -> np.ndarray:
    """A shuffled pass over every image."""
    return rng.permutation(len(labels)).astype(np.int64)


def progressive(
    labels: np.ndarray, epoch: int, epochs: int, rng: np.random.Generator, samples_per_class: int = 4
) -> np.ndarray:
    """p_c = (1 - t) n_c / N + t / C with t = epoch / (epochs - 1) (Kang et al., 2020)."""
    counts = np.bincount(labels).astype(np.float64)
    t = epoch / max(epochs - 1, 1)
    p_class = (1 - t) * counts / counts.sum() + t * (counts > 0) / (counts > 0).sum()
    return _weighted(labels, p_class, rng)


SAMPLERS: dict[str, Sampler] = {
    "class-aware": class_aware,
    "sqrt": sqrt_sampling,
    "instance": instance,
    "progressive": progressive,
}


def get_sampler(name: str) -> Sampler:
    """Look a sampler up by name; ValueError lists the known ones."""
    if name not in SAMPLERS:
        raise ValueError(f"unknown sampler '{name}'; known: {', '.join(SAMPLERS)}")
    return SAMPLERS[name]


def index_stream(
    labels: np.ndarray, sampler: str, epochs: int, seed: int, samples_per_class: int = 4
) -> list[np.ndarray]:
    """Every epoch's image indices for `sampler`, from one seeded generator (same seed, same stream)."""
    rng = np.random.default_rng(seed)
    fn = get_sampler(sampler)
    return [fn(labels, e, epochs, rng, samples_per_class) for e in range(epochs)]
