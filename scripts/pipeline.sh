#!/usr/bin/env bash
# SFTMix end to end: reference NTP run with training dynamics -> confidence split -> SFTMix training,
# and an NTP baseline beside it for comparison.
#
#   scripts/pipeline.sh MODEL DATA OUT [train.py flags for every stage, e.g. --lr 2e-6 --max-len 2048]
#
# Environment: PYTHON (default python) runs every step; NPROC=8 launches each training stage with torchrun on 8 processes (default 1: plain python);
# EPOCHS=3 sets the final runs' epochs (the reference run is always 1 epoch, as in the paper); DYNAMICS=4
# sets the checkpoints of the training dynamics. With EPOCHS=1 the reference run *is* the NTP baseline
# (same data order, same schedule; the dynamics pass changes nothing), so it is not trained twice.
#
# Writes OUT/reference/ (dynamics.jsonl, final/), OUT/split.json, OUT/sftmix/final/, OUT/ntp/final/.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 MODEL DATA OUT [train.py flags]" >&2; exit 2; }
model=$1 data=$2 out=$3
shift 3
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
if [ "${NPROC:-1}" -gt 1 ]; then launch=("$py" -m torch.distributed.run --nproc_per_node="$NPROC"); else launch=("$py"); fi
epochs=${EPOCHS:-1}

echo "== stage 1: reference NTP run, perplexities at ${DYNAMICS:-4} checkpoints"
"${launch[@]}" train.py --mode ntp --model "$model" --data "$data" --out "$out/reference" --epochs 1 \
    --dynamics "${DYNAMICS:-4}" "$@"
echo "== stage 2: confidence split"
"$py" sftmix.py split --dynamics "$out/reference/dynamics.jsonl" --out "$out/split.json"
echo "== stage 3: SFTMix from the base model"
"${launch[@]}" train.py --mode sftmix --split "$out/split.json" --model "$model" --data "$data" \
    --out "$out/sftmix" --epochs "$epochs" "$@"
if [ "$epochs" = 1 ]; then
    ln -sfn reference "$out/ntp"
    echo "== NTP baseline: the reference run ($out/ntp -> reference)"
else
    echo "== NTP baseline from the base model"
    "${launch[@]}" train.py --mode ntp --model "$model" --data "$data" --out "$out/ntp" --epochs "$epochs" "$@"
fi
