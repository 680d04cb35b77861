"""The feature cache: HDF5 shards of frozen image embeddings, class text embeddings, and a manifest written last.

Layout (format version 1)::

    CACHE/manifest.json        written last; the cache exists only when it does
    CACHE/text.h5              class_embeddings C×D f32 (L2-normalised), template_embeddings C×T×D f32
    CACHE/{split}-{nnnnn}.h5   features N×D (f16 default, L2-normalised), labels i32, index i64, view i16, paths

Each shard carries the extraction's config fingerprint in its attributes, so a rerun can tell a finished shard
of the same extraction from one of another, and readers refuse a shard of another extraction. Each shard and
`text.h5` also carry a `content_sha256` of their arrays, hashed as they are written. The manifest's `fingerprint`
hashes the manifest with those content hashes and without the files' byte-level sha256 sums (HDF5 files of equal
rows differ in their bytes from run to run): it names what the cache holds, however many ranks wrote it, and
adapters record it.

Every read is verified: a shard or `text.h5` is read into memory once, its bytes hashed against the manifest's
sha256 of that file, and only then parsed, so a value changed in place with h5py, or a `text.h5` of another
extraction, is refused naming the file (`bench/cache_read.py` measures what the hashing costs). `verify` checks every
file at once.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path, ensure_free_space, read_json, sha256_file, sha256_json, write_json
from ..errors import BalladError, setting
from ..progress import Report
from .runs import CONFIG

FORMAT_NAME = "ballad-feature-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TEXT_FILE = "text.h5"
# what every reader relies on; a manifest without one of them is refused when the cache is opened
MANIFEST_KEYS = (
    "fingerprint", "dataset", "model", "embed_dim", "dtype", "classnames", "templates", "text", "splits",
    "train_class_counts", "skipped",
)  # fmt: skip
CHUNK_BYTES = 1 << 20  # ~1 MiB HDF5 chunks: whole-chunk reads when streaming, small enough for partial reads


def shard_name(split: str, shard: int) -> str:
    """File name of shard `shard` of `split`, e.g. `train-00003.h5`."""
    return f"{split}-{shard:05d}.h5"


def shard_count(rows: int, shard_size: int) -> int:
    """Shards of `rows` rows at most `shard_size` each: ceil(rows / shard_size), and one (empty) for no row."""
    return max(1, -(-rows // shard_size))


def _h5py() -> Any:
    import h5py

    return h5py


class ShardWriter:
    """Writes one shard under a temporary name, row batches as they come, renamed into place by `close`.

    Memory stays bounded by one batch; an exception (or `abort`) deletes the temporary file.
    """

    def __init__(
        self, folder: Path, split: str, shard: int, capacity: int, dim: int, fingerprint: str, dtype: str = "float16"
    ) -> None:
        self.final = Path(folder) / shard_name(split, shard)
        np_dtype = np.dtype(dtype)
        self.final.parent.mkdir(parents=True, exist_ok=True)
        # features + labels/index/view + a path string per row; HDF5 reports a full disk only at close, badly
        ensure_free_space(self.final, capacity * (dim * np_dtype.itemsize + 14 + 80))
        self._ctx = atomic_path(self.final)
        tmp = self._ctx.__enter__()
        h5py = _h5py()
        self._file = h5py.File(tmp, "w", track_order=False)
        self._open = True
        chunk_rows = max(1, min(capacity, CHUNK_BYTES // (dim * np_dtype.itemsize)))
        f = self._file
        self._features = f.create_dataset(
            "features", shape=(capacity, dim), maxshape=(None, dim), dtype=np_dtype, chunks=(chunk_rows, dim)
        )
        self._labels = f.create_dataset("labels", shape=(capacity,), maxshape=(None,), dtype=np.int32)
        self._index = f.create_dataset("index", shape=(capacity,), maxshape=(None,), dtype=np.int64)
        self._view = f.create_dataset("view", shape=(capacity,), maxshape=(None,), dtype=np.int16)
        self._paths = f.create_dataset("paths", shape=(capacity,), maxshape=(None,), dtype=h5py.string_dtype("utf-8"))
        f.attrs["split"] = split
        f.attrs["shard"] = shard
        f.attrs["fingerprint"] = fingerprint
        self.rows = 0
        self.skipped: list[dict[str, Any]] = []
        self._np_dtype = np_dtype
        self._content = hashlib.sha256()

    def write(
        self, features: np.ndarray, labels: np.ndarray, index: np.ndarray, view: np.ndarray, paths: list[str]
    ) -> None:
        """Append a batch of rows (features already L2-normalised)."""
        if not np.isfinite(features).all():
            bad = int(index[~np.isfinite(features).all(axis=1)][0])
            raise BalladError(
                f"the encoder produced NaN/Inf features for row {bad} of {self.final.name}; "
                f"check the model weights and {setting('precision')}"
            )
        n = len(labels)
        for part in (
            np.ascontiguousarray(features, dtype=self._np_dtype),
            np.ascontiguousarray(labels, dtype=np.int32),
            np.ascontiguousarray(index, dtype=np.int64),
            np.ascontiguousarray(view, dtype=np.int16),
        ):
            self._content.update(part.tobytes())
        self._content.update("\n".join(paths).encode() + b"\0")
        s = slice(self.rows, self.rows + n)
        self._features[s] = features
        self._labels[s] = labels
        self._index[s] = index
        self._view[s] = view
        self._paths[s] = paths
        self.rows += n

    def close(self) -> dict[str, Any]:
        """Finish the shard and move it into place; returns its manifest entry."""
        try:
            for ds in (self._features, self._labels, self._index, self._view, self._paths):
                ds.resize(self.rows, axis=0)
            self._file.attrs["skipped"] = json.dumps(self.skipped)
            self._file.attrs["content_sha256"] = self._content.hexdigest()
        finally:
            self._open = False
            self._file.close()
        self._ctx.__exit__(None, None, None)
        return {
            "file": self.final.name,
            "rows": self.rows,
            "sha256": sha256_file(self.final),
            "content_sha256": self._content.hexdigest(),
            "skipped": self.skipped,
        }

    def abort(self) -> None:
        """Drop the shard: close and delete the temporary file."""
        try:
            if self._open:
                self._open = False
                with contextlib.suppress(Exception):  # the file may be what failed (e.g. a full disk)
                    self._file.close()
        finally:
            with contextlib.suppress(KeyboardInterrupt):
                self._ctx.__exit__(KeyboardInterrupt, KeyboardInterrupt(), None)


def read_shard_entry(folder: Path, split: str, shard: int, fingerprint: str) -> dict[str, Any] | None:
    """The manifest entry of a finished shard of this extraction, or None when it must be (re)computed."""
    path = Path(folder) / shard_name(split, shard)
    if not path.exists():
        return None
    try:
        with _h5py().File(path, "r") as f:
            if f.attrs.get("fingerprint") != fingerprint:
                return None
            rows = int(f["labels"].shape[0])
            skipped = json.loads(f.attrs.get("skipped", "[]"))
            content = str(f.attrs.get("content_sha256", ""))
    except (OSError, KeyError):
        return None
    if not content:  # written before content hashes existed: recompute the shard
        return None
    return {"file": path.name, "rows": rows, "sha256": sha256_file(path), "content_sha256": content, "skipped": skipped}


def write_text_embeddings(
    folder: Path,
    class_embeddings: torch.Tensor,
    template_embeddings: torch.Tensor,
    classnames: list[str],
    templates: list[str],
) -> dict[str, Any]:
    """Write `text.h5` atomically; returns its manifest entry."""
    h5py = _h5py()
    final = Path(folder) / TEXT_FILE
    classes = np.ascontiguousarray(class_embeddings.float().cpu().numpy())
    per_template = np.ascontiguousarray(template_embeddings.float().cpu().numpy())
    content = hashlib.sha256(classes.tobytes() + per_template.tobytes())
    content.update(json.dumps([classnames, templates]).encode())
    with atomic_path(final) as tmp, h5py.File(tmp, "w") as f:
        f.create_dataset("class_embeddings", data=classes)
        f.create_dataset("template_embeddings", data=per_template)
        f.attrs["classnames"] = json.dumps(classnames)
        f.attrs["templates"] = json.dumps(templates)
    return {"file": TEXT_FILE, "sha256": sha256_file(final), "content_sha256": content.hexdigest()}


def write_manifest(folder: Path, body: dict[str, Any]) -> dict[str, Any]:
    """Stamp `body` with the format and its own fingerprint and write `manifest.json` (last, atomically)."""
    manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **body}
    manifest.pop("fingerprint", None)
    manifest["fingerprint"] = content_fingerprint(manifest)
    write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def content_fingerprint(manifest: dict[str, Any]) -> str:
    """Hash of a manifest without its files' byte-level sha256 sums: provenance, rows and content hashes.

    Two extractions that hold the same rows (one rank or several, a rerun) get the same fingerprint.
    """
    body = copy.deepcopy({k: v for k, v in manifest.items() if k != "fingerprint"})
    for entry in [body.get("text", {})] + [e for s in body.get("splits", {}).values() for e in s.get("shards", [])]:
        entry.pop("sha256", None)
    return sha256_json(body)[:16]


@dataclass
class SplitFeatures:
    """Rows of one split: features (N×D), labels, row in the dataset's split list, and view (0 = eval).

    An eval split scored with test-time crops (`FeatureCache.eval_split`) holds `views` = V rows per image,
    view-major: `features` is V·N×D (row v·N + i is crop v of image i) while `labels`, `index` and `view` have the N
    images' entries; every metric averages the V scores of an image (`heads.metrics.per_image`)."""

    features: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor
    view: torch.Tensor
    views: int = 1

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def eval_view(self) -> SplitFeatures:
        """Only the rows of the un-augmented view."""
        keep = self.view == 0
        return SplitFeatures(self.features[keep], self.labels[keep], self.index[keep], self.view[keep])


