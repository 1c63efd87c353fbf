#!/usr/bin/env bash
# SFTMix end to end: reference NTP run with training dynamics -> confidence split -> SFTMix training, and an NTP
# baseline beside it for comparison.
#
#   scripts/pipeline.sh MODEL DATA OUT [train.py flags for every stage, e.g. --lr 2e-6 --max-len 2048]
#
# Environment: PYTHON (default python) runs every step; NPROC, EPOCHS, DYNAMICS. Run it again to continue. What it
# runs, skips, resumes and writes: scripts/pipeline.py (its stages are scripts/stages.py's, as scripts/study.py's).
set -euo pipefail
exec "${PYTHON:-python}" "$(dirname "$0")/pipeline.py" "$@"
