"""`wds:DIR` and `format: webdataset`: webdataset tar shards as a dataset, `DIR/{train,val,test}/*.tar` with
`DIR/classnames.txt`, or a YAML description with `format: webdataset` whose splits are shard patterns
(`train/shard-{000..099}.tar`, globs) relative to its `root` (default: the description's folder).

A sample is the members of one tar that share a key (webdataset's rule: the member path up to the first dot of its
file name), its image the `.jpg`/`.jpeg`/`.png`/`.webp` member and its label the `.cls` member (an integer, as
text). Each split lists its tars in name order and their samples in tar order; a sample's key is its row's path in
the cache, so resume, `--skip-bad` and 1 rank = N ranks hold as for folders. Images are read by seeking to their
member's bytes (`tarfile` finds the offsets in one pass over the headers), so any rank or DataLoader worker reads any
sample without streaming the shard: the extraction keeps its image-major rows and shard boundaries.

`sizes.json` beside the tars (`{"shard.tar": samples, ...}`, as webdataset writers emit) is checked when present;
where it is missing or lacks a tar, the samples counted in the index pass are recorded there (when the folder is
writable), so later runs check the shards against them. A tar with no usable sample, an image without a `.cls`, a
`.cls` without an image, or a split with no sample stops with one line naming the tar (and the first such key).
"""

from __future__ import annotations

import glob
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import numpy as np

from ...atomic import write_json
from ...errors import BalladError
from ..splits import (
    DATASET_FORMATS,
    DATASETS,
    DEFAULT_TEMPLATES,
    SPLITS,
    ImageSplit,
    LTDataset,
    check_classnames,
    description_path,
    description_templates,
    expand_vars,
    read_lines,
)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def split_key(name: str) -> tuple[str, str]:
    """(key, extension) of a tar member name, webdataset's way: `dir/a.b.jpg` -> (`dir/a`, `b.jpg`)."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_tar(tar: Path, num_classes: int) -> tuple[list[tuple[str, int, int, int]], int]:
    """Usable samples of one tar in member order, (key, label, image offset, image size), and the number of samples
    (keys) it holds, usable or not: what a webdataset writer's sizes.json counts.

    Raises:
        BalladError: the tar cannot be read, a `.cls` member is not an integer in range, no sample has both an
            image and a label, or a key has one without the other.
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
                    kind = "image" if ext in IMAGE_EXTS else ".cls"
                    raise BalladError(f"{tar}: sample '{key}' has two {kind} members; a key names one sample")
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
    unlabelled = [k for k in order if k in images and k not in labels]
    if unlabelled:  # an image without a class is a hole in the data, not something to drop without a word
        raise BalladError(
            f"{tar}: {len(unlabelled)} image(s) have no .cls label (first: '{unlabelled[0]}'); label or remove them"
        )
    imageless = [k for k in order if k in labels and k not in images]
    if imageless:  # a label whose image is missing: the same hole, seen from the other side
        raise BalladError(
            f"{tar}: {len(imageless)} .cls label(s) have no image member (first: '{imageless[0]}'); add the image "
            "or remove the label"
        )
    return samples, len(order)


def expand_braces(pattern: str) -> list[str]:
    """Brace expansion as webdataset's shard specs use it: `{000..099}` a zero-padded range (either order),
    `{a,b}` alternatives (which may hold groups of their own); several groups expand left to right.

    Raises:
        BalladError: an unbalanced brace, or a group that is neither a range nor a list.
    """
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    depth, end, commas = 0, -1, []
    for i in range(start, len(pattern)):
        depth += {"{": 1, "}": -1}.get(pattern[i], 0)
        if pattern[i] == "," and depth == 1:
            commas.append(i)
        if depth == 0:
            end = i
            break
    if end < 0:
        raise BalladError(f"shard pattern '{pattern}': a '{{' without its '}}'")
    body = pattern[start + 1 : end]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if r:
        a, b = r.groups()
        # zero padding where an end is written with a leading zero (bash and braceexpand: {0..10} is 0 1 ... 10)
        padded = any(len(e) > 1 and e.startswith("0") for e in (a, b))
        width = max(len(a), len(b)) if padded else 0
        step = 1 if int(b) >= int(a) else -1
        items = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    elif commas:
        cuts = [start, *commas, end]
        items = [x for a, b in zip(cuts[:-1], cuts[1:], strict=True) for x in expand_braces(pattern[a + 1 : b])]
    else:
        raise BalladError(f"shard pattern '{pattern}': '{{{body}}}' is neither a range {{000..099}} nor a list {{a,b}}")
    tails = expand_braces(pattern[end + 1 :])
    return [pattern[:start] + item + tail for item in items for tail in tails]


def shard_paths(pattern: str, base: Path) -> list[Path]:
    """The tars a shard pattern names, relative paths from `base`: brace ranges and lists expanded in their order,
    glob patterns (`*`, `?`, `[...]`) matched in name order, a folder read as its `*.tar`; each tar once.

    Raises:
        BalladError: a named tar that does not exist, or a pattern that matches no tar.
    """
    found: list[Path] = []
    seen: set[Path] = set()
    for item in expand_braces(pattern):
        named = Path(item).expanduser()
        path = named if named.is_absolute() else base / named
        if glob.has_magic(item):  # the pattern's own wildcards only: base may hold '[' or '*' in its name
            rooted = named if named.is_absolute() else Path(glob.escape(str(base))) / named
            matches = sorted(Path(p) for p in glob.glob(str(rooted)) if p.endswith(".tar"))
            if not matches:
                raise BalladError(f"shard pattern '{pattern}': {path} matches no .tar file")
        elif path.is_dir():
            matches = sorted(path.glob("*.tar"))
            if not matches:
                raise BalladError(f"{path} holds no .tar shards (shard pattern '{pattern}')")
        elif not path.is_file():
            raise BalladError(f"shard {path} (from the pattern '{pattern}') does not exist")
        else:
            matches = [path]
        for m in matches:
            if m not in seen:
                seen.add(m)
                found.append(m)
    return found


