"""Index streams for phase B, generated with numpy: no DataLoader walks the cached rows.

A sampler is built once per fit (`make_sampler`) and asked for each epoch's draws in turn, so samplers with state
carry it across epochs as OLTR's do. Registered names (`SAMPLERS`; add one with `SAMPLERS.register`):

- `class-aware`: OLTR's `ClassAwareSampler` (BALLAD's `data/ClassAwareSampler.py`, taken from OLTR): a
  `RandomCycleIter` over classes; each visit takes `samples_per_class` consecutive items from the visited class's
  own `RandomCycleIter` over its images. Both kinds of cycle reshuffle when they wrap and keep their position
  across epochs (the official sampler object lives for the whole run; only its generator restarts). BALLAD's
  phase-B default.
- `sqrt`: classes drawn with probability ∝ sqrt(n_c), images uniformly within the class.
- `instance`: a fresh shuffle of every image each epoch (the long-tailed distribution itself; what the official
  phase A's `shuffle=True` loader does).
- `progressive`: Kang et al.'s interpolation from instance-balanced (epoch 0) to class-balanced (last epoch).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np

from ..registry import Registry

SAMPLES_PER_CLASS = 4  # consecutive draws per class visit: OLTR's ClassAwareSampler `num_samples_cls`, as BALLAD's


class IndexSampler(Protocol):
    """One fit's sampler: `epoch(e, draws)` returns the image indices of epoch `e` (0-based), in order."""

    def epoch(self, epoch: int, draws: int) -> np.ndarray:
        """The `draws` image indices of 0-based `epoch`, continuing the sampler's state."""
        ...


