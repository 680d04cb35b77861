#!/usr/bin/env bash
# One prepared performance check for a GPU machine (about 4 minutes on one H100): extraction img/s for ViT-B-16
# (random weights, synthetic JPEGs) in fp32 and bf16 with decode vs encode rates, K = 16 views per 500x375 JPEG
# before/after decode-once, --draft and --augment-on device (bf16), phase-A step img/s, phase A's methods (full,
# lora, adaptformer: step time, MFU, memory), fit-adapter
# and a 16-point sweep on the ImageNet-LT-shaped synthetic cache, phase B on the cache vs the encoder every step,
# and faiss kNN if it imports. Prints a table and writes one JSON per figure plus summary.json.
#
#   bash bench/gpu_check.sh [--cpu-smoke] [--wheels DIR] [--out DIR]
#
# The machine needs PyTorch, h5py and numpy; nothing else and no network: open_clip and the other pure
# dependencies are installed from DIR (default bench/wheels, filled by `bash bench/fetch_wheels.sh`).
# --cpu-smoke runs the very same steps at a tiny size on CPU (CI runs it).
set -euo pipefail
cd "$(dirname "$0")/.."
SMOKE=0
WHEELS=bench/wheels
OUTDIR=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu-smoke) SMOKE=1 ;;
    --wheels) WHEELS=$2; shift ;;
    --out) OUTDIR=$2; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if [ -z "$OUTDIR" ]; then
  OUTDIR=bench/out/$( [ $SMOKE = 1 ] && echo cpu-smoke || echo gpu )
fi
mkdir -p "$OUTDIR"
rm -f "$OUTDIR"/*.json "$OUTDIR"/failures.txt
export BALLAD_BENCH_OUT=$OUTDIR PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} TRANSFORMERS_VERBOSITY=error

if ! "$PY" -c "import torchvision" 2>/dev/null && [ -d "$WHEELS" ]; then
  "$PY" -m pip install -q --no-index --no-deps --find-links "$WHEELS" torchvision pillow
fi
if ! "$PY" -c "import open_clip, safetensors, yaml" 2>/dev/null; then
  if [ ! -d "$WHEELS" ]; then
    echo "gpu_check: open_clip is not installed and there is no wheel folder $WHEELS;" \
         "fill it with 'bash bench/fetch_wheels.sh' where the package registry is reachable" >&2
    exit 1
  fi
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" open_clip_torch safetensors pyyaml
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" faiss-cpu 2>/dev/null || echo "gpu_check: no faiss wheel; kNN skipped"
fi

if [ $SMOKE = 1 ]; then
  DEV=cpu
  EXTRACT="--model ballad-micro --images 96 --image-size 32 --batch 32 --repeats 1 --memory-rows 2048"
  VIEWS="--model ballad-micro --images 8 --views 2 --batch 16"
  STEP="--model ballad-micro --classes cifar100 --batch 8 --steps 2"
  ADAPTER="--scale 0.01 --epochs 1"
  SWEEP="--scale 0.01 --epochs 1"
  PHASEB="--model ballad-micro --classes 10 --images-per-head 30 --image-size 32 --batch 32"
  PREDICT="--model ballad-micro --images 96 --image-size 32 --batch 32 --repeats 1"
  KNN="--scale 0.01 --queries 200"
  METHODS="--model ballad-micro --batch 8 --steps 2 --methods full,lora,adaptformer"
  LIMIT=120
else
  DEV=cuda
  EXTRACT="--model ViT-B-16 --images 4096 --image-size 256 --batch 256 --repeats 3 --memory-rows 16384 --profile"
  VIEWS="--model ViT-B-16 --images 512 --views 16 --batch 256 --precision bf16"
  STEP="--model ViT-B-16 --classes imagenet --batch 128 --steps 5"
  ADAPTER="--scale 1.0 --epochs 10"
  SWEEP="--scale 1.0 --epochs 1"
  PHASEB="--model ViT-B-32 --classes 100 --images-per-head 100 --imbalance 10 --image-size 256 --batch 256"
  PREDICT="--model ViT-B-16 --images 4096 --image-size 256 --batch 256 --repeats 3 --precision bf16"
  KNN="--scale 1.0 --queries 20000"
  METHODS="--model ViT-B-16 --classes 1000 --batch 128 --steps 5 --precision bf16 --methods full,lora,adaptformer --peak-tflops 989"
  LIMIT=150
fi
JPEGS=$(mktemp -d)
trap 'rm -rf "$JPEGS"' EXIT

step() {  # step NAME SCRIPT ARGS...: run one bench, note a failure and go on to the next
  local name=$1; shift
  echo "== $name: $*"
  if ! timeout "$LIMIT" "$PY" "$@" > "$OUTDIR/$name.log" 2>&1; then
    echo "$name failed (exit $?); last lines of $OUTDIR/$name.log:" | tee -a "$OUTDIR/failures.txt"
    tail -5 "$OUTDIR/$name.log" | tee -a "$OUTDIR/failures.txt"
  fi
}

"$PY" -c "import torch; print('torch', torch.__version__, '| cuda', torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
# shellcheck disable=SC2086  # the size strings are word lists on purpose
{
  step extract_fp32 bench/extract.py $EXTRACT --device $DEV --precision fp32 --jpeg-dir "$JPEGS" --label extract_fp32
  step extract_bf16 bench/extract.py $EXTRACT --device $DEV --precision bf16 --jpeg-dir "$JPEGS" --label extract_bf16
  step extract_views bench/extract_views.py $VIEWS --device $DEV --md "$OUTDIR/extract_views.md" --label extract_views
  step finetune_step_fp32 bench/finetune_step.py $STEP --device $DEV --precision fp32 --label finetune_step_fp32
  step finetune_step_bf16 bench/finetune_step.py $STEP --device $DEV --precision bf16 --label finetune_step_bf16
  step adapter bench/adapter.py $ADAPTER --device $DEV --label adapter
  step sweep bench/sweep.py $SWEEP --device $DEV --label sweep
  step phase_b bench/phase_b.py $PHASEB --device $DEV --label phase_b
  step predict bench/predict.py $PREDICT --device $DEV --label predict
  step phase_a_methods bench/phase_a_methods.py cost $METHODS --device $DEV --label phase_a_methods
  if "$PY" -c "import faiss" 2>/dev/null; then
    step knn bench/knn.py $KNN --device $DEV --label knn
  else
    echo "== knn: faiss does not import here; skipped"
  fi
}
echo
"$PY" bench/report.py "$OUTDIR"
if [ -s "$OUTDIR/failures.txt" ]; then
  echo "gpu_check: some steps failed, see $OUTDIR/failures.txt" >&2
  exit 1
fi
