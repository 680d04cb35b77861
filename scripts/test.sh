#!/usr/bin/env bash
# Set up (if needed) and run the test suite; tests make their own data, no GPU or network needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
.venv/bin/python -m mypy
.venv/bin/python -m pytest tests -q --durations=15
