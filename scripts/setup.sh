#!/usr/bin/env bash
# Create .venv with torch/torchvision as a matched pair, then ballad with its demo and dev extras.
# No pip cache: the torch pair is several GB and a cached copy would double it on a small disk.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --no-cache-dir --upgrade pip
.venv/bin/python -m pip install -q --no-cache-dir "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q --no-cache-dir -e ".[demo,dev]"