class FeatureCache:
    """A finished cache opened for reading; checks the manifest's format and every shard it touches."""

    def __init__(self, path: str | os.PathLike[str], verify_reads: bool = True) -> None:
        self.path = Path(path)
        self.verify_reads = verify_reads  # hash every file as it is read (benchmarks turn it off to measure it)
        if not self.path.is_dir():
            raise BalladError(f"cache {self.path} does not exist; create it with `ballad extract-features`")
        mpath = self.path / MANIFEST
        if not mpath.exists():
            held = self.path / CONFIG
            command = read_json(held).get("command") if held.is_file() else None
            if command not in (None, "extract-features"):
                raise BalladError(f"{self.path} holds a {command} run, not a feature cache; pass the cache folder")
            raise BalladError(f"{self.path} has no {MANIFEST}: the extraction did not finish; rerun extract-features")
        self.manifest: dict[str, Any] = read_json(mpath)
        if not isinstance(self.manifest, dict):
            raise BalladError(f"{mpath} is not a ballad feature cache manifest (not a JSON object); re-extract")
        if self.manifest.get("format") != FORMAT_NAME:
            raise BalladError(f"{mpath} is not a ballad feature cache manifest")
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise BalladError(
                f"{mpath} has format version {self.manifest.get('format_version')}, this ballad reads "
                f"{FORMAT_VERSION}; re-extract with this version"
            )
        missing = [k for k in MANIFEST_KEYS if k not in self.manifest]
        if missing:
            raise BalladError(f"{mpath} lacks '{missing[0]}'; it was edited or cut short: re-extract the cache")
        try:
            for split in self.manifest["splits"].values():
                for entry in split["shards"]:
                    str(entry["file"]), int(entry["rows"]), str(entry["sha256"])
            if len(self.manifest["train_class_counts"]) != len(self.manifest["classnames"]):
                raise ValueError("train_class_counts and classnames differ in length")
            str(self.manifest["text"]["sha256"]), int(self.manifest["embed_dim"])
            edited = content_fingerprint(self.manifest) != self.manifest["fingerprint"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BalladError(f"{mpath} is malformed ({exc!s}); re-extract the cache") from None
        if edited:
            raise BalladError(f"{mpath} was edited: its fingerprint does not match its content; re-extract the cache")

    @property
    def fingerprint(self) -> str:
        """The manifest's fingerprint (hashes shards and provenance)."""
        return str(self.manifest["fingerprint"])

    @property
    def classnames(self) -> list[str]:
        """Class names, in label order."""
        return list(self.manifest["classnames"])

    @property
    def num_classes(self) -> int:
        """Number of classes."""
        return len(self.manifest["classnames"])

    @property
    def train_counts(self) -> np.ndarray:
        """Training images per class (not views), as counted at extraction."""
        return np.asarray(self.manifest["train_class_counts"], dtype=np.int64)

    @property
    def splits(self) -> list[str]:
        """Splits present in the cache."""
        return list(self.manifest["splits"])

    def shard_files(self, split: str) -> list[dict[str, Any]]:
        """Manifest entries of `split`'s shards."""
        if split not in self.manifest["splits"]:
            raise BalladError(f"cache {self.path} has no '{split}' split (it has: {', '.join(self.splits)})")
        return list(self.manifest["splits"][split]["shards"])

    def _open_verified(self, path: Path, sha256: str) -> Any:
        """`path` as an open HDF5 file, read once into memory and hashed against the manifest's `sha256`.

        Raises:
            BalladError: the file is missing, or its bytes are not the ones the manifest recorded.
        """
        if not path.exists():
            raise BalladError(f"{path} is missing; run `ballad extract-features` again to recreate it")
        raw = path.read_bytes()
        if self.verify_reads and hashlib.sha256(raw).hexdigest() != sha256:
            raise BalladError(
                f"{path} does not match its sha256 in {MANIFEST} (changed since extraction); "
                f"run `ballad cache verify` and re-extract with {setting('overwrite', True)}"
            )
        return _h5py().File(io.BytesIO(raw), "r")

    def text_embeddings(self, per_template: bool = False) -> torch.Tensor:
        """Class text embeddings C×D (or C×T×D per template), float32, from a `text.h5` whose bytes match the
        manifest."""
        path = self.path / TEXT_FILE
        try:
            with self._open_verified(path, self.manifest["text"]["sha256"]) as f:
                arr = f["template_embeddings" if per_template else "class_embeddings"][()]
                names = json.loads(f.attrs.get("classnames", "[]"))
        except (OSError, KeyError, ValueError) as exc:
            raise BalladError(f"{path} is unreadable ({exc}); run `ballad cache verify` and re-extract") from None
        if names != self.classnames or arr.shape[0] != self.num_classes:
            raise BalladError(
                f"{path} holds the text embeddings of other classes than {self.path / MANIFEST} lists; "
                f"re-extract the cache with {setting('overwrite', True)}"
            )
        return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))

    def iter_shards(self, split: str, dtype: torch.dtype = torch.float32) -> Iterator[SplitFeatures]:
        """Stream `split` one shard at a time (for caches larger than memory)."""
        for entry in self.shard_files(split):
            yield self._read_shard(entry, dtype)

    def _read_shard(self, entry: dict[str, Any], dtype: torch.dtype) -> SplitFeatures:
        path = self.path / entry["file"]
        try:
            with self._open_verified(path, entry["sha256"]) as f:
                feats = f["features"][()]
                labels = f["labels"][()]
                index = f["index"][()]
                view = f["view"][()]
                shard_fp = f.attrs.get("fingerprint")
        except (OSError, KeyError, ValueError) as exc:
            raise BalladError(
                f"shard {path} is corrupt or truncated ({str(exc).splitlines()[0]}); rerun extract-features with "
                f"{setting('overwrite', True)}"
            ) from None
        expected = self.manifest.get("config_fingerprint")
        if expected is not None and shard_fp != expected:
            raise BalladError(
                f"shard {path} belongs to another extraction (fingerprint {shard_fp}, the manifest's is {expected}); "
                f"rerun extract-features with {setting('overwrite', True)}"
            )
        if len(labels) != entry["rows"] or feats.shape[0] != entry["rows"]:
            raise BalladError(f"shard {path} has {len(labels)} rows, the manifest says {entry['rows']}; re-extract")
        if not np.isfinite(feats).all():
            row = int(np.flatnonzero(~np.isfinite(feats).all(axis=1))[0])
            raise BalladError(
                f"shard {path} holds NaN/Inf features (row {row}); re-extract it with {setting('overwrite', True)}"
            )
        if len(labels) and (labels.min() < 0 or labels.max() >= self.num_classes):
            raise BalladError(f"shard {path} holds labels outside [0, {self.num_classes - 1}]; re-extract")
        return SplitFeatures(
            torch.from_numpy(feats).to(dtype),
            torch.from_numpy(labels.astype(np.int64)),
            torch.from_numpy(index),
            torch.from_numpy(view.astype(np.int64)),
        )

    def load_split(self, split: str, dtype: torch.dtype = torch.float32) -> SplitFeatures:
        """All rows of `split` in memory as `dtype` (float32 or float16)."""
        parts = list(self.iter_shards(split, dtype))
        if not parts:
            dim = int(self.manifest["embed_dim"])
            empty = torch.empty(0, dtype=torch.int64)
            return SplitFeatures(torch.empty(0, dim, dtype=dtype), empty, empty, empty)
        return SplitFeatures(
            torch.cat([p.features for p in parts]),
            torch.cat([p.labels for p in parts]),
            torch.cat([p.index for p in parts]),
            torch.cat([p.view for p in parts]),
        )

    @property
    def eval_views(self) -> str:
        """The eval views val and test hold (`extract-features --eval-views`; caches made before it: center)."""
        return str(self.manifest.get("eval_views", {}).get("name", "center"))

    def eval_split(self, split: str, views: str | None = None, dtype: torch.dtype = torch.float32) -> SplitFeatures:
        """The rows `split` is scored on with eval views `views` (default: the cache's own, `eval_views`): view 0
        for `center`; else the test-time crops, view-major with `views` = V (a ten-crop cache serves five-crop too:
        its first five crops are five-crop's).

        Raises:
            BalladError: the cache holds fewer crops than `views` needs (one line naming the cache and the fix).
        """
        from ..inputs.transforms import EVAL_VIEWS

        views = views or self.eval_views
        try:
            crops = EVAL_VIEWS.get(views)
        except ValueError as exc:
            raise BalladError(str(exc)) from None
        rows = self.load_split(split, dtype)
        if crops == 0:
            return rows.eval_view()
        held = EVAL_VIEWS.get(self.eval_views)
        if held < crops or len(rows) and not bool((rows.view == -crops).any()):
            raise BalladError(
                f"cache {self.path} holds {self.eval_views} eval views, not {views}; re-extract it with "
                f"--eval-views {views} (or score it with --views {self.eval_views})"
            )
        parts = [rows.view == -v for v in range(1, crops + 1)]
        first = rows.index[parts[0]]
        if any(not torch.equal(rows.index[p], first) for p in parts[1:]):
            raise BalladError(f"cache {self.path}: the {split} crops do not cover the same images; re-extract it")
        keep = parts[0]
        return SplitFeatures(
            torch.cat([rows.features[p] for p in parts]), rows.labels[keep], first, rows.view[keep], views=crops
        )

    def verify(self) -> list[str]:
        """Re-hash every file against the manifest and parse it, as every read does; returns the files checked.

        Raises:
            BalladError: naming the first missing, changed or unreadable file.
        """
        reader = self if self.verify_reads else FeatureCache(self.path)
        reader.text_embeddings()
        entries = [e for s in self.splits for e in self.shard_files(s)]
        for entry in entries:
            reader._read_shard(entry, torch.float16)
        return [TEXT_FILE] + [e["file"] for e in entries]

    def describe(self) -> Report:
        """Splits (images, views, rows, shards), model, dataset, dims, fingerprint and size on disk."""
        f = self.facts()
        rows = [
            [s, str(v["images"]), str(v["views"]), str(v["rows"]), str(v["shards"])] for s, v in f["splits"].items()
        ]
        model = f["model"]
        return Report(
            f"cache {self.path}",
            ["split", "images", "views", "rows", "shards"],
            rows,
            [
                f"model: {model['name']} pretrained={model['pretrained']} "
                f"sha256={str(model['checkpoint_sha256'])[:12]}",
                f"dataset: {f['dataset']}  classes: {f['classes']}  templates: {f['templates']}  "
                f"eval views: {f['eval_views']}",
                f"dim: {f['embed_dim']}  dtype: {f['dtype']}  fingerprint: {f['fingerprint']}  "
                f"size: {f['size_bytes'] / 2**20:.1f} MiB  skipped images: {f['skipped_images']}",
            ],
        )

    def facts(self) -> dict[str, Any]:
        """What `describe` shows, as plain data (`cache info --json`)."""
        m = self.manifest
        splits = {
            s: {"images": v["images"], "views": v["views"], "rows": v["rows"], "shards": len(v["shards"])}
            for s, v in m["splits"].items()
        }
        return {
            "path": str(self.path),
            "dataset": m["dataset"],
            "model": m["model"],
            "classes": len(m["classnames"]),
            "templates": len(m["templates"]),
            "embed_dim": m["embed_dim"],
            "dtype": m["dtype"],
            "fingerprint": m["fingerprint"],
            "size_bytes": self.size_on_disk(),
            "skipped_images": len(m["skipped"]),
            "eval_views": self.eval_views,
            "splits": splits,
        }

    def size_on_disk(self) -> int:
        """Bytes of all files in the cache folder."""
        return sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
