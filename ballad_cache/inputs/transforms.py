"""Image transforms: the official BALLAD training augmentation, built for any model's input size and statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..registry import Registry

if TYPE_CHECKING:
    import torch

Augmentation = Callable[[dict[str, Any], Callable[[Any], "torch.Tensor"]], Callable[[Any], "torch.Tensor"]]


def official_train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[Any], torch.Tensor]:
    """BALLAD's training transform (`data/dataloader.py`, `get_data_transform('train')`): RandomResizedCrop with
    scale (0.5, 1) and bicubic interpolation, horizontal flip, ColorJitter(0.4, 0.4, 0.4, hue 0), normalisation
    with the model's mean and std (the official code uses CLIP's, which open_clip's OpenAI models carry)."""
    from torchvision import transforms as T

    return T.Compose(
        [
            T.RandomResizedCrop(size, scale=(0.5, 1.0), interpolation=T.InterpolationMode.BICUBIC),
            T.RandomHorizontalFlip(p=0.5),
            T.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0),
            T.ToTensor(),  # images arrive as RGB (datasets.ImageSplit.load converts)
            T.Normalize(list(mean), list(std)),
        ]
    )


def _official(preprocess_cfg: dict[str, Any], open_clip_train: Callable[[Any], torch.Tensor]) -> Callable[[Any], Any]:
    size = preprocess_cfg.get("size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    mean = preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))
    std = preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))
    return official_train_transform(int(size), mean, std)


# where `extract-features` makes the augmented views: PIL in the DataLoader workers, or batched tensors on the
# encoding device (`device_augment.py`)
AUGMENT_ON = ("worker", "device")

AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")
AUGMENTATIONS.register(
    "official", _official, help="BALLAD's RandomResizedCrop(scale 0.5-1) + flip + ColorJitter(0.4, 0.4, 0.4)"
)
AUGMENTATIONS.register(
    "open_clip", lambda cfg, own: own, help="the model's preprocess_train (RandomResizedCrop scale 0.9-1)"
)


def train_transform(
    augment: str, preprocess_cfg: dict[str, Any], open_clip_train: Callable[[Any], torch.Tensor]
) -> Callable[[Any], torch.Tensor]:
    """The augmentation registered as `augment` (`AUGMENTATIONS`), built for a model's input size and statistics.

    Raises:
        ValueError: an unknown name.
    """
    return AUGMENTATIONS.get(augment)(preprocess_cfg, open_clip_train)
