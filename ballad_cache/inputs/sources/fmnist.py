"""`fmnist-lt[:IF]`: Fashion-MNIST made long-tailed, the embedded default.

The train split follows the exponential profile `n_i = floor(n_max * (1/IF)^(i/(C-1)))` (IF 100 unless given), val
is 20 images per class held out from the training images the profile left unused, test is the full balanced test
set. The IDX files come from the Debian package `dataset-fashion-mnist`, `$BALLAD_DATA/fashion-mnist/`, or are
downloaded from the official mirror into ~/.cache/ballad.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from ...errors import BalladError
from ..longtail import exponential_profile
from ..splits import DATASETS, ImageSplit, LTDataset, longtail_indices, read_lines, resource_dir

FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (plain or .gz) as a numpy array (uint8 images N×H×W, labels N).

    Raises:
        BalladError: not an IDX file or truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:
        raise BalladError(f"cannot read IDX file {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise BalladError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise BalladError(f"{path} is truncated: expected {int(np.prod(dims))} values, found {body.size}")
    return body.reshape(dims)


def find_fashion_mnist(download: bool = True) -> Path:
    """The folder holding Fashion-MNIST's four IDX files, downloading them into ~/.cache/ballad if needed."""
    candidates = [FMNIST_SYSTEM_DIR]
    if os.environ.get("BALLAD_DATA"):
        candidates.insert(0, Path(os.environ["BALLAD_DATA"]) / "fashion-mnist")
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ballad" / "fashion-mnist"
    candidates.append(cache)
    names = [n for pair in FMNIST_FILES.values() for n in pair]
    for folder in candidates:
        if all((folder / n).exists() or (folder / f"{n}.gz").exists() for n in names):
            return folder
    if not download:
        raise BalladError(f"Fashion-MNIST not found in {', '.join(map(str, candidates))}")
    cache.mkdir(parents=True, exist_ok=True)
    from ...atomic import atomic_path

    for n in names:
        target = cache / f"{n}.gz"
        if target.exists():
            continue
        try:
            with urllib.request.urlopen(FMNIST_MIRROR + f"{n}.gz", timeout=30) as r, atomic_path(target) as tmp:
                tmp.write_bytes(r.read())
        except (urllib.error.URLError, TimeoutError, OSError) as exc:
            raise BalladError(
                f"Fashion-MNIST is not installed and the download failed ({exc}); "
                "run `sudo apt-get install dataset-fashion-mnist` or put the IDX files in $BALLAD_DATA/fashion-mnist/"
            ) from None
    return cache


def _idx_file(folder: Path, name: str) -> Path:
    plain = folder / name
    return plain if plain.exists() else folder / f"{name}.gz"


def fashion_mnist_lt(
    imbalance: float = 100.0, n_max: int = 500, val_per_class: int = 20, seed: int = 0, root: Path | None = None
) -> LTDataset:
    """Fashion-MNIST-LT: exponential long-tailed train split, balanced val from unused train images, full test set.

    Args:
        imbalance: IF of the train profile.
        n_max: train images of class 0.
        val_per_class: held-out val images per class, drawn from training images the profile left unused.
        seed: selection seed.
        root: folder with the IDX files; searched for when None.
    """
    folder = root or find_fashion_mnist()
    classnames = read_lines(resource_dir() / "classnames" / "fashion-mnist.txt")
    arrays = {s: (read_idx(_idx_file(folder, a)), read_idx(_idx_file(folder, b))) for s, (a, b) in FMNIST_FILES.items()}
    train_x, train_y = arrays["train"]
    test_x, test_y = arrays["test"]
    counts = exponential_profile(len(classnames), n_max, imbalance)
    picked, rest = longtail_indices(train_y, counts, seed)
    rng = np.random.default_rng(seed + 1)
    val = np.concatenate([rng.permutation(rest[train_y[rest] == c])[:val_per_class] for c in range(len(classnames))])

    def make(name: str, x: np.ndarray, y: np.ndarray, idx: np.ndarray, tag: str) -> ImageSplit:
        return ImageSplit(
            name,
            y[idx].astype(np.int64),
            [f"fashion-mnist/{tag}/{i}" for i in idx],
            pixels=np.ascontiguousarray(x[idx]),
        )

    splits = {
        "train": make("train", train_x, train_y, picked, "train"),
        "val": make("val", train_x, train_y, val, "train"),
        "test": make("test", test_x, test_y, np.arange(len(test_y)), "t10k"),
    }
    return LTDataset(f"fmnist-lt:{imbalance:g}", classnames, splits, source=str(folder))


def _fmnist_spec(arg: str | None) -> LTDataset:
    """`fmnist-lt[:IF]`."""
    imbalance = float(arg) if arg else 100.0
    if not (math.isfinite(imbalance) and imbalance >= 1):
        raise ValueError(f"the imbalance factor must be a finite number >= 1, got {arg}")
    return fashion_mnist_lt(imbalance=imbalance)


DATASETS.register(
    "fmnist-lt", _fmnist_spec, help="fmnist-lt[:IF], Fashion-MNIST made long-tailed (the embedded default)"
)
