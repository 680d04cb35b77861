"""`PATH.yaml` (or `.yml`): a dataset description file, and its default format, `format: list`.

A description is a YAML mapping whose `format:` (default `list`) picks the loader registered for it in
`DATASET_FORMATS`; this module reads the file and owns `list`: `root` (the image folder), `classnames` (a file, one
name a line), `splits: {train: list.txt, val: ..., test: ...}` of OLTR-style list files (`relative/path label` a
line), optional `template(s)`. Paths are relative to the description's folder and may use environment variables.
`data/datasets/` ships descriptions for ImageNet-LT and Places-LT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BalladError
from ..splits import (
    DATASET_FORMATS,
    SPLITS,
    ImageSplit,
    LTDataset,
    check_classnames,
    description_path,
    description_templates,
    read_lines,
)


def read_split_list(list_file: Path, root: Path, num_classes: int) -> ImageSplit:
    """An OLTR-style list (`relative/path label` per line) as an ImageSplit; bad lines name file and line."""
    files, labels = [], []
    for lineno, line in enumerate(read_lines(list_file), start=1):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise BalladError(f"{list_file}:{lineno}: expected 'relative/path label', got {line!r}")
        label = int(parts[1])
        if not 0 <= label < num_classes:
            raise BalladError(f"{list_file}:{lineno}: label {label} out of range [0, {num_classes - 1}]")
        files.append(str(root / parts[0]))
        labels.append(label)
    return ImageSplit(list_file.stem, np.asarray(labels, dtype=np.int64), files, files=files)


def yaml_dataset(path: Path) -> LTDataset:
    """A dataset description file, read by the loader its `format:` names (`list` when absent).

    Raises:
        BalladError: a missing or malformed file, an unknown format, or whatever its format's loader refuses.
    """
    import yaml

    if not path.exists():
        raise BalladError(f"dataset description {path} does not exist")
    try:
        desc = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise BalladError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(desc, dict):
        raise BalladError(f"{path}: the top level must be a mapping (root:, classnames:, splits:), not a list or text")
    fmt = desc.get("format", "list")
    if not isinstance(fmt, str) or fmt not in DATASET_FORMATS:
        raise BalladError(f"{path}: unknown format '{fmt}'; use {_format_choices()}")
    return DATASET_FORMATS.get(fmt)(desc, path)


def _format_choices() -> str:
    """`list (OLTR list files) or webdataset (tar shards)`: the registered formats, with their help."""
    named = [f"{n} ({DATASET_FORMATS.help(n)})" if DATASET_FORMATS.help(n) else n for n in DATASET_FORMATS]
    return " or ".join([", ".join(named[:-1]), named[-1]] if len(named) > 1 else named)


def list_description(desc: dict[str, Any], path: Path) -> LTDataset:
    """A `format: list` description (`root`, `classnames`, `splits` of OLTR list files, optional `template(s)`).

    Raises:
        BalladError: a missing key, folder or file, a bad list line or label, a class without a training image.
    """
    missing = [k for k in ("root", "classnames", "splits") if k not in desc]
    if missing:
        raise BalladError(f"{path}: missing key(s) {', '.join(missing)}; see data/datasets/imagenet-lt.yaml")
    base = path.parent
    root = description_path(str(desc["root"]), base, path)
    if not root.is_dir():
        raise BalladError(f"{path}: image root {root} does not exist")
    cls_file = description_path(str(desc["classnames"]), base, path)
    classnames = check_classnames(read_lines(cls_file), str(cls_file))
    splits = {}
    if not isinstance(desc["splits"], dict) or not all(isinstance(v, str) for v in desc["splits"].values()):
        raise BalladError(f"{path}: splits must map train/val/test to list files, e.g. 'train: train.txt'")
    for split, list_path in desc["splits"].items():
        if split not in SPLITS:
            raise BalladError(f"{path}: unknown split '{split}' (use train, val, test)")
        s = read_split_list(description_path(str(list_path), base, path), root, len(classnames))
        s.name = split
        splits[split] = s
    if "train" not in splits:
        raise BalladError(f"{path}: splits needs a train list")
    templates = description_templates(desc, base, path)
    counts = np.bincount(splits["train"].labels, minlength=len(classnames))
    if (counts == 0).any():
        c = int(np.flatnonzero(counts == 0)[0])
        raise BalladError(
            f"{path}: class {c} ('{classnames[c]}') has no training image; fix the train list or the class list"
        )
    return LTDataset(path.stem, classnames, splits, templates=templates, source=str(root))


DATASET_FORMATS.register("list", list_description, help="OLTR list files")
