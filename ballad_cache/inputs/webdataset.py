"""webdataset tar shards as a dataset: `wds:DIR`, with `DIR/{train,val,test}/*.tar` and `DIR/classnames.txt`.

A sample is the members of one tar that share a key (webdataset's rule: the member path up to the first dot of its
file name), its image the `.jpg`/`.jpeg`/`.png`/`.webp` member and its label the `.cls` member (an integer, as
text). Each split lists its tars in name order and their samples in tar order; a sample's key is its row's path in
the cache, so resume, `--skip-bad` and 1 rank = N ranks hold as for folders. Images are read by seeking to their
member's bytes (`tarfile` finds the offsets in one pass over the headers), so any rank or DataLoader worker reads any
sample without streaming the shard: the extraction keeps its image-major rows and shard boundaries.

`DIR/{split}/sizes.json` (`{"shard.tar": samples, ...}`, as webdataset writers emit) is checked when present; a tar
with no usable sample, or a split with none, stops with one line naming it.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import numpy as np

from ..errors import BalladError
from .datasets import SPLITS, ImageSplit, LTDataset, check_classnames, read_lines

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name, webdataset's way: `dir/a.b.jpg` -> (`dir/a`, `b.jpg`)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_tar(tar: Path, num_classes: int) -> list[tuple[str, int, int, int]]:
    """Samples of one tar in member order: (key, label, image offset, image size).

    Raises:
        BalladError: the tar cannot be read, a `.cls` member is not an integer in range, or no sample has both an
            image and a label.
    """
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    order: list[str] = []
    try:
        with tarfile.open(tar, mode="r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                key, ext = split_key(member.name)
                if key not in images and key not in labels:
                    order.append(key)
                if (ext in IMAGE_EXTS and key in images) or (ext == "cls" and key in labels):
                    raise BalladError(f"{tar}: sample '{key}' has two {ext} members; a key names one sample")
                if ext in IMAGE_EXTS:
                    images[key] = (member.offset_data, member.size)
                elif ext == "cls":
                    handle = archive.extractfile(member)
                    text = handle.read().decode("utf-8", "replace").strip() if handle else ""
                    try:
                        labels[key] = int(text)
                    except ValueError:
                        raise BalladError(f"{tar}: {member.name} holds '{text[:20]}', not a class index") from None
                    if not 0 <= labels[key] < num_classes:
                        raise BalladError(
                            f"{tar}: {member.name} names class {labels[key]}; classnames.txt has {num_classes}"
                        )
    except (tarfile.TarError, OSError) as exc:
        raise BalladError(f"cannot read shard {tar}: {exc}; replace the shard or remove it") from None
    samples = [(k, labels[k], *images[k]) for k in order if k in images and k in labels]
    if not samples:
        raise BalladError(f"{tar} holds no sample with both an image ({', '.join(IMAGE_EXTS)}) and a .cls label")
    return samples


def webdataset_split(folder: Path, split: str, num_classes: int) -> ImageSplit:
    """The samples of `folder`'s tars (sorted by name) as an ImageSplit read by seeking.

    Raises:
        BalladError: no tars, a bad tar (see `index_tar`), a key in two tars, or counts that differ from
            `sizes.json`.
    """
    tars = sorted(folder.glob("*.tar"))
    if not tars:
        raise BalladError(f"{folder} holds no .tar shards; a wds: split needs DIR/{split}/*.tar")
    sizes_file = folder / "sizes.json"
    sizes = json.loads(sizes_file.read_text()) if sizes_file.exists() else None
    keys, labels, members = [], [], []
    seen: dict[str, Path] = {}
    for tar in tars:
        samples = index_tar(tar, num_classes)
        if isinstance(sizes, dict) and tar.name in sizes and int(sizes[tar.name]) != len(samples):
            raise BalladError(
                f"{tar} holds {len(samples)} samples, {sizes_file} says {sizes[tar.name]}; fix or delete sizes.json"
            )
        for key, label, offset, size in samples:
            if key in seen:
                raise BalladError(
                    f"sample key '{key}' is in both {seen[key]} and {tar}; a key names one row: rename one"
                )
            seen[key] = tar
            keys.append(key)
            labels.append(label)
            members.append((str(tar), offset, size))
    return ImageSplit(split, np.asarray(labels, dtype=np.int64), keys, members=members)


def webdataset(root: Path) -> LTDataset:
    """`wds:DIR`: class names from `DIR/classnames.txt` (one a line), splits from `DIR/{train,val,test}/*.tar`.

    Raises:
        BalladError: a missing folder, class list or train split, or a split with zero samples.
    """
    if not root.is_dir():
        raise BalladError(f"webdataset folder {root} does not exist")
    names_file = root / "classnames.txt"
    if not names_file.exists():
        raise BalladError(f"{names_file} does not exist; a wds: dataset names its classes there, one a line")
    classnames = check_classnames(read_lines(names_file), str(names_file))
    splits = {
        split: webdataset_split(root / split, split, len(classnames)) for split in SPLITS if (root / split).is_dir()
    }
    if "train" not in splits:
        raise BalladError(f"{root / 'train'} does not exist; a wds: dataset needs DIR/train/*.tar")
    return LTDataset(f"wds:{root}", classnames, splits, source=str(root))
