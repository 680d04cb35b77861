"""The GPU check script runs end to end at a tiny size on CPU, so its GPU run cannot fail on a typo."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_cpu_smoke_runs_every_step_and_reports(tmp_path, ballad_data):
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(
        ["bash", "bench/gpu_check.sh", "--cpu-smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    records = {r["bench"]: r for r in summary["records"]}
    expected = {"extract_fp32", "extract_bf16", "finetune_step_fp32", "finetune_step_bf16", "adapter", "sweep"}
    assert expected | {"phase_b", "knn", "predict", "extract_views", "phase_a_methods"} == set(records)
    methods = {m["method"]: m for m in records["phase_a_methods"]["records"]}
    assert methods["lora"]["trainable"] < methods["full"]["trainable"] and methods["adaptformer"]["step_s"] > 0
    assert all(v > 0 for v in records["extract_views"]["rows_per_s"].values())
    assert records["predict"]["images_per_s"]["ballad_predict"] > 0
    assert all(records[k]["images_per_s"]["ballad_extract"] > 0 for k in ("extract_fp32", "extract_bf16"))
    assert records["extract_fp32"]["memory"]["growth_4x_rows"] < 2  # memory does not follow the split size
    assert records["finetune_step_fp32"]["context"] == {"ballad": 10, "reference": 32}  # cifar100 prompts trimmed
    assert records["phase_b"]["speedup_per_epoch"] > 1
    assert records["knn"]["same_prediction"] == 1.0
    assert "16-point sweep" in done.stdout and "machine: CPU" in done.stdout
    assert "extraction rows/s at K views" in done.stdout


def test_imagenet_lt_shaped_cache_has_imagenet_lt_size():
    sys.path.insert(0, str(ROOT))
    from bench.common import imagenet_lt_counts

    counts = imagenet_lt_counts()
    assert (len(counts), counts.sum(), counts.max(), counts.min()) == (1000, 115_846, 1280, 5)
    assert (counts[:-1] >= counts[1:]).all()
