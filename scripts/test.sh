#!/usr/bin/env bash
# The tests in one command, on a fresh machine as on a set-up one (CI runs it through .ci/run):
#
#   bash scripts/test.sh [pytest flags, e.g. -x -k "not fsdp"]
#
# Makes .venv if it is absent or out of date and installs requirements-dev.txt and requirements-assets.txt
# into it (scripts/venv.sh), then runs the tests on WORKERS processes (default 2, one a core here; each test
# file runs whole on one of them, so its module fixtures are built once), each torch on one thread
# (two processes that each use every core slow each other far more than twice). WORKERS=0 runs them in
# this process. Afterwards `. .venv/bin/activate` gives the same environment in your shell.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
python -m pytest tests -q -n "${WORKERS:-2}" --dist loadfile "$@"
