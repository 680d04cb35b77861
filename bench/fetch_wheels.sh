#!/usr/bin/env bash
# Download, into bench/wheels, the wheels bench/gpu_check.sh needs on a machine that has only PyTorch, h5py and
# numpy and no network: open_clip and its pure dependencies, safetensors, pyyaml, faiss-cpu, at the versions
# installed in .venv. Carry the folder to the GPU machine with the repository.
#
#   bash bench/fetch_wheels.sh                  # wheels for this machine's Python
#   PYVER=3.12 bash bench/fetch_wheels.sh       # for another CPython (binary wheels for manylinux x86_64)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DEST=bench/wheels
mkdir -p "$DEST"
# the dependency closure of what gpu_check imports, minus what the GPU machine already has
PINS=$("$PY" - <<'PYEOF'
import re
from importlib import metadata

skip = {"torch", "torchvision", "numpy", "h5py", "triton", "setuptools", "sympy", "networkx",
        "jinja2", "markupsafe", "mpmath"}
todo, seen = ["open_clip_torch", "safetensors", "pyyaml", "faiss-cpu", "pillow"], {}
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name in seen or name in skip or name.startswith("nvidia-") or name.startswith("cuda-"):
        continue
    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        continue
    seen[name] = dist.version
    for req in dist.requires or []:
        if "extra ==" in req:
            continue
        todo.append(re.split(r"[ ;<>=!~\[(]", req, maxsplit=1)[0])
print(" ".join(f"{n}=={v}" for n, v in sorted(seen.items())))
PYEOF
)
EXTRA=()
if [ -n "${PYVER:-}" ]; then
  EXTRA=(--python-version "$PYVER" --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --only-binary=:all:)
fi
echo "fetching: $PINS"
# shellcheck disable=SC2086
"$PY" -m pip download -q --no-deps -d "$DEST" "${EXTRA[@]}" $PINS
# torchvision matched to this torch, installed there only if the GPU machine lacks it
TV=$("$PY" -c "from importlib.metadata import version; print(version('torchvision'))")
"$PY" -m pip download -q --no-deps -d "$DEST" "${EXTRA[@]}" "torchvision==${TV%%+*}"
du -sh "$DEST"