def _class_lists(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    return [order[bounds[c] : bounds[c + 1]] for c in range(num_classes)]


class RandomCycle:
    """OLTR's `RandomCycleIter`: endless passes over `items`, each pass a fresh shuffle; the position persists."""

    def __init__(self, items: np.ndarray, rng: np.random.Generator) -> None:
        self.items = np.asarray(items)
        self.rng = rng
        self.order = self.items
        self.pos = len(self.items)  # as OLTR's i = length - 1: the first draw starts (and shuffles) a pass

    def take(self, n: int) -> np.ndarray:
        """The next `n` items of the cycle."""
        parts = []
        while n > 0:
            if self.pos == len(self.items):
                self.order = self.items[self.rng.permutation(len(self.items))]
                self.pos = 0
            k = min(n, len(self.items) - self.pos)
            parts.append(self.order[self.pos : self.pos + k])
            self.pos += k
            n -= k
        return np.concatenate(parts) if parts else self.items[:0]


class ClassAwareSampler:
    """OLTR class-aware sampling with cycles that persist across epochs.

    Each visit of a class takes `samples_per_class` items from its cycle at once, as OLTR's
    `next(zip(*[data_iter] * num_samples_cls))` does, even when the epoch ends inside the visit.
    """

    def __init__(
        self, labels: np.ndarray, rng: np.random.Generator, samples_per_class: int = SAMPLES_PER_CLASS
    ) -> None:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
        lists = _class_lists(labels, num_classes)
        self.present = np.asarray([c for c in range(num_classes) if len(lists[c])], dtype=np.int64)
        self.classes = RandomCycle(self.present, rng)
        self.cycles = {int(c): RandomCycle(lists[c], rng) for c in self.present}
        self.k = samples_per_class

    def epoch(self, epoch: int, draws: int) -> np.ndarray:
        """`draws` indices: visits of `k` draws each, the last visit cut short if `draws` is not a multiple."""
        visits = -(-draws // self.k)
        class_seq = self.classes.take(visits)
        out = np.empty(visits * self.k, dtype=np.int64)
        slots = np.arange(visits * self.k).reshape(visits, self.k)
        for c in np.unique(class_seq):
            where = slots[class_seq == c].ravel()  # visit order, k consecutive slots per visit
            out[where] = self.cycles[int(c)].take(len(where))
        return out[:draws]


class WeightedSampler:
    """Independent draws with per-class weights `class_weight(epoch)`, uniform within a class."""

    def __init__(self, labels: np.ndarray, rng: np.random.Generator, class_weight: Callable[[int], np.ndarray]) -> None:
        self.labels = labels
        self.rng = rng
        self.class_weight = class_weight
        self.counts = np.bincount(labels)

    def epoch(self, epoch: int, draws: int) -> np.ndarray:
        """`draws` indices drawn with replacement."""
        w = self.class_weight(epoch)[self.labels] / np.maximum(self.counts[self.labels], 1)
        return self.rng.choice(len(self.labels), size=draws, replace=True, p=w / w.sum()).astype(np.int64)


class InstanceSampler:
    """A fresh permutation each epoch, cut to `draws` (a `shuffle=True` DataLoader stopped after `draws`)."""

    def __init__(self, labels: np.ndarray, rng: np.random.Generator) -> None:
        self.n = len(labels)
        self.rng = rng

    def epoch(self, epoch: int, draws: int) -> np.ndarray:
        """The first `draws` items of a new permutation (more than one pass if `draws` exceeds the images)."""
        reps = -(-draws // max(self.n, 1))
        return np.concatenate([self.rng.permutation(self.n) for _ in range(max(reps, 1))])[:draws].astype(np.int64)


def _sqrt(labels: np.ndarray, epochs: int, rng: np.random.Generator, samples_per_class: int) -> IndexSampler:
    counts = np.sqrt(np.bincount(labels).astype(np.float64))
    return WeightedSampler(labels, rng, lambda e: counts)


def _progressive(labels: np.ndarray, epochs: int, rng: np.random.Generator, samples_per_class: int) -> IndexSampler:
    counts = np.bincount(labels).astype(np.float64)

    def weight(epoch: int) -> np.ndarray:  # p_c = (1 - t) n_c / N + t / C, t = epoch / (epochs - 1)
        t = epoch / max(epochs - 1, 1)
        return (1 - t) * counts / counts.sum() + t * (counts > 0) / (counts > 0).sum()

    return WeightedSampler(labels, rng, weight)


SamplerFactory = Callable[[np.ndarray, int, np.random.Generator, int], IndexSampler]

SAMPLERS: Registry[SamplerFactory] = Registry("sampler")
SAMPLERS.register(
    "class-aware",
    lambda labels, epochs, rng, k: ClassAwareSampler(labels, rng, k),
    help="OLTR's class-aware sampler, --samples-per-class draws per class visit (official)",
)
SAMPLERS.register("sqrt", _sqrt, help="classes drawn in proportion to sqrt(n_c)")
SAMPLERS.register(
    "instance", lambda labels, epochs, rng, k: InstanceSampler(labels, rng), help="every image once per epoch"
)
SAMPLERS.register("progressive", _progressive, help="instance-balanced to class-balanced over the epochs")


def make_sampler(
    name: str, labels: np.ndarray, epochs: int, rng: np.random.Generator, samples_per_class: int = SAMPLES_PER_CLASS
) -> IndexSampler:
    """Build sampler `name` for one fit; ValueError lists the known names."""
    return SAMPLERS.get(name)(labels, epochs, rng, samples_per_class)


def index_stream(
    labels: np.ndarray,
    sampler: str,
    epochs: int,
    seed: int,
    samples_per_class: int = SAMPLES_PER_CLASS,
    draws_per_epoch: int | None = None,
) -> list[np.ndarray]:
    """Every epoch's image indices for `sampler`, from one seeded generator (same seed, same stream).

    Args:
        labels: label of each image.
        sampler: a name from `SAMPLERS`.
        epochs: number of epochs.
        seed: seeds the generator.
        samples_per_class: consecutive draws per class visit (class-aware).
        draws_per_epoch: draws in each epoch; default one per image.
    """
    rng = np.random.default_rng(seed)
    s = make_sampler(sampler, labels, epochs, rng, samples_per_class)
    draws = len(labels) if draws_per_epoch is None else draws_per_epoch
    return [s.epoch(e, draws) for e in range(epochs)]
