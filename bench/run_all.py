"""Run every bench script at a size that fits a 2-core machine and write bench/RESULTS.md.

    python bench/run_all.py            # about 3 minutes on 2 cores
    python bench/run_all.py --only sweep,knn

Each figure is a ratio of two things measured in the same run, so it holds on the machine that ran it; the
machine is written beside it. GPU figures come from `bash bench/gpu_check.sh`: the tables it printed on lent
GPU machines are kept in bench/gpu/ and copied into RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from bench.report import headline  # noqa: E402

# label, script and arguments, what the issue asked for
RUNS: list[tuple[str, list[str], str]] = [
    ("finetune_step", ["finetune_step.py", "--model", "ballad-tiny", "--classes", "fashion-mnist"], "> 1"),
    ("finetune_step_c100", ["finetune_step.py", "--model", "ballad-tiny", "--classes", "cifar100"], "> 1"),
    ("extract", ["extract.py", "--model", "ballad-tiny", "--images", "2048", "--image-size", "64"], ">= 0.9"),
    ("phase_b", ["phase_b.py", "--model", "ballad-tiny"], "> 1"),
    ("predict", ["predict.py", "--model", "ballad-tiny", "--images", "2048", "--image-size", "64"], ">= 0.9"),
    ("adapter", ["adapter.py", "--scale", "1.0", "--epochs", "10", "--bf16-scale", "0.01"], ">= 0.5; bf16 >= 1.8x"),
    ("sweep", ["sweep.py", "--scale", "0.02", "--epochs", "1"], ">= 3 (GPU)"),
    ("knn", ["knn.py", "--scale", "0.05", "--queries", "2000"], "same predictions"),
    ("cache_read", ["cache_read.py", "--rows", "131072", "--dim", "512"], "near 1"),
]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", default="", help="comma-separated labels to run (default: all)")
    p.add_argument("--results", default=str(HERE / "RESULTS.md"))
    p.add_argument("--sections-only", action="store_true", help="keep RESULTS.md's CPU table, refresh the rest")
    a = p.parse_args()
    if a.sections_only:
        kept = Path(a.results).read_text().split("\n## GPU", 1)[0].splitlines()
        cpu = [line for line in kept if line.startswith("| ") and not line.startswith("| figure")]
        machine = next((line.split("machine: ", 1)[1].rstrip(".") for line in kept if "machine: " in line), "")
        rows = [(*(c.strip(" `") for c in line.strip("|").split(" | ")), machine) for line in cpu]
        write_results(Path(a.results), [r for r in rows if len(r) == 5])  # type: ignore[misc]
        print(f"wrote {a.results}")
        return
    only = set(filter(None, a.only.split(",")))
    out = Path(tempfile.mkdtemp(prefix="ballad-bench-out-"))
    env = {**os.environ, "BALLAD_BENCH_OUT": str(out), "TRANSFORMERS_VERBOSITY": "error"}
    rows = []
    for label, args, target in RUNS:
        if only and label not in only:
            continue
        cmd = [sys.executable, str(HERE / args[0]), *args[1:], "--label", label]
        shown = "python bench/" + " ".join(args)
        print(f"== {shown}", flush=True)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stdout[-2000:], done.stderr[-2000:], sep="\n")
            rows.append((label, shown, f"FAILED (exit {done.returncode})", target, ""))
            continue
        record = json.loads((out / f"{label}.json").read_text())
        figure, value = headline(record)
        rows.append((figure, shown, value, target, record["machine"]))
        print(f"   {value}", flush=True)
    write_results(Path(a.results), rows)
    print(f"wrote {a.results}")


# tables written by the longer benches (minutes each on 2 cores), run on their own and kept beside this file
SECTIONS = [
    ("fidelity.md", "Phase-B augmentation: cached views against fresh views at every step"),
    ("heads.md", "Beyond BALLAD on the same cache: losses, heads, prompt ensembles"),
    ("lite.md", "ballad-tiny against ballad-lite through the demo recipe"),
    ("fp16_official.md", "Phase A in the official fp16 weights against fp32 weights"),
    ("memory_heads.md", "Heads that remember at ImageNet-LT's shape: search and fits against BALLAD's phase B"),
    ("extract_views.md", "Extraction with K views: a decode per row, per image, and views made on the device"),
    ("demo_extract.md", "The demo's extraction step before and after decode-once"),
    ("fidelity_device.md", "Views made on the device against the worker path's, through phase B"),
]


def section_lines() -> list[str]:
    """The kept tables of the longer benches, each under its heading."""
    lines: list[str] = []
    for name, title in SECTIONS:
        if (HERE / name).exists():
            lines += ["", f"## {title}", "", (HERE / name).read_text().strip()]
    return lines


def write_results(path: Path, rows: list[tuple[str, str, str, str, str]]) -> None:
    """RESULTS.md: the CPU table from this run, then the GPU table or a note that it is pending."""
    machines = sorted({r[4] for r in rows if r[4]})
    lines = [
        "# Benchmark results",
        "",
        "Written by `python bench/run_all.py`. Every figure is a ratio of two measurements taken in the same run.",
        f"Run on {datetime.date.today().isoformat()}; machine: {'; '.join(machines) or 'unknown'}.",
        "",
        "| figure | command | result | target |",
        "|---|---|---|---|",
        *[f"| {f} | `{c}` | {v} | {t} |" for f, c, v, t, _ in rows],
        "",
        "## GPU",
        "",
    ]
    consoles = sorted((HERE / "gpu").glob("*-console.txt"))
    if consoles:
        lines += [(HERE / "gpu" / "NOTES.md").read_text().strip(), ""]
        for console in consoles:
            text = console.read_text().splitlines()
            start = next((i for i, line in enumerate(text) if line.startswith("machine:")), 0)
            table = [line for line in text[start:] if not line.startswith("rc=")]
            lines += [f"`{console.relative_to(HERE.parent)}`:", "", "```", *table, "```", ""]
    else:
        lines += [
            "Pending: no GPU machine has run `bash bench/gpu_check.sh` yet. It runs every figure above at GPU size",
            "(ViT-B-16 extraction fp32/bf16, ViT-B-16 phase-A step with 1000 ImageNet prompts, fit-adapter and the",
            "16-point sweep on the full ImageNet-LT-shaped cache, ViT-B-32 phase B, faiss kNN) in about 4 minutes.",
            "To run it: `bash bench/fetch_wheels.sh` here, carry `bench/wheels/` with the repository, then",
            "`bash bench/gpu_check.sh --out bench/gpu/RUN` on the GPU machine; keep its printed table as",
            "`bench/gpu/N-CARD-console.txt` and rerun `python bench/run_all.py`.",
        ]
    lines += section_lines()
    notes = HERE / "NOTES.md"
    if notes.exists():
        lines += ["", notes.read_text().strip()]
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
