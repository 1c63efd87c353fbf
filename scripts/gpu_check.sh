#!/usr/bin/env bash
# The GPU figures of docs/performance.md in one command, under 10 minutes on one H100 or H200:
# scripts/bench_gpu.py's train-step table (2 and 8 samples a step; train.py eager and --compile
# against transformers + TRL padding-free, eager sdpa and as TRL advises), then its generation rows
# (8 and 32 prompts x 256 new tokens; eval.py generate eager and --compile against transformers'
# generate with its static cache, compiled). Each part runs under its own time limit, so one that
# overruns leaves the other's table. Everything it prints is also written to $LOG.
#
#   scripts/gpu_check.sh
#
# It reads the tokenizer and the ShareGPT rows of the GPU bench, made on a machine with a network by
#   python scripts/get_sharegpt.py --out .assets/sharegpt-gpu --train 256 --heldout 0 --seed 0 --max-chars 8000
# from ASSETS (default .assets): ASSETS/SmolLM2-135M-Instruct (its tokenizer files alone will do) and
# ASSETS/sharegpt-gpu/train.jsonl. For a GPU machine with no network, copy those into a folder that
# travels with the checkout and set ASSETS to it. PYTHON (default python3) needs torch with CUDA,
# transformers and trl; when trl does not import and a folder .whl/ holds wheels (trl's, carried),
# they are installed into /tmp/gpu_check_site first. A missing file is one line and exit 2.
set -euo pipefail
cd "$(dirname "$0")/.."
ASSETS=${ASSETS:-.assets}
PYTHON=${PYTHON:-python3}
LOG=${LOG:-${OUT:-/tmp}/gpu_check.log}
TOKENIZER=$ASSETS/SmolLM2-135M-Instruct
DATA=$ASSETS/sharegpt-gpu/train.jsonl
for f in "$TOKENIZER/tokenizer.json" "$DATA"; do
    if [ ! -f "$f" ]; then
        echo "error: $f: not found; set ASSETS to the folder that holds SmolLM2-135M-Instruct/ and" \
             "sharegpt-gpu/train.jsonl (see this script's header)" >&2
        exit 2
    fi
done
if ! "$PYTHON" -c "import trl" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/gpu_check_site .whl/*.whl
    export PYTHONPATH=/tmp/gpu_check_site${PYTHONPATH:+:$PYTHONPATH}
fi
if [ "${GPU_CHECK_CPU:-0}" = 1 ]; then  # a smoke run of this script on the CPU: a tiny shape, little work
    SIZE=(--shape tiny --max-len 64 --batch 2 --warmup 1 --steps 1)
    GEN=(--gen-prompts 2 --new-tokens 4 --gen-repeats 1)
else
    "$PYTHON" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    # SmolLM2-1.7B's shape (the figures of docs/performance.md) needs about 110 GB: three models with
    # their fp32 AdamW state, and activations; on a smaller GPU (an H100's 80 GB), Llama 3.2 1B's
    GIB=$("$PYTHON" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)")
    SHAPE=smollm2-1.7b
    if [ "$GIB" -lt 120 ]; then SHAPE=llama-3.2-1b; fi
    echo "GPU memory ${GIB} GiB: --shape $SHAPE"
    SIZE=(--shape "$SHAPE" --batch 2 8 --warmup 3 --steps 10)
    GEN=(--gen-prompts 8 32 --new-tokens 256 --gen-repeats 3)
fi
export PYTHONUNBUFFERED=1
: > "$LOG"
status=0
timeout 330 "$PYTHON" scripts/bench_gpu.py --tokenizer "$TOKENIZER" --data "$DATA" "${SIZE[@]}" \
    --gen-prompts 2>&1 | tee -a "$LOG" || status=$?
timeout 240 "$PYTHON" scripts/bench_gpu.py --tokenizer "$TOKENIZER" --data "$DATA" "${SIZE[@]}" \
    --no-train "${GEN[@]}" 2>&1 | tee -a "$LOG" || status=$?
echo "wrote $LOG"
exit $status
