"""Long-tailed image datasets named by spec strings: `load_dataset(spec)`.

Specs (each owned by a module of `sources/`, which says more):
    fmnist-lt[:IF]     Fashion-MNIST made long-tailed (the embedded default; IDX files from the Debian package
                       `dataset-fashion-mnist`, `$BALLAD_DATA/fashion-mnist/`, or downloaded to ~/.cache/ballad).
    cifar100-lt:IF     CIFAR-100-LT (LDAM-DRW profile, n_max 500) from `$BALLAD_DATA/cifar-100-{binary,python}`.
    folder:ROOT        ROOT/{train,val,test}/<class>/<image>.
    wds:DIR            webdataset tar shards DIR/{train,val,test}/*.tar, class names in DIR/classnames.txt.
    PATH.yaml          a description: root, classnames, splits of OLTR-style list files ("rel/path label"), or
                       another registered `format:` (webdataset: splits of shard patterns).
    KIND:ARG           any kind registered in `DATASETS` (`splits.py`), for instance by a plugin or a test.

A dataset resolves to class names, prompt templates and splits; images decode lazily, one at a time. This module is
where callers import from: the dataset model (`splits.py`) and the sources' entry points are re-exported here.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import BalladError
from . import sources  # importing the package registers every source, in its order
from .sources.cifar import cifar100_lt
from .sources.description import read_split_list, yaml_dataset
from .sources.fmnist import fashion_mnist_lt, find_fashion_mnist, read_idx
from .sources.folder import folder_dataset
from .sources.webdataset import webdataset
from .splits import (
    DATASET_FORMATS,
    DATASETS,
    IMAGE_SUFFIXES,
    SPLITS,
    TEMPLATE_SETS,
    BadImageError,
    ImageSplit,
    LTDataset,
    check_classnames,
    load_templates,
    read_lines,
    resource_dir,
    template_sets,
)

__all__ = [
    "DATASETS",
    "DATASET_FORMATS",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "TEMPLATE_SETS",
    "BadImageError",
    "ImageSplit",
    "LTDataset",
    "check_classnames",
    "cifar100_lt",
    "fashion_mnist_lt",
    "find_fashion_mnist",
    "folder_dataset",
    "list_datasets",
    "load_dataset",
    "load_templates",
    "read_idx",
    "read_lines",
    "read_split_list",
    "resource_dir",
    "sources",
    "template_sets",
    "webdataset",
    "yaml_dataset",
]


def list_datasets() -> list[str]:
    """Spec forms `load_dataset` accepts: registered kinds, YAML descriptions and the shipped ones."""
    shipped = sorted(p.name for p in (resource_dir() / "datasets").glob("*.yaml"))
    return [*DATASETS, "PATH.yaml", *[f"data/datasets/{s}" for s in shipped]]


def load_dataset(spec: str) -> LTDataset:
    """Resolve a dataset spec string (see the module docstring).

    Raises:
        BalladError: unknown name (the message lists the known ones), missing files, malformed list files.
    """
    if spec.endswith((".yaml", ".yml")):
        return yaml_dataset(Path(spec))
    name, _, arg = spec.partition(":")
    if name not in DATASETS:
        if Path(spec).is_dir():  # a folder of the user's: say how to name it rather than list the built-ins
            kind = "wds" if any(Path(spec).glob("*/*.tar")) else "folder"
            raise BalladError(f"unknown dataset '{spec}'; it is a folder: pass {kind}:{spec}")
        raise BalladError(f"unknown dataset '{spec}'; known: {', '.join(list_datasets())}")
    try:
        return DATASETS.get(name)(arg or None)
    except ValueError as exc:
        raise BalladError(f"bad dataset spec '{spec}': {exc}") from exc
