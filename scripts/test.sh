#!/usr/bin/env bash
# The README's test command: install the runtime and the test references (torch CPU,
# scikit-learn, pytest, pytest-xdist, ruff) and run the fast tests. Extra arguments go to pytest, e.g.
# `bash scripts/test.sh -m slow` for the real-model tests (CI runs both). The tests run on every
# core (pytest-xdist), a test module per worker so its fixtures are built once; PYTEST_WORKERS
# overrides the count (e.g. 0: one process, in order).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test
set +e
.venv/bin/python -m pytest -n "${PYTEST_WORKERS:-auto}" --dist loadscope "$@"
status=$?
# pytest exits 5 when it collected no tests: that is a failure of the suite, not a pass.
[ $status -eq 5 ] && echo "pytest collected no tests" >&2
exit $status
