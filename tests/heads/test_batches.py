"""Phase B's batch schedule (ballad_cache.heads.batches): which cached rows each step trains on."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ballad_cache.errors import BalladError
from ballad_cache.heads.batches import TrainRows, batch_schedule, steps_per_epoch
from ballad_cache.heads.config import AdapterConfig
from ballad_cache.inputs.samplers import index_stream
from ballad_cache.store.cache import SplitFeatures


def rows_of(images: int, views: int, classes: int = 5) -> tuple[TrainRows, np.ndarray, np.ndarray]:
    """A split of `images` images with an eval view and `views` augmented views each, rows shuffled."""
    index = np.repeat(np.arange(images), views + 1)
    view = np.tile(np.arange(views + 1), images)
    order = np.random.default_rng(0).permutation(len(index))
    index, view = index[order], view[order]
    split = SplitFeatures(
        torch.zeros(len(index), 4), torch.as_tensor(index % classes), torch.as_tensor(index), torch.as_tensor(view)
    )
    return TrainRows.from_split(split), index, view


def test_the_schedule_is_the_sampler_stream_cut_into_full_batches_of_augmented_views():
    """Catches another number of steps than floor(N/B) per epoch (official) or ceil(N/B) with keep_last_batch, a
    batch drawn out of the sampler's order, an eval-view row where augmented views exist, and a schedule that is not
    a function of the seed."""
    rows, index, view = rows_of(50, 3)
    config = AdapterConfig(epochs=3, batch_size=8, seed=4)
    epochs = batch_schedule(rows, config)
    assert [len(e) for e in epochs] == [50 // 8] * 3 and steps_per_epoch(50, config) == 6
    assert all(len(b) == 8 for e in epochs for b in e)
    stream = index_stream(rows.image_labels, "class-aware", 3, 4, 4, 48)
    for batches, images in zip(epochs, stream, strict=True):
        drawn = np.concatenate(batches)
        assert index[drawn].tolist() == list(images[:48])  # each draw is a row of the sampler's image, in order
        assert (view[drawn] > 0).all() and len(set(view[drawn].tolist())) == 3  # each draw picks one of 3 views
    again = batch_schedule(rows, config)
    assert all(np.array_equal(a, b) for ea, eb in zip(epochs, again, strict=True) for a, b in zip(ea, eb, strict=True))
    # the view draws follow the seed too: the same image stream (given) with another seed picks other views
    given = [np.asarray(e) for e in stream]
    mine = np.concatenate(batch_schedule(rows, config, given)[0])
    theirs = np.concatenate(batch_schedule(rows, AdapterConfig(epochs=3, batch_size=8, seed=5), given)[0])
    assert np.array_equal(index[mine], index[theirs]) and not np.array_equal(mine, theirs)
    cut = batch_schedule(rows, AdapterConfig(epochs=1, batch_size=8), [np.arange(50)])
    assert [len(b) for b in cut[0]] == [8] * 6  # a given stream of 50 images is cut to floor(50/8) full batches
    kept = batch_schedule(rows, AdapterConfig(epochs=1, batch_size=8, keep_last_batch=True))
    assert [len(b) for b in kept[0]] == [8] * 6 + [2]


def test_rows_without_augmented_views_train_on_the_eval_view_and_a_batch_larger_than_the_split_is_refused():
    """Catches a cache without augmented views training on nothing, and a batch size above N silently running no
    step under the official floor(N/B)."""
    rows, index, view = rows_of(10, 0)
    assert rows.view_rows.shape == (10, 1) and (view[rows.view_rows[:, 0]] == 0).all()
    with pytest.raises(BalladError, match="exceeds the 10 training images"):
        batch_schedule(rows, AdapterConfig(epochs=2, batch_size=16))
