#!/usr/bin/env bash
# Set up (if needed) and run the test suite; tests make their own data, no GPU or network needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the reporting backends' extras (--report-to tensorboard,wandb): their tests read what they wrote back
.venv/bin/python -m pip install -q --no-cache-dir -e ".[demo,dev,tensorboard,wandb]"
.venv/bin/ruff check .
.venv/bin/python -m mypy
.venv/bin/python -m pytest tests -q --durations=15
