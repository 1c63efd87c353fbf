"""Print the README's memory table: estimated GB per GPU for the paper's models on one 8-GPU node.

    python scripts/memory_table.py [--gpus 8] [--tokens 4096]

Estimates come from memory_per_gpu below (its docstring has the formula; tests/test_fsdp.py checks it
against the model's parameter count and the tensors autograd actually saves).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from model import ModelArgs  # noqa: E402

MODELS = {  # dimensions from each model's published config.json
    "Llama-3.1-8B": ModelArgs(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                              num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "Mistral-7B": ModelArgs(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=8, head_dim=128, vocab_size=32000),  # v0.1
    "Qwen-2.5-14B": ModelArgs(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                              num_key_value_heads=8, head_dim=128, vocab_size=152064),
}


def memory_per_gpu(m, gpus, shard, activation_checkpointing, tokens_per_gpu):
    """Estimated bytes per GPU of one bf16 AdamW training step, by part, for ModelArgs m.

    P parameters (P_b in one block). Weights and optimizer state are fp32: weights 4P, gradients 4P,
    AdamW moments 8P. DDP adds autocast's bf16 weight copies, kept for the backward (2P). FSDP divides
    the fp32 parts by the number of GPUs and adds the bf16 copies of the blocks gathered at a time
    (2: the one computing and the one prefetched): weights 2 * 2 P_b, grads 2 * 2 P_b.
    Activations saved per token and block (bf16, from the tensors the backward keeps):
        a = 2 (4D + 4 + 2D)              two RMSNorms: fp32 input, fp32 1/rms, bf16 output
          + 2 (2 H hd + 2 K hd) + 4 H    q, k, v after RoPE and the attention output; its fp32 logsumexp
          + 3 (2 I)                      gate, up, silu(gate) * up
    Without checkpointing: tokens * L * a. With it: each block's bf16 input, 2D per token and block, plus one
    block recomputed at a time: tokens * (2D L + a). Logits: tokens * V * 10 (bf16 logits, fp32 copy, fp32 grad).
    """
    D, I, L, H, K, hd, V = (m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.num_attention_heads,
                            m.num_key_value_heads, m.head_dim, m.vocab_size)
    P_b = D * (H + 2 * K) * hd + H * hd * D + 3 * D * I + 2 * D  # attention, MLP, two norms (no biases)
    P = L * P_b + V * D * (1 if m.tie_word_embeddings else 2) + D
    a = 2 * (4 * D + 4 + 2 * D) + 2 * (2 * H * hd + 2 * K * hd) + 4 * H + 3 * 2 * I
    activations = tokens_per_gpu * ((2 * D * L + a) if activation_checkpointing else L * a) + tokens_per_gpu * V * 10
    n = gpus if shard == "fsdp" else 1
    gathered = 2 * 2 * P_b if shard == "fsdp" else 0
    parts = {"parameters": P, "weights": 4 * P / n + (gathered if shard == "fsdp" else 2 * P),
             "grads": 4 * P / n + gathered,
             "optimizer": 8 * P / n, "activations": activations}
    parts["total"] = parts["weights"] + parts["grads"] + parts["optimizer"] + activations
    return parts


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