def webdataset_split(tars: list[Path], split: str, num_classes: int) -> ImageSplit:
    """The samples of `tars`, in that order, as an ImageSplit read by seeking; counts are checked against, or
    recorded in, each folder's sizes.json.

    Raises:
        BalladError: a bad tar (see `index_tar`), a key in two tars, or counts that differ from `sizes.json`.
    """
    keys, labels, members = [], [], []
    seen: dict[str, Path] = {}
    counted: dict[Path, dict[str, int]] = {}
    recorded: dict[Path, dict[str, int]] = {}  # each folder's sizes.json, read once
    for tar in tars:
        samples, total = index_tar(tar, num_classes)
        sizes_file = tar.parent / "sizes.json"
        if tar.parent not in recorded:
            recorded[tar.parent] = _read_sizes(sizes_file)
        sizes = recorded[tar.parent]
        if tar.name in sizes and sizes[tar.name] != total:
            raise BalladError(
                f"{tar} holds {total} samples, {sizes_file} says {sizes[tar.name]}; fix or delete sizes.json"
            )
        if tar.name not in sizes:
            counted.setdefault(tar.parent, {})[tar.name] = total
        for key, label, offset, size in samples:
            if key in seen:
                raise BalladError(
                    f"sample key '{key}' is in both {seen[key]} and {tar}; a key names one row: rename one"
                )
            seen[key] = tar
            keys.append(key)
            labels.append(label)
            members.append((str(tar), offset, size))
    for folder, new in counted.items():  # counted once, recorded for the next run
        try:
            write_json(folder / "sizes.json", {**recorded[folder], **new})
        except (OSError, BalladError):  # a read-only or full folder: the counts are checked next time instead
            pass
    return ImageSplit(split, np.asarray(labels, dtype=np.int64), keys, members=members)


def _read_sizes(sizes_file: Path) -> dict[str, int]:
    """A sizes.json as {tar name: samples}; empty when absent.

    Raises:
        BalladError: a file that is not a JSON object of integer counts.
    """
    if not sizes_file.exists():
        return {}
    try:
        sizes = json.loads(sizes_file.read_text())
        if not isinstance(sizes, dict) or not all(isinstance(v, int) and v >= 0 for v in sizes.values()):
            raise ValueError("found another value")
        return {str(k): int(v) for k, v in sizes.items()}
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as exc:
        raise BalladError(f"{sizes_file} is not a JSON object of sample counts ({exc}); fix or delete it") from None


def webdataset_from_patterns(
    name: str, classnames: list[str], patterns: dict[str, str], base: Path, templates: list[str] | None = None
) -> LTDataset:
    """A webdataset from shard patterns per split (see `shard_paths`), relative ones from `base`.

    Raises:
        BalladError: no train split, a pattern that names no tar, or a bad tar.
    """
    if "train" not in patterns:
        raise BalladError(f"{name}: a webdataset needs train shards (splits: train: PATTERN)")
    splits = {
        split: webdataset_split(shard_paths(pattern, base), split, len(classnames))
        for split, pattern in patterns.items()
    }
    return LTDataset(name, classnames, splits, templates=templates or list(DEFAULT_TEMPLATES), source=str(base))


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
    if not (root / "train").is_dir():
        raise BalladError(f"{root / 'train'} does not exist; a wds: dataset needs DIR/train/*.tar")
    patterns = {split: split for split in SPLITS if (root / split).is_dir()}
    return webdataset_from_patterns(f"wds:{root}", classnames, patterns, root)


def webdataset_description(desc: dict[str, Any], path: Path) -> LTDataset:
    """A `format: webdataset` description: `classnames`, `splits: {train: PATTERN, ...}`, optional `root`."""
    missing = [k for k in ("classnames", "splits") if k not in desc]
    if missing:
        raise BalladError(f"{path}: missing key(s) {', '.join(missing)}; see data/datasets/webdataset-example.yaml")
    root = description_path(str(desc.get("root", ".")), path.parent, path)
    if not root.is_dir():
        raise BalladError(f"{path}: shard root {root} does not exist")
    classnames = check_classnames(read_lines(description_path(str(desc["classnames"]), path.parent, path)), str(path))
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
    patterns = {split: expand_vars(pattern, path) for split, pattern in splits.items()}
    return webdataset_from_patterns(
        path.stem, classnames, patterns, root, description_templates(desc, path.parent, path)
    )


def _wds_spec(arg: str | None) -> LTDataset:
    """`wds:DIR`."""
    if not arg:
        raise BalladError("wds: needs a folder, e.g. wds:/data/shards (holding {train,val,test}/*.tar)")
    return webdataset(Path(arg))


DATASETS.register(
    "wds", _wds_spec, help="wds:DIR, webdataset tar shards DIR/{train,val,test}/*.tar (.jpg/.png/.webp + .cls members)"
)


DATASET_FORMATS.register("webdataset", webdataset_description, help="tar shards")
