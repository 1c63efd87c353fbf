"""The Llama-family decoder-only transformer, HF checkpoint load/save, and KV-cached generation.

Parameter names are those of HF's LlamaForCausalLM (model.layers.N.self_attn.q_proj.weight, ...),
so a safetensors checkpoint maps onto this model one to one, and RoPE uses HF's rotate-half layout,
so no weight permutation is needed. Shapes: B batch, T time, D hidden_size, H heads, K kv heads,
hd head_dim, V vocab_size.
"""
import json
import math
import shutil
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import safe_open
from safetensors.torch import save_file

from data import InputError, atomic_path, write_json


@dataclass
class ModelArgs:
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    vocab_size: int = 49152
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Fill from an HF config.json dict; anything this model would get wrong is an error naming the field."""
        if cfg.get("model_type") not in ("llama", "mistral"):
            raise InputError(f"{source}: model_type: expected \"llama\" or \"mistral\", got {cfg.get('model_type')!r}")
        if cfg.get("sliding_window") is not None:  # Mistral-7B v0.1; later Mistrals attend to everything, as Llama
            raise InputError(f"{source}: sliding_window: expected null (full attention), got {cfg['sliding_window']}")
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size"):
            if key not in cfg:
                raise InputError(f"{source}: {key}: missing")
        if cfg.get("hidden_act", "silu") != "silu":
            raise InputError(f"{source}: hidden_act: expected \"silu\", got {cfg['hidden_act']!r}")
        rope_params = cfg.get("rope_parameters")  # transformers 5 folds rope_theta into rope_parameters
        scaling = cfg.get("rope_scaling") or (rope_params if rope_params and "factor" in rope_params else None)
        if scaling is not None:
            scaling = dict(scaling)
            rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None)
            scaling.pop("type", None)
            if rope_type == "default":
                scaling = None
            elif rope_type != "llama3":
                raise InputError(f"{source}: rope_scaling.rope_type: expected \"llama3\" or none, got {rope_type!r}")
            else:
                for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
                    if key not in scaling:
                        raise InputError(f"{source}: rope_scaling.{key}: missing for rope_type \"llama3\"")
                scaling = {"rope_type": "llama3", **{k: scaling[k] for k in (
                    "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}}
        theta = cfg.get("rope_theta", (rope_params or {}).get("rope_theta", 10000.0))
        names = {f.name for f in fields(cls)} - {"rope_scaling", "rope_theta"}
        args = cls(**{k: cfg[k] for k in names if cfg.get(k) is not None}, rope_theta=theta, rope_scaling=scaling)
        if "num_key_value_heads" not in cfg or cfg["num_key_value_heads"] is None:
            args.num_key_value_heads = args.num_attention_heads
        if "head_dim" not in cfg or cfg["head_dim"] is None:
            args.head_dim = args.hidden_size // args.num_attention_heads
        if args.num_attention_heads % args.num_key_value_heads:
            raise InputError(f"{source}: num_key_value_heads: must divide num_attention_heads")
        return args

    def to_hf_config(self, dtype: torch.dtype) -> dict:
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
               "torch_dtype": str(dtype).removeprefix("torch.")}
        cfg.update({f.name: getattr(self, f.name) for f in fields(self)})
        return cfg


def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/hd), i < hd/2, with Llama 3's long-context rescaling when configured."""
    hd = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64, device=device).float() / hd))
    if args.rope_scaling is None:
        return inv_freq
    s = args.rope_scaling  # llama3: low frequencies divided by factor, high kept, a smooth ramp between
    old_len = s["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / s["low_freq_factor"], inv_freq / s["factor"], inv_freq)
    smooth = (old_len / wavelen - s["low_freq_factor"]) / (s["high_freq_factor"] - s["low_freq_factor"])
    smoothed = (1 - smooth) * scaled / s["factor"] + smooth * scaled
    is_medium = (wavelen >= old_len / s["high_freq_factor"]) & (wavelen <= old_len / s["low_freq_factor"])
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of angle position * inv_freq, duplicated over both halves of head_dim: (B, 1, T, hd) each."""
    inv_freq = rope_inv_freq(args, positions.device)
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2), in fp32 whatever the model dtype
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, hd)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) by their angle: x*cos + rotate_half(x)*sin, HF's layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the normalisation computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Keys and values of every layer for the positions seen so far: (B, K, max_len, hd) per layer."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, args.num_key_value_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(args.num_hidden_layers)]
        self.length = 0  # positions [0, length) are filled

    def update(self, layer: int, k, v):
        """Store k, v (B, K, T, hd) after the filled positions; return all keys and values so far."""
        end = self.length + k.shape[2]
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


class Attention(nn.Module):
    """Grouped-query attention: H query heads share K key/value heads (H % K == 0)."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.args = layer, args
        H, K, hd, D = args.num_attention_heads, args.num_key_value_heads, args.head_dim, args.hidden_size
        self.q_proj = nn.Linear(D, H * hd, bias=args.attention_bias)
        self.k_proj = nn.Linear(D, K * hd, bias=args.attention_bias)
        self.v_proj = nn.Linear(D, K * hd, bias=args.attention_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=args.attention_bias)

    def forward(self, x, cos, sin, mask=None, cache=None):
        B, T, _ = x.shape
        hd = self.args.head_dim
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, K, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, K, S, hd), S = positions so far
        if mask is None:  # training / scoring: plain causal; right padding never reaches a real token
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        else:  # mask (B, 1, T, S), True = may attend
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, I = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(D, I, bias=args.mlp_bias)
        self.up_proj = nn.Linear(D, I, bias=args.mlp_bias)
        self.down_proj = nn.Linear(I, D, bias=args.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.self_attn = Attention(args, layer)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.mlp = MLP(args)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(dict(
            embed_tokens=nn.Embedding(args.vocab_size, args.hidden_size),
            layers=nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers)),
            norm=RMSNorm(args.hidden_size, args.rms_norm_eps),
        ))
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.checkpoint_activations = False  # keep only each block's input; recompute the rest in backward

    def forward(self, input_ids, return_hidden=False, positions=None, mask=None, cache=None, logits_at=None):
        """input_ids (B, T) -> logits (B, T, V); with return_hidden, also the final-norm states (B, T, D).

        logits_at (B, T) bool: apply the LM head only there, returning logits (N, V) for those N positions
        in row-major order (a loss needs only the trained positions). positions (B, T) default to 0..T-1
        (after the cache's filled length); mask (B, 1, T, S) is only needed when rows hold padding before
        real tokens (batched generation).
        """
        B, T = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        cos, sin = rope_cos_sin(self.args, positions, x.dtype)
        for block in self.model.layers:
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, cos, sin, mask, cache, use_reentrant=False)
            else:
                x = block(x, cos, sin, mask, cache)
        if cache is not None:
            cache.length += T
        hidden = self.model.norm(x)  # (B, T, D): what the LM head reads, and what SFTMix interpolates
        logits = self.lm_head(hidden if logits_at is None else hidden[logits_at])  # (B, T, V) or (N, V)
        return (logits, hidden) if return_hidden else logits


