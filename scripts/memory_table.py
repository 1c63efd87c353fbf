"""Print the README's memory table: estimated GB per GPU for the paper's models on one 8-GPU node.

    python scripts/memory_table.py [--gpus 8] [--tokens 4096]

Estimates come from train.memory_per_gpu (its docstring has the formula; tests/test_fsdp.py checks it
against the model's parameter count and the tensors autograd actually saves).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelArgs  # noqa: E402
from train import memory_per_gpu  # noqa: E402

MODELS = {  # dimensions from each model's published config.json
    "Llama-3.1-8B": ModelArgs(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "Mistral-7B": ModelArgs(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, vocab_size=32768),
    "Qwen-2.5-14B": ModelArgs(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                              num_key_value_heads=8, head_dim=128, vocab_size=152064),
}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per GPU per micro-batch")
    args = p.parse_args()
    print(f"| model | params | sharding | act. ckpt | weights | grads | optimizer | activations | total (GB/GPU, "
          f"{args.gpus} GPUs, {args.tokens} tokens) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, m in MODELS.items():
        for shard in ("ddp", "fsdp"):
            for ac in (False, True):
                r = memory_per_gpu(m, args.gpus, shard, ac, args.tokens)
                gb = {k: v / 1e9 for k, v in r.items()}
                print(f"| {name} | {r['parameters'] / 1e9:.2f}B | {shard} | {'yes' if ac else 'no'} | {gb['weights']:.1f} | "
                      f"{gb['grads']:.1f} | {gb['optimizer']:.1f} | {gb['activations']:.1f} | **{gb['total']:.1f}** |")


if __name__ == "__main__":
    main()
