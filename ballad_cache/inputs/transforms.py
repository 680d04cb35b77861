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


def lift_train_transform(size: int, mean: Sequence[float], std: Sequence[float]) -> Callable[[Any], torch.Tensor]:
    """LIFT's training transform (shijxcs/LIFT `trainer.py` lines 102-107): RandomResizedCrop at torchvision's
    defaults (scale 0.08-1, bilinear), horizontal flip, normalisation with the model's mean and std."""
    from torchvision import transforms as T

    return T.Compose(
        [T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(list(mean), list(std))]
    )


def preprocess_settings(preprocess_cfg: dict[str, Any]) -> dict[str, Any]:
    """A model's open_clip preprocess config, with open_clip's defaults (`PreprocessCfg`: 224 px, OpenAI CLIP's mean
    and std) for what it leaves out (a model open_clip built always states them)."""
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    return dict(merge_preprocess_dict(PreprocessCfg(), preprocess_cfg))


def image_size(preprocess_cfg: dict[str, Any]) -> tuple[int, int]:
    """(height, width) of the images a model takes, from its open_clip preprocess config."""
    size = preprocess_settings(preprocess_cfg)["size"]
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def _official(preprocess_cfg: dict[str, Any], open_clip_train: Callable[[Any], torch.Tensor]) -> Callable[[Any], Any]:
    settings = preprocess_settings(preprocess_cfg)
    return official_train_transform(image_size(settings)[0], settings["mean"], settings["std"])


# where `extract-features` makes the augmented views: PIL in the DataLoader workers, or batched tensors on the
# encoding device (`device_augment.py`)
AUGMENT_ON = ("worker", "device")

AUGMENTATIONS: Registry[Augmentation] = Registry("augmentation")
AUGMENTATIONS.register(
    "official", _official, help="BALLAD's RandomResizedCrop(scale 0.5-1) + flip + ColorJitter(0.4, 0.4, 0.4)"
)
AUGMENTATIONS.register(
    "lift",
    lambda cfg, own: lift_train_transform(
        image_size(preprocess_settings(cfg))[0], preprocess_settings(cfg)["mean"], preprocess_settings(cfg)["std"]
    ),
    help="LIFT's RandomResizedCrop(scale 0.08-1) + flip",
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


class CropViews:
    """LIFT's test-time views (shijxcs/LIFT `trainer.py` lines 116-130, `utils/config.py` lines 55-57): resize the
    shorter side to the model's size + `expand` (torchvision's default bilinear, antialiased, as LIFT's
    `transforms.Resize`), then `FiveCrop` (corners then centre) or `TenCrop` (those five, then the same five of the
    horizontally flipped image) at the model's size, each normalised with the model's mean and std. Scoring takes
    the mean of the per-crop logits (`trainer.py` lines 568-580), as every ballad scoring path does
    (`heads.metrics.per_image`)."""

    def __init__(self, crops: int, size: tuple[int, int], mean: Sequence[float], std: Sequence[float], expand: int):
        if crops not in (5, 10):
            raise ValueError("crop views are five or ten crops")
        self.crops, self.size, self.expand = crops, size, expand
        self.mean, self.std = list(mean), list(std)

    def __call__(self, image: Any) -> list[torch.Tensor]:
        """The crops of a PIL image, in torchvision's order."""
        from torchvision.transforms import functional as TF

        resized = TF.resize(image.convert("RGB"), min(self.size) + self.expand, antialias=True)
        crops = TF.five_crop(resized, list(self.size)) if self.crops == 5 else TF.ten_crop(resized, list(self.size))
        return [TF.normalize(TF.to_tensor(c), self.mean, self.std) for c in crops]


# the eval views `extract-features` stores for val and test, by name: the number of crops beside view 0 (the model's
# own eval transform, always stored); scoring a cache with crops averages the logits of the crops (view 0 is not one)
EVAL_VIEWS: Registry[int] = Registry("eval views")
EVAL_VIEWS.register("center", 0, help="the model's own eval transform (resize, centre crop), one view")
EVAL_VIEWS.register("five-crop", 5, help="LIFT's test-time ensemble: resize to size + expand, five crops")
EVAL_VIEWS.register("ten-crop", 10, help="the five crops and their horizontal flips")
LIFT_EXPAND = 24  # shijxcs/LIFT utils/config.py line 56 (configs/model/clip_vit_b16.yaml line 24)


def crop_views(views: str, preprocess_cfg: dict[str, Any], expand: int = LIFT_EXPAND) -> CropViews | None:
    """The crop transform of eval views `views` for a model (None for `center`).

    Raises:
        ValueError: an unknown name.
    """
    crops = EVAL_VIEWS.get(views)
    if not crops:
        return None
    settings = preprocess_settings(preprocess_cfg)
    return CropViews(crops, image_size(settings), settings["mean"], settings["std"], expand)
