"""Long-tailed image datasets named by spec strings.

Specs:
    fmnist-lt[:IF]     Fashion-MNIST made long-tailed (the embedded default; IDX files from the Debian package
                       `dataset-fashion-mnist`, `$BALLAD_DATA/fashion-mnist/`, or downloaded to ~/.cache/ballad).
    cifar100-lt:IF     CIFAR-100-LT (LDAM-DRW profile, n_max 500) from `$BALLAD_DATA/cifar-100-{binary,python}`.
    folder:ROOT        ROOT/{train,val,test}/<class>/<image>.
    wds:DIR            webdataset tar shards DIR/{train,val,test}/*.tar, class names in DIR/classnames.txt.
    PATH.yaml          a description: root, classnames, splits of OLTR-style list files ("rel/path label").

A dataset resolves to class names, prompt templates and splits; images decode lazily, one at a time.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import pickle
import re
import struct
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BalladError
from ..options import DEFAULT_MAX_PIXELS
from ..progress import Report
from ..registry import Registry
from .longtail import exponential_profile

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FMNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FMNIST_MIRROR = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def resource_dir() -> Path:
    """The repository's `data/` folder: class-name lists, template sets, dataset descriptions."""
    here = Path(os.environ.get("BALLAD_RESOURCES", Path(__file__).resolve().parents[2] / "data"))
    if not (here / "classnames").is_dir():
        raise BalladError(f"ballad's data folder is missing at {here}; install ballad with `pip install -e .`")
    return here


class BadImageError(BalladError):
    """An image that cannot be read or decoded; carries its split index and path."""

    def __init__(self, path: str, index: int, reason: str) -> None:
        super().__init__(f"cannot read image {path} (index {index}): {reason}; fix or remove it, or pass --skip-bad")
        self.path = path
        self.index = index


@dataclass
class ImageSplit:
    """One split: labels, a display path per row, and a way to decode row i to a PIL image.

    `files` (absolute paths), `pixels` (uint8 N×H×W or N×H×W×3) or `members` (tar file, byte offset and size of
    the image member: webdataset shards, read by seeking) holds the images.
    """

    name: str
    labels: np.ndarray
    paths: list[str]
    files: list[str] | None = None
    pixels: np.ndarray | None = None
    members: list[tuple[str, int, int]] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray) -> ImageSplit:
        """The rows `indices` of this split, in that order."""
        return ImageSplit(
            self.name,
            self.labels[indices],
            [self.paths[i] for i in indices],
            files=[self.files[i] for i in indices] if self.files is not None else None,
            pixels=self.pixels[indices] if self.pixels is not None else None,
            members=[self.members[i] for i in indices] if self.members is not None else None,
        )

    def load(self, index: int, max_pixels: int = DEFAULT_MAX_PIXELS, draft: int = 0) -> Any:
        """Decode row `index` to an RGB PIL image, refusing one whose header declares more than `max_pixels` pixels
        before any pixel is decoded. With `draft`, a JPEG is decoded at 1/2, 1/4 or 1/8 of its size (PIL's `draft`:
        the DCT scaled in the decoder, several times faster) as long as its shorter side stays at least `draft`.

        Raises:
            BadImageError: the file is missing, empty, truncated, not an image, or over the pixel budget.
        """
        from PIL import Image

        if self.pixels is not None:
            return Image.fromarray(self.pixels[index]).convert("RGB")
        source: Any
        where = ""
        if self.members is not None:
            path = self.paths[index]
            tar, offset, size = self.members[index]
            try:
                with open(tar, "rb") as f:
                    f.seek(offset)
                    data = f.read(size)
            except OSError as exc:
                raise BadImageError(path, index, f"cannot read {tar}: {exc.strerror or exc}") from None
            if len(data) != size:
                raise BadImageError(path, index, f"{tar} ends inside this member (truncated shard)")
            source, where = io.BytesIO(data), f"member of {tar}: "
        else:
            assert self.files is not None
            path = source = self.files[index]
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own budget decides
                with Image.open(source) as img:
                    width, height = img.size
                    if width * height > max_pixels:
                        raise BadImageError(
                            path, index, f"{width}x{height} pixels, over the budget of {max_pixels} (--max-pixels)"
                        )
                    if draft and img.format == "JPEG" and min(width, height) > draft:  # draft keeps >= the request
                        scale = min(width, height) / draft
                        img.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
                    img.load()
                    return img.convert("RGB")
        except FileNotFoundError:
            raise BadImageError(path, index, "file not found") from None
        except Image.DecompressionBombError as exc:
            raise BadImageError(path, index, f"{exc} (over --max-pixels)") from None
        except (OSError, SyntaxError, ValueError, MemoryError) as exc:
            reason = str(exc).split(" <_io.BytesIO")[0] if where else str(exc)  # no object address for a member
            raise BadImageError(path, index, where + (reason or type(exc).__name__)) from None


