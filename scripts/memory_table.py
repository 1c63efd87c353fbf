"""Print the memory table of docs/performance.md: estimated GB per GPU of an SFTMix step (bf16) for the paper's
models on one node.

    python scripts/memory_table.py [--gpus 8] [--tokens 4096]

Estimates come from train.memory_per_gpu (its docstring has the formula); tests/test_memory.py
checks it against the peak of live tensor bytes of train.py's step measured on the CPU, and its
activations against what autograd keeps.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelArgs  # noqa: E402
from train import memory_per_gpu  # noqa: E402

# dimensions from each model's published config.json; Mistral-7B (v0.1) has Llama-3.1-8B's but
# for its vocabulary
LLAMA_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
)
MODELS = {
    "Llama-3.1-8B": ModelArgs(**LLAMA_8B, vocab_size=128256),
    "Mistral-7B": ModelArgs(**LLAMA_8B, vocab_size=32000),
    "Qwen-2.5-14B": ModelArgs(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=48,
        num_attention_heads=40,
        num_key_value_heads=8,
        head_dim=128,
        vocab_size=152064,
    ),
}
PHASES = {
    "head": "LM head's backward",
    "top": "block L-1's backward",
    "bottom": "block 0's backward",
    "last unit": "embedding's backward",
    "load": "loading",
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument(
        "--tokens", type=int, default=4096, help="tokens per GPU per micro-batch (one packed row)"
    )
    args = p.parse_args()
    for flag in ("gpus", "tokens"):
        if getattr(args, flag) < 1:
            print(f"error: --{flag}: expected >= 1, got {getattr(args, flag)}", file=sys.stderr)
            sys.exit(2)
    print(
        f"| model | params | sharding | act. ckpt | weights | grads | optimizer | FSDP buffers / DDP bf16 copies "
        f"| activations | LM head | load | peak (GB/GPU, {args.gpus} GPUs, {args.tokens} tokens) | at |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, m in MODELS.items():
        for shard in ("ddp", "fsdp"):
            for ac in (False, True):
                r = memory_per_gpu(m, args.gpus, shard, ac, args.tokens)
                gb = {
                    k: f"{r[k] / 1e9:.1f}"
                    for k in (
                        "weights",
                        "grads",
                        "optimizer",
                        "buffers",
                        "activations",
                        "head",
                        "load",
                        "total",
                    )
                }
                print(
                    f"| {name} | {r['parameters'] / 1e9:.2f}B | {shard} | {'yes' if ac else 'no'} | {gb['weights']} "
                    f"| {gb['grads']} | {gb['optimizer']} | {gb['buffers']} | {gb['activations']} | {gb['head']} "
                    f"| {gb['load']} | **{gb['total']}** | {PHASES[r['at']]} |"
                )


if __name__ == "__main__":
    main()
