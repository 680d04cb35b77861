"""Shared fixtures: synthetic Fashion-MNIST IDX files, synthetic caches, offline settings."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ballad_cache.store.cache import FeatureCache

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parent.parent


def run_ballad(args: list[str], env: dict[str, str], ranks: int = 1, port: int = 29570) -> subprocess.CompletedProcess:
    """Run `ballad ARGS` in a fresh process (under torchrun when `ranks` > 1), output captured as text."""
    launcher = [sys.executable]
    if ranks > 1:
        launcher += ["-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={port}"]
    return subprocess.run([*launcher, "-m", "cli.main", *args], cwd=ROOT, env=env, capture_output=True, text=True)


def write_idx(path: Path, array: np.ndarray, compress: bool = True) -> None:
    """Write an unsigned-byte IDX file (what Fashion-MNIST ships)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)


def class_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """28×28 images a small model learns quickly: class c lights up row band c, plus noise."""
    x = rng.integers(0, 60, size=(len(labels), 28, 28)).astype(np.uint8)
    for i, c in enumerate(labels):
        x[i, 2 + 2 * c : 4 + 2 * c, :] = 255
    return x


@pytest.fixture(scope="session")
def fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic Fashion-MNIST (520 train and 30 test images per class) in $BALLAD_DATA/fashion-mnist."""
    root = tmp_path_factory.mktemp("ballad_data")
    folder = root / "fashion-mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    train_y = np.repeat(np.arange(10), 520)
    test_y = np.repeat(np.arange(10), 30)
    write_idx(folder / "train-images-idx3-ubyte.gz", class_images(train_y, rng))
    write_idx(folder / "train-labels-idx1-ubyte.gz", train_y)
    write_idx(folder / "t10k-images-idx3-ubyte.gz", class_images(test_y, rng))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", test_y)
    return root


@pytest.fixture()
def ballad_data(fmnist_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point $BALLAD_DATA at the synthetic Fashion-MNIST."""
    monkeypatch.setenv("BALLAD_DATA", str(fmnist_dir))
    return fmnist_dir


def make_cache(
    folder: Path,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    text: np.ndarray,
    dtype: str = "float32",
) -> Path:
    """Write a cache of given (features, labels) per split without any model (features normalised here)."""
    from ballad_cache.store.cache import ShardWriter, read_shard_entry, write_manifest, write_text_embeddings

    folder.mkdir(parents=True, exist_ok=True)
    text_t = torch.nn.functional.normalize(torch.as_tensor(text, dtype=torch.float32), dim=-1)
    num_classes, dim = text_t.shape
    classnames = [f"class {c}" for c in range(num_classes)]
    text_entry = write_text_embeddings(folder, text_t, text_t[:, None], classnames, ["a photo of a {c}."])
    splits = {}
    for name, (x, y) in (("train", train), ("val", val), ("test", test)):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        w = ShardWriter(folder, name, 0, len(y), dim, "synthetic", dtype)
        w.write(
            x.astype(np.float32),
            y.astype(np.int32),
            np.arange(len(y)),
            np.zeros(len(y), np.int16),
            [f"{name}/{i}" for i in range(len(y))],
        )
        w.close()
        entry = read_shard_entry(folder, name, 0, "synthetic")
        entry.pop("skipped")
        splits[name] = {"images": len(y), "views": 1, "rows": len(y), "shards": [entry]}
    write_manifest(
        folder,
        {
            "dataset": "synthetic",
            "model": {"name": "synthetic", "pretrained": None, "checkpoint_sha256": None},
            "embed_dim": dim,
            "dtype": dtype,
            "classnames": classnames,
            "templates": ["a photo of a {c}."],
            "text": text_entry,
            "splits": splits,
            "train_class_counts": np.bincount(train[1], minlength=num_classes).tolist(),
            "skipped": [],
        },
    )
    return folder


def longtail_features(
    rng: np.random.Generator, counts: list[int], dim: int, per_class_eval: int, tail_shift: float
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Features near their class's text embedding, except the tail half whose images are rotated away."""
    num_classes = len(counts)
    text = rng.normal(size=(num_classes, dim))
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    shift = rng.normal(size=(num_classes, dim))
    shift /= np.linalg.norm(shift, axis=1, keepdims=True)

    def sample(n_per: list[int]) -> tuple[np.ndarray, np.ndarray]:
        # tail classes lean towards the next class's prompt: zero-shot confuses them, a linear map can undo it
        y = np.repeat(np.arange(num_classes), n_per)
        tail = (y >= num_classes // 2)[:, None]
        centre = text[y] + tail * tail_shift * text[(y + 1) % num_classes] + 0.3 * shift[y]
        return centre + 0.25 * rng.normal(size=(len(y), dim)), y

    return {
        "text": (text, None),
        "train": sample(counts),
        "val": sample([per_class_eval] * num_classes),
        "test": sample([per_class_eval] * num_classes),
    }


LT_COUNTS = [200, 120, 80, 50, 30, 18, 12, 8, 6, 5]


@pytest.fixture()
def lt_cache(tmp_path: Path) -> FeatureCache:
    """A long-tailed synthetic cache (10 classes, 200 ... 5 training images, dim 32) with val and test splits."""
    d = longtail_features(np.random.default_rng(0), LT_COUNTS, dim=32, per_class_eval=40, tail_shift=1.2)
    make_cache(tmp_path / "cache", d["train"], d["val"], d["test"], d["text"][0])
    return FeatureCache(tmp_path / "cache")


ANNOUNCED = (
    "finetune",
    "extract-features",
    "fit-adapter",
    "evaluate",
    "sweep",
    "export",
    "predict",
    "demo",
    "reproduce",
)


def without_announcement(text: str) -> str:
    """A command's output without its first line, the announcement of what it runs on (`finetune: DATA with MODEL
    -> OUT`), so tests of errors and numbers read the rest."""
    lines = text.splitlines(keepends=True)
    if lines and lines[0].split(":", 1)[0] in ANNOUNCED:
        lines = lines[1:]
    return "".join(lines)