@dataclass
class LTDataset:
    """A long-tailed dataset: class names, prompt templates and its splits."""

    name: str
    classnames: list[str]
    splits: dict[str, ImageSplit]
    templates: list[str] = field(default_factory=lambda: ["a photo of a {c}."])
    source: str = ""  # where the images came from, for provenance

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.classnames)

    def split(self, name: str) -> ImageSplit:
        """The split `name`, or a BalladError listing the ones this dataset has."""
        if name not in self.splits:
            raise BalladError(f"dataset {self.name} has no '{name}' split (it has: {', '.join(self.splits)})")
        return self.splits[name]

    def describe(self) -> Report:
        """Train class counts (the 20 largest and smallest classes past 40), imbalance factor, shot groups, splits."""
        from .longtail import GROUP_NAMES, group_sizes, imbalance_factor, shot_groups

        counts = self.class_counts("train")
        groups = shot_groups(counts)
        order = sorted(range(len(counts)), key=lambda c: -counts[c])
        shown = order if len(order) <= 40 else order[:20] + order[-20:]
        sizes = group_sizes(counts)
        return Report(
            f"{self.name}: train class counts",
            ["class", "name", "train", "group"],
            [[str(c), self.classnames[c], str(counts[c]), GROUP_NAMES[groups[c]]] for c in shown],
            [
                f"{self.num_classes} classes, {int(counts.sum())} train images ({counts.max()} ... {counts.min()}), "
                f"imbalance factor {imbalance_factor(counts):.1f}",
                f"groups: {sizes['many']} many / {sizes['medium']} medium / {sizes['few']} few (many > 100, few < 20); "
                f"splits: " + ", ".join(f"{s} {len(v)}" for s, v in self.splits.items()),
            ],
        )

    def class_counts(self, split: str = "train") -> np.ndarray:
        """Images per class in `split`."""
        return np.bincount(self.split(split).labels, minlength=self.num_classes)


# ---------------------------------------------------------------------------------------------- spec registry


def _fmnist(arg: str | None) -> LTDataset:
    imbalance = float(arg) if arg else 100.0
    if not (math.isfinite(imbalance) and imbalance >= 1):
        raise ValueError(f"the imbalance factor must be a finite number >= 1, got {arg}")
    return fashion_mnist_lt(imbalance=imbalance)


def _cifar(arg: str | None) -> LTDataset:
    if not arg:
        raise BalladError("cifar100-lt needs an imbalance factor, e.g. cifar100-lt:100 (or :50, :10)")
    return cifar100_lt(float(arg))


def _folder(arg: str | None) -> LTDataset:
    if not arg:
        raise BalladError("folder: needs a root, e.g. folder:/data/mydataset")
    return folder_dataset(Path(arg))


DATASETS: Registry[Callable[[str | None], LTDataset]] = Registry("dataset")
DATASETS.register("fmnist-lt", _fmnist, help="fmnist-lt[:IF], Fashion-MNIST made long-tailed (the embedded default)")
DATASETS.register("cifar100-lt", _cifar, help="cifar100-lt:IF, CIFAR-100-LT from $BALLAD_DATA")
DATASETS.register("folder", _folder, help="folder:ROOT, ROOT/{train,val,test}/<class>/<image>")


def _wds(arg: str | None) -> LTDataset:
    from .webdataset import webdataset

    if not arg:
        raise BalladError("wds: needs a folder, e.g. wds:/data/shards (holding {train,val,test}/*.tar)")
    return webdataset(Path(arg))


