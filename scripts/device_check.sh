#!/usr/bin/env bash
# One prepared device check for a bare accelerator machine (benchmarks/device_check.py).
#
#   scripts/device_check.sh OUT_DIR [--preset=tiny] [more device_check.py flags]
#
# Installs the carried modules this Python lacks from wheels/ (scripts/fetch_wheels.sh; no
# index is ever asked) into the git-ignored .device_site/ (the machine's own environment is
# not touched; without a working pip the wheels are unzipped there), then runs the check: OUT_DIR/device_check.json (rewritten after every stage),
# OUT_DIR/device_check.txt (summary), OUT_DIR/device_check.log (everything printed).
# PYTHON picks the interpreter (default python3). On the H200 it is made to end within 9
# minutes (--budget_s=480 for the PAS stages; the subjects shrink to fit).
set -uo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
  echo "usage: $0 OUT_DIR [device_check.py flags]" >&2
  exit 2
fi
OUT=$1
shift
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SITE="$ROOT/.device_site"
mkdir -p "$OUT"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
MISSING=$("$PY" "$ROOT/benchmarks/device_check.py" --missing_wheels)
if [ -n "$MISSING" ]; then
  echo "[device_check.sh] installing from $ROOT/wheels into $SITE: $MISSING"
  # shellcheck disable=SC2086  # MISSING is a space-separated list of requirements
  "$PY" -m pip install --no-index --no-deps --find-links "$ROOT/wheels" --target "$SITE" \
    $MISSING > "$OUT/pip_install.log" 2>&1 \
    || "$PY" "$ROOT/benchmarks/device_check.py" --unpack_wheels="$ROOT/wheels" --site="$SITE" \
    || echo "[device_check.sh] could not install $MISSING (see $OUT/pip_install.log); running anyway"
fi
"$PY" "$ROOT/benchmarks/device_check.py" --out_dir="$OUT" "$@" 2>&1 | tee "$OUT/device_check.log"
exit "${PIPESTATUS[0]}"
