"""`cifar100-lt:IF`: CIFAR-100-LT with the LDAM-DRW profile (n_max 500; IF 100, 50 and 10 are the published
settings) from `$BALLAD_DATA/cifar-100-binary/` or `$BALLAD_DATA/cifar-100-python/`; val is the balanced test set,
as LDAM-DRW and BALLAD's code use. The python archive is unpickled allowing numpy arrays and nothing else.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import BalladError
from ..longtail import exponential_profile
from ..splits import DATASETS, ImageSplit, LTDataset, longtail_indices, read_lines, resource_dir


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles CIFAR's python archive, allowing numpy array reconstruction and nothing else."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _read_cifar100(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    binary, python = root / "cifar-100-binary", root / "cifar-100-python"
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    if binary.is_dir():
        for split, fname in (("train", "train.bin"), ("test", "test.bin")):
            raw = np.fromfile(binary / fname, dtype=np.uint8).reshape(-1, 3074)
            out[split] = (raw[:, 2:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), raw[:, 1].astype(np.int64))
        return out
    if python.is_dir():
        for split in ("train", "test"):
            with open(python / split, "rb") as f:
                d = _NumpyOnlyUnpickler(f, encoding="latin1").load()
            out[split] = (
                np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1),
                np.asarray(d["fine_labels"], dtype=np.int64),
            )
        return out
    raise BalladError(
        f"CIFAR-100 not found: expected {binary} or {python}; "
        "download cifar-100-binary.tar.gz or cifar-100-python.tar.gz and unpack it into $BALLAD_DATA"
    )


def cifar100_lt(imbalance: float, n_max: int = 500, seed: int = 0, root: Path | None = None) -> LTDataset:
    """CIFAR-100-LT with the LDAM-DRW profile; val is the balanced test set, as LDAM-DRW and BALLAD's code use.

    Args:
        imbalance: IF (100, 50 and 10 are the published settings).
        n_max: train images of class 0.
        seed: selection seed.
        root: folder holding `cifar-100-binary/` or `cifar-100-python/`; `$BALLAD_DATA` when None.
    """
    if root is None:
        if not os.environ.get("BALLAD_DATA"):
            raise BalladError(
                "cifar100-lt reads CIFAR-100 from $BALLAD_DATA; set it to the folder holding cifar-100-python/"
            )
        root = Path(os.environ["BALLAD_DATA"])
    classnames = read_lines(resource_dir() / "classnames" / "cifar100.txt")
    arrays = _read_cifar100(root)
    (train_x, train_y), (test_x, test_y) = arrays["train"], arrays["test"]
    picked, _ = longtail_indices(train_y, exponential_profile(100, n_max, imbalance), seed)
    train = ImageSplit("train", train_y[picked], [f"cifar-100/train/{i}" for i in picked], pixels=train_x[picked])
    test = ImageSplit("test", test_y, [f"cifar-100/test/{i}" for i in range(len(test_y))], pixels=test_x)
    val = ImageSplit("val", test.labels, test.paths, pixels=test.pixels)
    return LTDataset(
        f"cifar100-lt:{imbalance:g}", classnames, {"train": train, "val": val, "test": test}, source=str(root)
    )


def _cifar_spec(arg: str | None) -> LTDataset:
    """`cifar100-lt:IF`."""
    if not arg:
        raise BalladError("cifar100-lt needs an imbalance factor, e.g. cifar100-lt:100 (or :50, :10)")
    return cifar100_lt(float(arg))


DATASETS.register("cifar100-lt", _cifar_spec, help="cifar100-lt:IF, CIFAR-100-LT from $BALLAD_DATA")
