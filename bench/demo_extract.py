"""The demo's extraction step (fmnist-lt, `ballad-lite`, 16 official views per train image, val and test) timed with
the code before decode-once (a git revision, run from a worktree of it) and with this checkout, in one run.

    python bench/demo_extract.py [--before 2dbdb77] [--workers N]

Each run is `ballad extract-features --data fmnist-lt --model ballad-lite --shard-size 4096` (the demo's
ExtractConfig) into a fresh folder, in a subprocess, timed end to end (model load included); this checkout runs it
with `--augment-on worker` and `--augment-on device`. The demo extracts with its phase-A model, which has the same
architecture and cost as `ballad-lite`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ballad_cache.options import default_workers  # noqa: E402
from bench.common import machine, write  # noqa: E402


def timed_extract(code: Path, out: Path, workers: int, *extra: str) -> float:
    """Seconds of one `extract-features` run of the checkout at `code`."""
    args = ["extract-features", "--data", "fmnist-lt", "--model", "ballad-lite", "--out", str(out)]
    args += ["--shard-size", "4096", "--workers", str(workers), "--device", "cpu", *extra]
    env = {**os.environ, "PYTHONPATH": str(code), "TRANSFORMERS_VERBOSITY": "error"}
    script = f"import sys; sys.argv = ['ballad', *{args!r}]; from cli.main import main; main()"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", script], cwd=code, env=env, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "--before", default="2dbdb77", help="a revision before decode-once (default: 2dbdb77, the commit before it)"
    )
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--label", default="demo_extract")
    a = p.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ballad-demo-extract-"))
    before = tmp / "before"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(before), a.before], check=True)
    try:
        seconds = {
            "before": timed_extract(before, tmp / "cache-before", a.workers),
            "after, --augment-on worker": timed_extract(ROOT, tmp / "cache-after", a.workers, "--augment-on", "worker"),
            "after, --augment-on device": timed_extract(
                ROOT, tmp / "cache-device", a.workers, "--augment-on", "device"
            ),
        }
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(before)], check=False)
    manifest = json.loads((tmp / "cache-after" / "manifest.json").read_text())
    rows = sum(s["rows"] for s in manifest["splits"].values())
    same = (
        json.loads((tmp / "cache-before" / "manifest.json").read_text())["config_fingerprint"]
        == manifest["config_fingerprint"]
    )
    record = {
        "before_revision": a.before,
        "rows": rows,
        "seconds": {k: round(v, 1) for k, v in seconds.items()},
        "speedup_over_before": {k: round(seconds["before"] / v, 2) for k, v in seconds.items()},
        "same_fingerprint_before_after": same,
        "workers": a.workers,
    }
    write(a.label, record)
    lines = [
        f"Written by `python bench/demo_extract.py` ({machine()}): the demo's extraction step, {rows} rows.",
        "",
        "| code | seconds | speed-up |",
        "|---|---|---|",
        *(f"| {k} | {v:.1f} | {record['speedup_over_before'][k]:.2f}x |" for k, v in seconds.items()),
        "",
        f"'before' is revision {a.before}; its cache and this checkout's worker-path cache have "
        + ("the same fingerprint." if same else "different fingerprints."),
    ]
    print("\n".join(lines))
    (Path(__file__).resolve().parent / "demo_extract.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