# ----------------------------------------------------------------------------- checkpoints

def _read_config(path: Path) -> ModelArgs:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise InputError(f"{config_file}: not found (expected an HF model directory)")
    return ModelArgs.from_hf_config(json.loads(config_file.read_text()), str(config_file))


def load_pretrained(path, dtype=torch.float32, device="cpu") -> Transformer:
    """Load a local HF directory (model.safetensors, or shards listed in model.safetensors.index.json).

    The model is built on the meta device and the checkpoint's tensors are assigned in place, so no
    random weights are allocated first. Only safetensors are read: no checkpoint is ever unpickled.
    """
    path = Path(path)
    args = _read_config(path)
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise InputError(f"{path}: no model.safetensors or model.safetensors.index.json")
    with torch.device("meta"):
        model = Transformer(args)
    expected = {name: p.shape for name, p in model.state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
    state = {}
    for file in files:
        with safe_open(str(path / file), framework="pt", device="cpu") as f:
            for name in f.keys():
                if args.tie_word_embeddings and name == "lm_head.weight":
                    continue  # some tied checkpoints store the shared matrix twice
                state[name] = f.get_tensor(name).to(device=device, dtype=dtype)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    wrong = [f"{n}: checkpoint {tuple(state[n].shape)}, model {tuple(expected[n])}"
             for n in sorted(expected.keys() & state.keys()) if state[n].shape != expected[n]]
    if missing or unexpected or wrong:
        raise InputError(f"{path}: checkpoint does not match config.json: missing {missing}, "
                         f"unexpected {unexpected}, shape mismatch {wrong}")
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, assign=True)
    if args.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight  # one Parameter, as built
    return model


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def save_pretrained(model: Transformer, path, tokenizer_dir=None, state_dict=None, max_shard_bytes=5 * 2**30):
    """Write config.json and model.safetensors (sharded with an index above max_shard_bytes), loadable by
    transformers' LlamaForCausalLM. A tied LM head is written once, as model.embed_tokens.weight.
    state_dict (name -> full CPU tensor) replaces model.state_dict(), for callers that gathered it.
    Every file is written to a temporary name and renamed, so a crash never leaves a half-written file.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()
             if not (model.args.tie_word_embeddings and k == "lm_head.weight")}
    shards, size = [{}], 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        with atomic_path(path / name) as tmp:
            save_file(shard, str(tmp), metadata={"format": "pt"})
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
        write_json(path / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    dtype = next(iter(state.values())).dtype
    write_json(path / "config.json", model.args.to_hf_config(dtype))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                with atomic_path(path / name) as tmp:
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp)


# ----------------------------------------------------------------------------- generation

@torch.no_grad()
def generate(model: Transformer, prompt_ids, max_new_tokens, temperature=0.0, top_p=1.0, eos_ids=(), seed=None):
    """Continue each prompt (a list of token-id lists, any lengths) with a KV cache.

    Prompts are left-padded; positions count real tokens only, and padding is masked out of attention,
    so each row continues exactly as it would alone. temperature 0 is greedy; otherwise sample from
    softmax(logits / temperature) restricted to the smallest set of tokens with probability >= top_p.
    Returns the new tokens of each prompt, ending with the EOS token when one was produced.
    """
    device = model.lm_head.weight.device
    B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
    S = P + max_new_tokens
    tokens = torch.zeros(B, S, dtype=torch.long, device=device)
    real = torch.zeros(B, S, dtype=torch.bool, device=device)  # True where a token (not padding) sits
    for i, p in enumerate(prompt_ids):
        tokens[i, P - len(p):P] = torch.tensor(p, device=device)
        real[i, P - len(p):] = True
    positions = (real.cumsum(-1) - 1).clamp(min=0)  # (B, S)
    causal = torch.ones(S, S, dtype=torch.bool, device=device).tril()
    mask = causal[None] & real[:, None, :]  # (B, S, S): query t may see key s
    mask |= torch.eye(S, dtype=torch.bool, device=device)  # a padding query sees itself, never an empty row
    cache = KVCache(model.args, B, S, model.lm_head.weight.dtype, device)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    out = [[] for _ in range(B)]
    start, end = 0, P
    for _ in range(max_new_tokens):
        logits = model(tokens[:, start:end], positions=positions[:, start:end],
                       mask=mask[:, None, start:end, :end], cache=cache)[:, -1].float()  # (B, V)
        next_id = _sample(logits, temperature, top_p, gen)  # (B,)
        for i in torch.nonzero(~done).flatten().tolist():
            out[i].append(next_id[i].item())
        done |= torch.isin(next_id, eos)
        if done.all() or end == S:
            break
        tokens[:, end] = next_id
        start, end = end, end + 1
    return out


def _sample(logits, temperature, top_p, gen):
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p  # tokens after the top-p mass is reached
    sorted_probs[outside] = 0.0
    choice = torch.multinomial(sorted_probs, 1, generator=gen)  # (B, 1)
    return order.gather(-1, choice).squeeze(-1)
