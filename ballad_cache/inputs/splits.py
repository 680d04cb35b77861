"""The dataset model every source builds, the registries sources add themselves to, and what they share.

An `LTDataset` is class names, prompt templates and `ImageSplit`s whose images decode lazily, one at a time. A source
(`ballad_cache/inputs/sources/`) turns a spec into one: it registers its spec kind in `DATASETS` (`kind:ARG`, the
loader gets ARG) and, where a YAML description can name it, its `format:` in `DATASET_FORMATS` (the loader gets the
parsed description and its path). Everything here is what two or more sources need: class-list and template reading,
the long-tailed row pick, path and template resolution for descriptions. Sources import this module and nothing
else of each other's; `datasets.load_dataset` imports them all.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BalladError, setting
from ..options import DEFAULT_MAX_PIXELS
from ..progress import Report
from ..registry import Registry

SPLITS = ("train", "val", "test")
DEFAULT_TEMPLATES = ("a photo of a {c}.",)  # BALLAD's prompt, for a dataset that names none
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}


def resource_dir() -> Path:
    """The repository's `data/` folder: class-name lists, template sets, dataset descriptions."""
    here = Path(os.environ.get("BALLAD_RESOURCES", Path(__file__).resolve().parents[2] / "data"))
    if not (here / "classnames").is_dir():
        raise BalladError(f"ballad's data folder is missing at {here}; install ballad with `pip install -e .`")
    return here


class BadImageError(BalladError):
    """An image that cannot be read or decoded; carries its split index and path."""

    # what a run that stops on it says; a skipped row does not
    advice = f"; fix or remove it, or pass {setting('skip_bad', True)}"

    def __init__(self, path: str, index: int, reason: str) -> None:
        super().__init__(f"cannot read image {path} (index {index}): {reason}{self.advice}")
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
                            path,
                            index,
                            f"{width}x{height} pixels, over the budget of {max_pixels} ({setting('max_pixels')})",
                        )
                    if draft and img.format == "JPEG" and min(width, height) > draft:  # draft keeps >= the request
                        scale = min(width, height) / draft
                        img.draft("RGB", (max(1, int(width / scale)), max(1, int(height / scale))))
                    img.load()
                    return img.convert("RGB")
        except FileNotFoundError:
            raise BadImageError(path, index, "file not found") from None
        except Image.DecompressionBombError as exc:
            raise BadImageError(path, index, f"{exc} (over {setting('max_pixels')})") from None
        except (OSError, SyntaxError, ValueError, MemoryError) as exc:
            reason = str(exc).split(" <_io.BytesIO")[0] if where else str(exc)  # no object address for a member
            raise BadImageError(path, index, where + (reason or type(exc).__name__)) from None


@dataclass
class LTDataset:
    """A long-tailed dataset: class names, prompt templates and its splits."""

    name: str
    classnames: list[str]
    splits: dict[str, ImageSplit]
    templates: list[str] = field(default_factory=lambda: list(DEFAULT_TEMPLATES))
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
        f = self.facts()
        order = sorted(f["classes"], key=lambda c: -c["train"])
        shown = order if len(order) <= 40 else order[:20] + order[-20:]
        sizes, t, train = f["groups"], f["thresholds"], [c["train"] for c in f["classes"]]
        return Report(
            f"{self.name}: train class counts",
            ["class", "name", "train", "group"],
            [[str(c["index"]), c["name"], str(c["train"]), c["group"]] for c in shown],
            [
                f"{self.num_classes} classes, {f['train_images']} train images ({max(train)} ... {min(train)}), "
                f"imbalance factor {f['imbalance_factor']:.1f}",
                f"groups: {sizes['many']} many / {sizes['medium']} medium / {sizes['few']} few "
                f"(many > {t['many']}, few < {t['few']}); "
                f"splits: " + ", ".join(f"{s} {n}" for s, n in f["splits"].items()),
            ],
        )

    def facts(self) -> dict[str, Any]:
        """What `describe` shows, for every class, as plain data (`data info --json`)."""
        from .longtail import GROUP_NAMES, ShotThresholds, group_sizes, imbalance_factor, shot_groups

        counts = self.class_counts("train")
        t = ShotThresholds()
        return {
            "name": self.name,
            "classes": [
                {"index": c, "name": self.classnames[c], "train": int(counts[c]), "group": GROUP_NAMES[g]}
                for c, g in enumerate(shot_groups(counts))
            ],
            "train_images": int(counts.sum()),
            "imbalance_factor": float(imbalance_factor(counts)),
            "groups": {k: int(v) for k, v in group_sizes(counts).items()},
            "thresholds": {"many": t.many, "few": t.few},
            "splits": {s: len(v) for s, v in self.splits.items()},
        }

    def class_counts(self, split: str = "train") -> np.ndarray:
        """Images per class in `split`."""
        return np.bincount(self.split(split).labels, minlength=self.num_classes)


# ---------------------------------------------------------------------------------------------- source registries

# A loader raises BalladError naming the file and the fix; a spec loader may raise ValueError for a malformed ARG,
# which `load_dataset` reports as a bad spec.
SpecLoader = Callable[[str | None], LTDataset]  # the ARG of `kind:ARG` (None without one) -> the dataset
FormatLoader = Callable[[dict[str, Any], Path], LTDataset]  # a parsed YAML description and its file -> the dataset

DATASETS: Registry[SpecLoader] = Registry("dataset")  # spec kinds: `load_dataset("kind:ARG")`
DATASET_FORMATS: Registry[FormatLoader] = Registry("dataset format")  # `format:` of a PATH.yaml description


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


# ---------------------------------------------------------------------------------------------- YAML descriptions


def expand_vars(value: str, origin: Path) -> str:
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


def description_path(value: str, base: Path, origin: Path) -> Path:
    """A path written in the description `origin`: variables filled in, `~` expanded, relative ones from `base`."""
    p = Path(expand_vars(value, origin)).expanduser()
    return p if p.is_absolute() else base / p


def description_templates(desc: dict[str, Any], base: Path, path: Path) -> list[str]:
    """A description's `templates` (or `template`): a set name, a .txt file, a '{c}' prompt or a list of them."""
    raw_templates = desc.get("templates", desc.get("template"))
    if raw_templates is not None and not (
        isinstance(raw_templates, str)
        or (isinstance(raw_templates, list) and all(isinstance(t, str) for t in raw_templates))
    ):
        raise BalladError(f"{path}: templates must be a set name, a .txt file, a '{{c}}' prompt or a list of them")
    if isinstance(raw_templates, str) and "{c}" not in raw_templates:
        raw_templates = str(description_path(raw_templates, base, path))
    return load_templates(raw_templates) if raw_templates else list(DEFAULT_TEMPLATES)
