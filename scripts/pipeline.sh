#!/usr/bin/env bash
# SFTMix end to end: reference NTP run with training dynamics -> confidence split -> SFTMix training,
# and an NTP baseline beside it for comparison.
#
#   scripts/pipeline.sh MODEL DATA OUT [train.py flags for every stage, e.g. --lr 2e-6 --max-len 2048]
#
# MODEL is an HF directory or a run directory (its final/ is used). Environment: PYTHON (default python)
# runs every step; NPROC=8 launches each training stage with torchrun on 8 processes (default 1: plain
# python); EPOCHS=3 sets the final runs' epochs (the reference run is always 1 epoch, as in the paper);
# DYNAMICS=4 sets the checkpoints of the training dynamics. With EPOCHS=1 the reference run *is* the NTP
# baseline (same data order, same schedule; the dynamics pass changes nothing), so it is not trained twice.
#
# Run it again to continue: a finished stage (final/ written, no state/ left) is skipped, and an interrupted
# training stage continues from its state/ (train.py --resume). A finished run deletes its state/ unless
# --keep-state is among the flags. OUT/pipeline.args holds MODEL, DATA with its checksum, EPOCHS, DYNAMICS
# and the flags: run again with other ones, it stops (remove OUT or choose another).
#
# Writes OUT/reference/ (dynamics.jsonl, final/), OUT/split.json, OUT/sftmix/final/, OUT/ntp/final/, and
# OUT/times.tsv (stage, seconds, done or skipped) for this invocation.
set -euo pipefail
[ $# -ge 3 ] || { echo "usage: $0 MODEL DATA OUT [train.py flags]" >&2; exit 2; }
model=$1 data=$2 out=$3
shift 3
cd "$(dirname "$0")/.."
py=${PYTHON:-python}
if [ "${NPROC:-1}" -gt 1 ]; then launch=("$py" -m torch.distributed.run --nproc_per_node="$NPROC"); else launch=("$py"); fi
epochs=${EPOCHS:-1} dynamics=${DYNAMICS:-4}
[ -f "$data" ] || { echo "error: $data: not found (DATA: a training data file)" >&2; exit 2; }

mkdir -p "$out"
args=$(printf '%s\n' "MODEL $model" "DATA $data $(cksum < "$data")" "EPOCHS $epochs" "DYNAMICS $dynamics" "flags $*")
if [ -f "$out/pipeline.args" ] && [ "$(cat "$out/pipeline.args")" != "$args" ]; then
    echo "error: $out/pipeline.args: $out holds a pipeline run with other settings; remove $out or choose another OUT" >&2
    diff <(cat "$out/pipeline.args") <(echo "$args") | sed 's/^/  /' >&2 || true
    exit 2
fi
echo "$args" > "$out/pipeline.args"
: > "$out/times.tsv"

# stage NAME DONE COMMAND...: run COMMAND unless the function DONE says the stage is done; record the time.
stage() {
    local name=$1 is_done=$2 start=$SECONDS
    shift 2
    if "$is_done"; then
        echo "== $name: done before, skipped"
        printf '%s\t0\tskipped\n' "$name" >> "$out/times.tsv"
        return
    fi
    echo "== $name"
    "$@"
    printf '%s\t%s\tdone\n' "$name" $((SECONDS - start)) >> "$out/times.tsv"
}
finished() { [ -f "$1/final/config.json" ] && [ ! -e "$1/state/latest.json" ]; }
reference_done() { finished "$out/reference"; }
split_done() { [ "$out/split.json" -nt "$out/reference/dynamics.jsonl" ]; }
sftmix_done() { finished "$out/sftmix" && [ "$out/sftmix/final/config.json" -nt "$out/split.json" ]; }
ntp_done() { finished "$out/ntp"; }

stage "reference NTP run, perplexities at $dynamics checkpoints" reference_done \
    "${launch[@]}" train.py --mode ntp --model "$model" --data "$data" --out "$out/reference" --epochs 1 \
    --dynamics "$dynamics" --resume "$@"
stage "confidence split" split_done \
    "$py" sftmix.py split --dynamics "$out/reference/dynamics.jsonl" --out "$out/split.json"
stage "SFTMix from the base model" sftmix_done \
    "${launch[@]}" train.py --mode sftmix --split "$out/split.json" --model "$model" --data "$data" \
    --out "$out/sftmix" --epochs "$epochs" --resume "$@"
if [ "$epochs" = 1 ]; then
    ln -sfn reference "$out/ntp"
    echo "== NTP baseline: the reference run ($out/ntp -> reference)"
else
    stage "NTP baseline from the base model" ntp_done \
        "${launch[@]}" train.py --mode ntp --model "$model" --data "$data" --out "$out/ntp" --epochs "$epochs" \
        --resume "$@"
fi
