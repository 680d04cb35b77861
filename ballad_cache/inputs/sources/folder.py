"""`folder:ROOT`: images in `ROOT/{train,val,test}/<class>/<image>`; the classes are the train folder's
subfolders, sorted, their names with `_` read as a space. A split folder that is missing is a split the dataset
lacks; a train class folder without an image stops with one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ...errors import BalladError
from ..splits import DATASETS, IMAGE_SUFFIXES, SPLITS, ImageSplit, LTDataset, check_classnames


def folder_dataset(root: Path) -> LTDataset:
    """`ROOT/{train,val,test}/<class>/<image>`; classes are the train folder's subfolders, sorted."""
    if not root.is_dir():
        raise BalladError(f"dataset folder {root} does not exist")
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise BalladError(f"{train_dir} does not exist; folder: datasets need ROOT/train/<class>/<image>")
    folders = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
    if not folders:
        raise BalladError(f"{train_dir} has no class folders")
    classnames = check_classnames([f.replace("_", " ") for f in folders], str(train_dir))
    index = {f: i for i, f in enumerate(folders)}
    splits: dict[str, ImageSplit] = {}
    for split in SPLITS:
        sdir = root / split
        if not sdir.is_dir():
            continue
        files, labels = [], []
        for cdir in sorted(p for p in sdir.iterdir() if p.is_dir()):
            if cdir.name not in index:
                raise BalladError(f"{cdir}: class folder not in {train_dir}; every split must use the train classes")
            for img in sorted(cdir.iterdir()):
                if img.suffix.lower() in IMAGE_SUFFIXES:
                    files.append(str(img))
                    labels.append(index[cdir.name])
        splits[split] = ImageSplit(split, np.asarray(labels, dtype=np.int64), files, files=files)
    counts = np.bincount(splits["train"].labels, minlength=len(classnames))
    if (counts == 0).any():
        empty = train_dir / folders[int(np.flatnonzero(counts == 0)[0])]
        raise BalladError(
            f"{empty} holds no training image ({', '.join(sorted(IMAGE_SUFFIXES))}); add images or remove the folder"
        )
    return LTDataset(f"folder:{root}", classnames, splits, source=str(root))


def _folder_spec(arg: str | None) -> LTDataset:
    """`folder:ROOT`."""
    if not arg:
        raise BalladError("folder: needs a root, e.g. folder:/data/mydataset")
    return folder_dataset(Path(arg))


DATASETS.register("folder", _folder_spec, help="folder:ROOT, ROOT/{train,val,test}/<class>/<image>")
