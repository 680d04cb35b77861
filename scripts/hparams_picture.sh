#!/usr/bin/env bash
# The README's picture of TensorBoard's HParams view of the demo sweep: report the demo's finished sweep to
# TensorBoard (its points are all done, so nothing is trained again), serve the events locally and take a
# screenshot with headless Chromium (Debian's chromium). Usage: scripts/hparams_picture.sh [DEMO_DIR] [PNG]
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${1:-ballad-demo}
PNG=${2:-docs/watch_hparams.png}
PORT=${PORT:-6123}
.venv/bin/ballad sweep --cache "$DEMO/cache" --out "$DEMO/sweep" --ratio 0.1,0.2,0.4,0.6 --lr 0.05,0.2 \
    --epochs 10 --batch-size 128 --device cpu --report-to tensorboard >/dev/null
.venv/bin/tensorboard --logdir "$DEMO/sweep/tb/points" --port "$PORT" --host 127.0.0.1 >/dev/null 2>&1 &
TB=$!
trap 'kill $TB 2>/dev/null || true' EXIT
for _ in $(seq 60); do curl -sf "http://127.0.0.1:$PORT/" >/dev/null && break; sleep 1; done
chromium --headless --no-sandbox --disable-gpu --disable-background-networking --disable-component-update \
    --no-first-run --hide-scrollbars --window-size=2300,480 --virtual-time-budget=20000 \
    --user-data-dir="$(mktemp -d)" --screenshot="$PNG" "http://127.0.0.1:$PORT/#hparams" 2>/dev/null
echo "wrote $PNG"
