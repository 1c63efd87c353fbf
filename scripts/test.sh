#!/usr/bin/env bash
# The tests in one command, on a fresh machine as on a set-up one (CI runs it through .ci/run):
#
#   bash scripts/test.sh [pytest flags, e.g. -x -k "not fsdp"]
#
# Makes .venv if it is absent or out of date and installs requirements-dev.txt and requirements-assets.txt
# into it (scripts/venv.sh), then runs `python -m pytest tests -q` with the flags given.
# Afterwards `. .venv/bin/activate` gives the same environment in your shell.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/venv.sh
python -m pytest tests -q "$@"
