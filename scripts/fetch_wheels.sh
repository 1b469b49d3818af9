#!/usr/bin/env bash
# Downloads the wheels scripts/device_check.sh installs on a bare accelerator machine (no
# network there): the pure packages the project imports beyond JAX, flax, optax,
# orbax-checkpoint, absl-py, transformers, tokenizers and numpy. The list is
# benchmarks/device_check.py's CARRIED_WHEELS; each wheel is fetched without its dependencies
# (those are on the bare machine, or, like gguf's `requests`, imported only to download).
#
#   scripts/fetch_wheels.sh                 # Python 3.12, manylinux x86_64, into wheels/
#   scripts/fetch_wheels.sh 3.11 /tmp/w311  # another Python version / folder
#
# Carry the folder with the working tree (it is git-ignored): about 0.35 MB.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYVER=${1:-3.12}
DEST=${2:-$ROOT/wheels}
PY=${PYTHON:-$ROOT/.venv/bin/python}
[ -x "$PY" ] || PY=python3
REQS=$("$PY" "$ROOT/benchmarks/device_check.py" --list_wheels)
ABI="cp${PYVER/./}"
# shellcheck disable=SC2086  # REQS is a space-separated list of requirements
"$PY" -m pip download --dest "$DEST" --no-deps --only-binary=:all: \
  --python-version "$PYVER" --implementation cp --abi "$ABI" --abi abi3 --abi none \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --platform any \
  $REQS
echo "wheels for Python $PYVER in $DEST:"
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
