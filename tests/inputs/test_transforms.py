"""`inputs/transforms.py`: the official BALLAD augmentation step by step, built for a model's size and statistics,
and the augmentation registry."""

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from ballad_cache.inputs.transforms import AUGMENT_ON, AUGMENTATIONS, official_train_transform, train_transform

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def test_official_transform_is_ballads_dataloader_train_transform():
    """BALLAD `data/dataloader.py` `get_data_transform('train')`: RandomResizedCrop(scale 0.5-1, bicubic), flip with
    p 0.5, ColorJitter(0.4, 0.4, 0.4, hue 0), ToTensor, Normalize; in that order."""
    steps = official_train_transform(48, (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)).transforms
    assert [type(s) for s in steps] == [
        T.RandomResizedCrop,
        T.RandomHorizontalFlip,
        T.ColorJitter,
        T.ToTensor,
        T.Normalize,
    ]
    crop, flip, jitter, _, norm = steps
    assert crop.size == (48, 48) and crop.scale == (0.5, 1.0) and crop.ratio == pytest.approx((3 / 4, 4 / 3))
    assert crop.interpolation == T.InterpolationMode.BICUBIC
    assert flip.p == 0.5
    assert (jitter.brightness, jitter.contrast, jitter.saturation, jitter.hue) == (
        (0.6, 1.4),
        (0.6, 1.4),
        (0.6, 1.4),
        None,
    )
    assert (list(norm.mean), list(norm.std)) == ([0.1, 0.2, 0.3], [0.4, 0.5, 0.6])


def test_a_view_is_a_normalised_tensor_of_the_models_size_and_the_same_view_for_the_same_seed():
    """The reader seeds each (image, view) row: the transform must draw from torch's generator alone."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8))
    augment = official_train_transform(24, CLIP_MEAN, CLIP_STD)
    torch.manual_seed(5)
    a = augment(image)
    torch.manual_seed(5)
    b = augment(image)
    c = augment(image)
    assert a.shape == (3, 24, 24) and a.dtype == torch.float32
    assert torch.equal(a, b) and not torch.equal(b, c)
    # pixels in [0, 1] normalised: within [(0 - mean) / std, (1 - mean) / std] per channel, exactly (the same float32
    # subtraction and division, both monotone under rounding)
    low = (0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    high = (1 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    flat = a.flatten(1)
    assert (flat.min(1).values >= low).all() and (flat.max(1).values <= high).all()


def test_the_official_augmentation_takes_the_models_size_and_statistics():
    own = T.Compose([T.ToTensor()])
    cfg = {"size": (32, 32), "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    steps = train_transform("official", cfg, own).transforms
    assert steps[0].size == (32, 32)
    assert (list(steps[-1].mean), list(steps[-1].std)) == ([0.5] * 3, [0.25] * 3)
    assert train_transform("official", {"size": 64}, own).transforms[0].size == (64, 64)
    # a config without statistics gets OpenAI CLIP's (what the official code normalises with) at 224 px
    steps = train_transform("official", {}, own).transforms
    assert steps[0].size == (224, 224)
    assert tuple(steps[-1].mean) == CLIP_MEAN and tuple(steps[-1].std) == CLIP_STD


def test_the_lift_augmentation_is_lifts_train_transform():
    """shijxcs/LIFT `trainer.py` lines 102-107: RandomResizedCrop(resolution) at torchvision's defaults, a horizontal
    flip, ToTensor, Normalize(mean, std) with the model's statistics."""
    cfg = {"size": (48, 48), "mean": (0.5, 0.4, 0.3), "std": (0.2, 0.25, 0.3)}
    steps = train_transform("lift", cfg, T.Compose([])).transforms
    assert [type(t) for t in steps] == [T.RandomResizedCrop, T.RandomHorizontalFlip, T.ToTensor, T.Normalize]
    crop = steps[0]
    assert crop.size == (48, 48) and crop.scale == (0.08, 1.0) and crop.ratio == (3 / 4, 4 / 3)
    assert crop.interpolation == T.InterpolationMode.BILINEAR and steps[1].p == 0.5
    assert (list(steps[-1].mean), list(steps[-1].std)) == ([0.5, 0.4, 0.3], [0.2, 0.25, 0.3])


def test_open_clip_augmentation_is_the_models_own_and_unknown_names_are_listed():
    own = T.Compose([T.ToTensor()])
    assert train_transform("open_clip", {"size": 32}, own) is own
    assert list(AUGMENTATIONS) == ["official", "lift", "open_clip"]
    with pytest.raises(ValueError, match="unknown augmentation 'fancy'; known: official, lift, open_clip"):
        train_transform("fancy", {}, own)
    assert AUGMENT_ON == ("worker", "device")
