"""What verified reads cost: loading a cached split with every file hashed against the manifest (the default)
against the same load without the hash, measured in one run on a synthetic cache.

    python bench/cache_read.py [--rows 131072] [--dim 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from ballad_cache.store.cache import (  # noqa: E402
    FeatureCache,
    ShardWriter,
    read_shard_entry,
    write_manifest,
    write_text_embeddings,  # noqa: E402
)
from bench.common import timed, write  # noqa: E402


def synthetic_cache(folder: Path, rows: int, dim: int, shard_size: int = 16384) -> None:
    """A float16 cache of `rows` train rows in shards of `shard_size` (extract-features' default)."""
    import torch

    rng = np.random.default_rng(0)
    entries = []
    for s, start in enumerate(range(0, rows, shard_size)):
        n = min(shard_size, rows - start)
        w = ShardWriter(folder, "train", s, n, dim, "bench", "float16")
        x = rng.standard_normal((n, dim)).astype(np.float32)
        w.write(
            x / np.linalg.norm(x, axis=1, keepdims=True),
            np.zeros(n, np.int32),
            np.arange(start, start + n),
            np.zeros(n, np.int16),
            [f"img{i}" for i in range(start, start + n)],
        )
        w.close()
        entry = read_shard_entry(folder, "train", s, "bench")
        assert entry is not None
        entry.pop("skipped")
        entries.append(entry)
    text = torch.nn.functional.normalize(torch.randn(2, dim), dim=-1)
    text_entry = write_text_embeddings(folder, text, text[:, None], ["a", "b"], ["{c}"])
    write_manifest(folder, {
        "dataset": "bench", "model": {"name": "bench"}, "embed_dim": dim, "dtype": "float16", "classnames": ["a", "b"],
        "templates": ["{c}"], "text": text_entry, "splits": {"train": {"images": rows, "views": 1, "rows": rows,
        "shards": entries}}, "train_class_counts": [rows, 0], "skipped": [],
    })  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=131072)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu", help="unused (kept for run_all)")
    p.add_argument("--label", default="cache_read")
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_cache(Path(tmp), a.rows, a.dim)
        size = sum(f.stat().st_size for f in Path(tmp).glob("*.h5"))
        verified, unverified = FeatureCache(tmp), FeatureCache(tmp, verify_reads=False)
        verified.load_split("train")  # warm the page cache: both runs then read from memory
        t_plain = min(timed(lambda: unverified.load_split("train")) for _ in range(a.repeats))
        t_verified = min(timed(lambda: verified.load_split("train")) for _ in range(a.repeats))
    write(
        a.label,
        {
            "rows": a.rows,
            "dim": a.dim,
            "mib": round(size / 2**20, 1),
            "unverified_s": round(t_plain, 3),
            "verified_s": round(t_verified, 3),
            "ratio": round(t_verified / t_plain, 3),
            "target": "hashing costs little next to the read (ratio near 1)",
        },
    )


if __name__ == "__main__":
    main()