DATASETS.register(
    "wds", _wds, help="wds:DIR, webdataset tar shards DIR/{train,val,test}/*.tar (.jpg/.png/.webp + .cls members)"
)


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
        raise BalladError(f"unknown dataset '{spec}'; known: {', '.join(list_datasets())}")
    try:
        return DATASETS.get(name)(arg or None)
    except ValueError as exc:
        raise BalladError(f"bad dataset spec '{spec}': {exc}") from exc


# ---------------------------------------------------------------------------------------------- shared helpers


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of a text file, or a BalladError naming the file."""
    try:
        return [ln.strip() for ln in path.read_text().splitlines() if ln.strip()]
    except FileNotFoundError:
        raise BalladError(f"{path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BalladError(f"cannot read {path}: {exc}") from None


def check_classnames(classnames: Sequence[str], origin: str) -> list[str]:
    """Reject empty or duplicate class names, naming the file they came from."""
    names = list(classnames)
    if not names:
        raise BalladError(f"{origin}: no class names")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            raise BalladError(
                f"{origin}: duplicate class name '{n}' (lines {seen[n] + 1} and {i + 1}); names must be unique"
            )
        seen[n] = i
    return names


def template_sets() -> Registry[Path]:
    """Registered prompt-template sets: every `data/templates/*.txt` (one template a line), plus any registered
    with `TEMPLATE_SETS.register(name, path)`."""
    for path in sorted((resource_dir() / "templates").glob("*.txt")):
        if path.stem not in TEMPLATE_SETS:
            TEMPLATE_SETS.register(path.stem, path, help=f"data/templates/{path.name}")
    return TEMPLATE_SETS


TEMPLATE_SETS: Registry[Path] = Registry("template set")


def load_templates(spec: str | Sequence[str]) -> list[str]:
    """Prompt templates from a set name (`ballad`, `openai-imagenet`), a .txt file, or literal strings with `{c}`."""
    if not isinstance(spec, str):
        templates = list(spec)
    elif "{c}" in spec:
        templates = [spec]
    else:
        path = Path(spec)
        if not path.suffix:
            sets = template_sets()
            if spec not in sets:
                raise BalladError(
                    f"unknown template set '{spec}'; known: {', '.join(sets)}, a .txt file, or a '{{c}}' string"
                )
            path = sets.get(spec)
        templates = read_lines(path)
    bad = [t for t in templates if "{c}" not in t]
    if bad or not templates:
        raise BalladError(f"template {bad[0] if bad else '(none)'!r} lacks the '{{c}}' placeholder for the class name")
    return templates


def _check_labels(labels: np.ndarray, num_classes: int, origin: str) -> None:
    bad = np.flatnonzero((labels < 0) | (labels >= num_classes))
    if len(bad):
        i = int(bad[0])
        raise BalladError(f"{origin}: line {i + 1}: label {labels[i]} out of range [0, {num_classes - 1}]")


def longtail_indices(labels: np.ndarray, counts: Sequence[int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Pick `counts[c]` random rows of each class c; return (picked, the rest), both sorted by class then draw."""
    rng = np.random.default_rng(seed)
    picked, rest = [], []
    for c, n in enumerate(counts):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        picked.append(idx[:n])
        rest.append(idx[n:])
    return np.concatenate(picked), np.concatenate(rest)


# ---------------------------------------------------------------------------------------------- Fashion-MNIST


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
    from ..atomic import atomic_path

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


# ---------------------------------------------------------------------------------------------- CIFAR-100-LT


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


# ---------------------------------------------------------------------------------------------- folder: and YAML


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


def _expand_vars(value: str, origin: Path) -> str:
    """`value` with its environment variables filled in.

    Raises:
        BalladError: a variable that is not set (named, with the file it came from).
    """
    expanded = os.path.expandvars(value)
    unset = re.search(r"\$\{?(\w*)", expanded)
    if unset:
        raise BalladError(
            f"{origin}: '{value}' uses an environment variable that is not set (${unset.group(1)}); set it or "
            "write the path"
        )
    return expanded


def _expand(value: str, base: Path, origin: Path) -> Path:
    p = Path(_expand_vars(value, origin)).expanduser()
    return p if p.is_absolute() else base / p


