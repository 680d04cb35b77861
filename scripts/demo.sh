#!/usr/bin/env bash
# Set up from nothing and run the whole BALLAD pipeline on Fashion-MNIST-LT with ballad-lite (offline, CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -d /usr/share/datasets/fashion-mnist ] && [ -z "${BALLAD_DATA:-}" ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get install -y -q dataset-fashion-mnist
fi
bash scripts/setup.sh
.venv/bin/ballad data info --data fmnist-lt
.venv/bin/ballad demo --out "${1:-ballad-demo}"
