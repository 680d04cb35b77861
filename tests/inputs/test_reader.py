"""`inputs/reader.py`: rows of a split as model inputs, each view seeded by (seed, index, view) so that its tensor
does not depend on what else is decoded with it; image groups, their batches and collation; bad rows."""

import numpy as np
import pytest
import torch
from torch.utils.data import default_collate
from torchvision import transforms as T

from ballad_cache.errors import BalladError
from ballad_cache.inputs.device_augment import DeviceAugment
from ballad_cache.inputs.reader import (
    ImageGroups,
    ImageRows,
    collate_groups,
    group_batches,
    make_loader,
    skipped_row,
    usable_rows,
)
from ballad_cache.inputs.splits import ImageSplit

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
EVAL = T.Compose([T.Resize(16), T.CenterCrop(16), T.ToTensor(), T.Normalize(MEAN, STD)])
AUGMENT = T.Compose(
    [
        T.RandomResizedCrop(16, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(),
        T.ColorJitter(0.4, 0.4, 0.4),
        T.ToTensor(),
        T.Normalize(MEAN, STD),
    ]
)


def noise_split(n: int = 4) -> ImageSplit:
    """n random 24×20 RGB images, labels 0, 1, 0, 1, ..."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(n, 24, 20, 3), dtype=np.uint8)
    return ImageSplit("train", np.arange(n) % 2, [f"img{i}.png" for i in range(n)], pixels=pixels)


def rows_of(images: int, views: int) -> np.ndarray:
    return np.array([[i, v] for i in range(images) for v in range(views + 1)], dtype=np.int64)


def test_eval_view_is_the_eval_transform_and_augmented_views_are_seeded_per_index_and_view():
    split = noise_split()
    reader = ImageRows(split, rows_of(4, 2), EVAL, AUGMENT, seed=7)
    row = reader[4]  # image 1, view 1
    assert (row["index"], row["view"], row["label"], row["path"], row["error"]) == (1, 1, 1, "img1.png", "")
    assert torch.equal(reader[3]["image"], EVAL(split.load(1)))
    torch.manual_seed(hash((7, 1, 1)) & 0x7FFF_FFFF)
    assert torch.equal(row["image"], AUGMENT(split.load(1)))
    assert not torch.equal(reader[4]["image"], reader[5]["image"])  # views 1 and 2 differ
    assert not torch.equal(row["image"], ImageRows(split, rows_of(4, 2), EVAL, AUGMENT, seed=8)[4]["image"])


def test_a_group_decodes_once_gives_each_row_alone_bitwise_and_restores_the_callers_generator():
    split = noise_split()
    loads = []

    class CountingSplit(ImageSplit):
        def load(self, index, max_pixels=10**9, draft=0):
            loads.append(index)
            return super().load(index, max_pixels, draft)

    counting = CountingSplit(split.name, split.labels, split.paths, pixels=split.pixels)
    reader = ImageRows(counting, rows_of(4, 3), EVAL, AUGMENT, seed=1)
    torch.manual_seed(123)
    state = torch.get_rng_state()
    group = reader.group([8, 9, 10, 11])  # the four rows of image 2
    assert torch.equal(torch.get_rng_state(), state)
    assert loads == [2]
    for position, row in zip([8, 9, 10, 11], group, strict=True):
        alone = reader[position]
        assert torch.equal(row["image"], alone["image"]) and row["view"] == alone["view"]
    with pytest.raises(ValueError, match="one image"):
        reader.group([3, 4])


def test_augmented_rows_ask_the_decoder_for_twice_the_draft_side():
    """Augmented views crop down to 0.61 of the shorter side before resizing: they need twice the model's input."""
    seen = []

    class DraftSplit(ImageSplit):
        def load(self, index, max_pixels=10**9, draft=0):
            seen.append(draft)
            return super().load(index, max_pixels, draft)

    split = noise_split()
    drafty = DraftSplit(split.name, split.labels, split.paths, pixels=split.pixels)
    ImageRows(drafty, rows_of(2, 0), EVAL, AUGMENT, draft=16)[0]
    ImageRows(drafty, rows_of(2, 1), EVAL, AUGMENT, draft=16)[0]  # the eval view of a reader with views too
    assert seen == [16, 32]


def test_group_batches_cut_batches_into_runs_of_one_image():
    rows = rows_of(3, 2)[:7]  # image 0: rows 0-2, image 1: rows 3-5, image 2: row 6
    groups, grouped = group_batches(rows, [[0, 1, 2, 3], [4, 5, 6]])
    assert groups == [[0, 1, 2], [3], [4, 5], [6]]  # image 1 straddles the two batches: one decode in each
    assert grouped == [[0, 1], [2, 3]]


def test_collated_groups_are_the_default_collate_of_the_same_rows():
    reader = ImageRows(noise_split(), rows_of(4, 1), EVAL, AUGMENT, seed=2)
    groups, grouped = group_batches(reader.rows, [[0, 1, 2], [3, 4, 5, 6, 7]])
    dataset = ImageGroups(reader, groups)
    assert len(dataset) == 5
    for batch_groups, positions in zip(grouped, [[0, 1, 2], [3, 4, 5, 6, 7]], strict=True):
        mine = collate_groups([dataset[g] for g in batch_groups])
        default = default_collate([reader[p] for p in positions])
        assert mine.keys() == default.keys()
        for key in ("image", "label", "index", "view"):
            assert torch.equal(mine[key], default[key]), key
        assert mine["path"] == default["path"] and mine["error"] == default["error"]


def test_device_view_rows_carry_their_parameters_and_the_decoded_image_once():
    split = noise_split()
    reader = ImageRows(split, rows_of(2, 2), EVAL, AUGMENT, seed=4, device_views=DeviceAugment(AUGMENT))
    batch = collate_groups([reader.group([0, 1, 2]), reader.group([3, 4, 5])])
    assert batch["ready"].tolist() == [0, 3] and batch["deferred"].tolist() == [1, 2, 4, 5]
    assert batch["image"].shape == (2, 3, 16, 16) and batch["params"].shape[0] == 4
    assert batch["source_of"].tolist() == [0, 0, 1, 1]
    assert batch["source_shapes"].tolist() == [[24, 20, 3], [24, 20, 3]]
    assert torch.equal(batch["source_data"], torch.from_numpy(split.pixels[:2].reshape(-1)))


def test_an_unreadable_image_is_a_zero_row_with_its_reason_and_stops_unless_skipped(tmp_path):
    from PIL import Image

    good = tmp_path / "good.png"
    Image.new("RGB", (20, 20), (10, 20, 30)).save(good)
    (tmp_path / "broken.png").write_bytes(b"not a png")
    split = ImageSplit(
        "test", np.array([0, 1]), ["good.png", "broken.png"], files=[str(good), str(tmp_path / "broken.png")]
    )
    reader = ImageRows(split, rows_of(2, 0), EVAL)
    batch = default_collate([reader[0], reader[1]])
    assert torch.equal(batch["image"][1], torch.zeros(3, 16, 16))
    assert "broken.png" in batch["error"][1] and batch["error"][0] == ""
    with pytest.raises(BalladError, match="broken.png"):
        usable_rows(batch, skip_bad=False)
    assert usable_rows(batch, skip_bad=True).tolist() == [True, False]
    skipped = skipped_row(batch, 1)
    assert (skipped["index"], skipped["path"]) == (1, "broken.png")
    # the reason, without the advice to skip bad images: they were skipped
    assert batch["error"][1].startswith(skipped["reason"]) and "skip" not in skipped["reason"]
    assert "broken.png" in skipped["reason"]
    first_bad = ImageRows(split, np.array([[1, 0], [0, 0]]), EVAL)[0]  # no row decoded yet: the shape is probed
    assert torch.equal(first_bad["image"], torch.zeros(3, 16, 16))


def test_make_loader_follows_the_given_batches_or_its_batch_size():
    reader = ImageRows(noise_split(), rows_of(4, 0), EVAL)
    fixed = make_loader(reader, 99, 0, batch_sampler=[[3, 0], [1], [2]])
    assert [b["index"].tolist() for b in fixed] == [[3, 0], [1], [2]]
    plain = make_loader(reader, 3, 0)
    assert [b["index"].tolist() for b in plain] == [[0, 1, 2], [3]]
    assert [b["index"].tolist() for b in make_loader(reader, 3, 0, drop_last=True)] == [[0, 1, 2]]