def _yaml_templates(desc: dict[str, Any], base: Path, path: Path) -> list[str]:
    """A description's `templates` (or `template`): a set name, a .txt file, a '{c}' prompt or a list of them."""
    raw_templates = desc.get("templates", desc.get("template"))
    if raw_templates is not None and not (
        isinstance(raw_templates, str)
        or (isinstance(raw_templates, list) and all(isinstance(t, str) for t in raw_templates))
    ):
        raise BalladError(f"{path}: templates must be a set name, a .txt file, a '{{c}}' prompt or a list of them")
    if isinstance(raw_templates, str) and "{c}" not in raw_templates:
        raw_templates = str(_expand(raw_templates, base, path))
    return load_templates(raw_templates) if raw_templates else ["a photo of a {c}."]


def _yaml_webdataset(desc: dict[str, Any], path: Path) -> LTDataset:
    """A `format: webdataset` description: `classnames`, `splits: {train: PATTERN, ...}`, optional `root`."""
    from .webdataset import webdataset_from_patterns

    missing = [k for k in ("classnames", "splits") if k not in desc]
    if missing:
        raise BalladError(f"{path}: missing key(s) {', '.join(missing)}; see data/datasets/webdataset-example.yaml")
    root = _expand(str(desc.get("root", ".")), path.parent, path)
    if not root.is_dir():
        raise BalladError(f"{path}: shard root {root} does not exist")
    classnames = check_classnames(read_lines(_expand(str(desc["classnames"]), path.parent, path)), str(path))
    splits = desc["splits"]
    if not isinstance(splits, dict) or not all(isinstance(v, str) for v in splits.values()):
        raise BalladError(
            f"{path}: splits must map train/val/test to shard patterns, e.g. 'train: train/{{000..099}}.tar'"
        )
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise BalladError(f"{path}: unknown split '{unknown[0]}' (use train, val, test)")
    if "train" not in splits:
        raise BalladError(f"{path}: splits needs train shards, e.g. 'train: train/{{000..099}}.tar'")
    # environment variables first: ${X} is not a brace group
    patterns = {split: _expand_vars(pattern, path) for split, pattern in splits.items()}
    return webdataset_from_patterns(path.stem, classnames, patterns, root, _yaml_templates(desc, path.parent, path))


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
    """A dataset description file: `root`, `classnames`, `splits: {train, val, test}` of OLTR-style list files,
    optional `template(s)`; or, with `format: webdataset`, splits of tar shard patterns (brace ranges, globs)
    relative to `root` (default: the file's folder)."""
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
    if fmt not in ("list", "webdataset"):
        raise BalladError(f"{path}: unknown format '{fmt}'; use list (OLTR list files) or webdataset (tar shards)")
    if fmt == "webdataset":
        return _yaml_webdataset(desc, path)
    missing = [k for k in ("root", "classnames", "splits") if k not in desc]
    if missing:
        raise BalladError(f"{path}: missing key(s) {', '.join(missing)}; see data/datasets/imagenet-lt.yaml")
    base = path.parent
    root = _expand(str(desc["root"]), base, path)
    if not root.is_dir():
        raise BalladError(f"{path}: image root {root} does not exist")
    cls_file = _expand(str(desc["classnames"]), base, path)
    classnames = check_classnames(read_lines(cls_file), str(cls_file))
    splits = {}
    if not isinstance(desc["splits"], dict) or not all(isinstance(v, str) for v in desc["splits"].values()):
        raise BalladError(f"{path}: splits must map train/val/test to list files, e.g. 'train: train.txt'")
    for split, list_path in desc["splits"].items():
        if split not in SPLITS:
            raise BalladError(f"{path}: unknown split '{split}' (use train, val, test)")
        s = read_split_list(_expand(str(list_path), base, path), root, len(classnames))
        s.name = split
        splits[split] = s
    if "train" not in splits:
        raise BalladError(f"{path}: splits needs a train list")
    templates = _yaml_templates(desc, base, path)
    counts = np.bincount(splits["train"].labels, minlength=len(classnames))
    if (counts == 0).any():
        c = int(np.flatnonzero(counts == 0)[0])
        raise BalladError(
            f"{path}: class {c} ('{classnames[c]}') has no training image; fix the train list or the class list"
        )
    return LTDataset(path.stem, classnames, splits, templates=templates, source=str(root))
