"""Index samplers (ballad_cache.inputs.samplers), checked against their definitions."""

from __future__ import annotations

import numpy as np
import pytest

from ballad_cache.inputs.samplers import SAMPLERS, index_stream


def test_class_aware_visits_classes_in_runs_of_k_and_balances_them():
    labels = np.repeat(np.arange(5), [100, 40, 10, 3, 1])
    epoch = index_stream(labels, "class-aware", 1, seed=0, samples_per_class=4, draws_per_epoch=400)[0]
    runs = labels[epoch].reshape(-1, 4)
    assert (runs == runs[:, :1]).all()  # each visit takes 4 consecutive draws of one class
    counts = np.bincount(labels[epoch], minlength=5)
    assert counts.min() == counts.max() == 80  # the class cycle visits every class equally


def test_instance_sampler_is_a_permutation_and_streams_are_seeded():
    labels = np.repeat(np.arange(3), [7, 5, 2])
    a = index_stream(labels, "instance", 2, seed=3)
    assert all(sorted(e.tolist()) == list(range(14)) for e in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, index_stream(labels, "instance", 2, seed=3), strict=True))
    assert not np.array_equal(a[0], index_stream(labels, "instance", 1, seed=4)[0])


def test_sqrt_sampler_draws_classes_in_proportion_to_sqrt_counts():
    labels = np.repeat(np.arange(2), [400, 25])
    draws = index_stream(labels, "sqrt", 1, seed=0, draws_per_epoch=20000)[0]
    share = np.mean(labels[draws] == 1)
    # sqrt(25) / (sqrt(400) + sqrt(25)); 0.01 is 3.5 binomial std (sqrt(0.2 · 0.8 / 20000) = 0.0028) of a share
    # drawn from numpy's seeded generator, the same stream on every machine
    assert share == pytest.approx(5 / (20 + 5), abs=0.01)


def test_progressive_goes_from_instance_to_class_balanced():
    labels = np.repeat(np.arange(2), [900, 100])
    first, last = index_stream(labels, "progressive", 3, seed=0, draws_per_epoch=20000)[::2]
    # binomial std over 20000 draws: 0.0021 at p = 0.1, 0.0035 at p = 0.5; both bounds are over 4 std
    assert np.mean(labels[first] == 1) == pytest.approx(0.1, abs=0.01)
    assert np.mean(labels[last] == 1) == pytest.approx(0.5, abs=0.015)


def test_unknown_sampler_names_the_registered_ones():
    with pytest.raises(ValueError, match="known: " + ", ".join(SAMPLERS)):
        index_stream(np.zeros(3, int), "magic", 1, seed=0)
