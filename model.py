"""The decoder-only transformer of the Llama, Mistral, Qwen2, Gemma and Gemma 2 families, HF
checkpoint load/save, and KV-cached generation.

Parameter names are those of HF's *ForCausalLM classes (model.layers.N.self_attn.q_proj.weight,
...), so a safetensors checkpoint maps onto this model one to one, and RoPE uses HF's rotate-half
layout, so no weight permutation is needed. A family is not a class here: it is a few fields of
ModelArgs (biases, norm offset, embedding scale, activation, sliding window, soft-caps, extra
norms), read from config.json. Shapes: B batch, T time, S keys, D hidden_size, H heads, K kv heads,
hd head_dim, V vocab_size.
"""

import json
import math
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass, fields
from functools import lru_cache, partial
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from data import InputError, atomic_path, read_json, write_json

GEMMA = dict(mlp_bias=False, norm_offset=1.0, embed_scale=True)
# model_type: (transformers' class, its defaults that config.json files omit, what the family fixes)
FAMILIES = {
    "llama": ("LlamaForCausalLM", {}, {}),
    "mistral": ("MistralForCausalLM", {}, dict(attention_bias=False, mlp_bias=False)),
    "qwen2": ("Qwen2ForCausalLM", {}, dict(qkv_bias=True, attention_bias=False, mlp_bias=False)),
    "gemma": (
        "GemmaForCausalLM",
        dict(tie_word_embeddings=True, hidden_act="gelu_pytorch_tanh"),
        GEMMA,
    ),
    "gemma2": (
        "Gemma2ForCausalLM",
        dict(
            tie_word_embeddings=True,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=256,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
        dict(GEMMA, sandwich_norms=True),
    ),
}
# set by the family, never in config.json
FIXED = ("qkv_bias", "norm_offset", "embed_scale", "sandwich_norms")
# Gemma 2's attention scale (scores times 1/sqrt(query_pre_attn_scalar)) and soft-caps
GEMMA2_SCALES = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping")
# the fields of some families only (see to_hf_config)
OWN = ("sliding_window", "layer_types", *GEMMA2_SCALES)
# Fields of the five families' config classes (and RoPE parameters) that change the computation and
# that this model does not implement: field: (the values that compute as this model does, what
# another value would ask for). Any other value is refused, naming the field; tests/test_families.py
# walks every field of transformers' classes.
REFUSED = {
    "attention_dropout": ((None, 0.0), "dropout on the attention probabilities in training"),
    "partial_rotary_factor": ((None, 1.0), "RoPE on a part of each head only"),
    "use_bidirectional_attention": ((None, False), "attention to the tokens after each one"),
    "use_sliding_window": ((None, False), "Qwen2's sliding window"),
}
# the rope_type values rope_inv_freq computes; transformers' others are refused
ROPE_TYPES = ("default", "llama3")
LLAMA3_ROPE = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
REQUIRED = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "vocab_size",
)


def _count(v):
    return type(v) is int and v >= 1


def _token_id(v):
    return type(v) is int and v >= 0


def _token_ids(v):
    return _token_id(v) or isinstance(v, list) and v and all(map(_token_id, v))


def _positive(v):
    return type(v) in (int, float) and 0 < v < math.inf


def _bool(v):
    return type(v) is bool


# config.json's fields, each checked as what it is before any is used: field: (ok, expected). null
# is the field left out (a default, or the feature off), except for REQUIRED fields.
COUNT = (_count, "an integer >= 1")
NUMBER = (_positive, "a finite number > 0")
BOOL = (_bool, "true or false")
CHECKS = {
    **dict.fromkeys(REQUIRED, COUNT),
    **dict.fromkeys(("num_key_value_heads", "head_dim", "max_position_embeddings"), COUNT),
    **dict.fromkeys(("sliding_window", "original_max_position_embeddings"), COUNT),
    "bos_token_id": (_token_id, "a token id (an integer >= 0)"),
    "eos_token_id": (_token_ids, "a token id (an integer >= 0) or a list of them"),
    **dict.fromkeys(("rope_theta", "rms_norm_eps", *GEMMA2_SCALES), NUMBER),
    **dict.fromkeys(("factor", "low_freq_factor", "high_freq_factor"), NUMBER),
    **dict.fromkeys(("tie_word_embeddings", "attention_bias", "mlp_bias"), BOOL),
}


def check_fields(cfg: dict, source: str, prefix: str = "") -> None:
    """Each field of CHECKS that cfg holds (REQUIRED ones always) is what CHECKS says, else an
    InputError '<source>: <field>: expected ..., got ...' (a string "8" for head_dim, 0 key/value
    heads, ...)."""
    for key, (ok, expected) in CHECKS.items():
        value = cfg.get(key)
        if (value is not None or (key in REQUIRED and not prefix)) and not ok(value):
            got = "nothing" if key not in cfg else json.dumps(value)[:60]
            raise InputError(f"{source}: {prefix}{key}: expected {expected}, got {got}")


def rope_scaling(rope: dict, key: str, theta: float, source: str) -> tuple:
    """(rope_theta, rope_scaling) of ModelArgs from the RoPE parameters `rope` that config.json
    holds under `key`, read as transformers 5 reads them: "type" is the old name of rope_type, and
    their own rope_theta wins over the top level's (`theta`)."""
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise InputError(
            f"{source}: {key}.rope_type: expected {' or '.join(map(json.dumps, ROPE_TYPES))} (the RoPE "
            f"implemented here), got {json.dumps(rope_type)}"
        )
    check_fields(rope, source, f"{key}.")
    theta = rope.get("rope_theta", theta)
    if rope_type == "default":
        return theta, None
    for field in LLAMA3_ROPE:
        if field not in rope:
            raise InputError(f'{source}: {key}.{field}: missing for rope_type "llama3"')
    return theta, {"rope_type": "llama3", **{field: rope[field] for field in LLAMA3_ROPE}}


@dataclass
class ModelArgs:
    model_type: str = "llama"  # the family, a key of FAMILIES
    hidden_size: int = 576
    intermediate_size: int = 1536
    num_hidden_layers: int = 30
    num_attention_heads: int = 9
    num_key_value_heads: int = 3
    head_dim: int = 64
    vocab_size: int = 49152
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # None, or {"rope_type": "llama3", "factor", ...}
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q, k, v and o
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hidden_act: str = "silu"  # silu: SwiGLU; gelu_pytorch_tanh: GeGLU (gelu, tanh approximation)
    # W: a query attends to the last W positions only (itself included) ...
    sliding_window: int | None = None
    # ... in the layers marked "sliding_attention" here (None: every layer)
    layer_types: list | None = None
    query_pre_attn_scalar: float | None = None  # scores times 1/sqrt(this), else 1/sqrt(head_dim)
    attn_logit_softcapping: float | None = None  # Gemma 2: scores -> cap tanh(scores / cap)
    final_logit_softcapping: float | None = None  # Gemma 2: logits -> cap tanh(logits / cap)
    qkv_bias: bool = False  # Qwen2: bias on q, k, v (and not o)
    norm_offset: float = 0.0  # Gemma: RMSNorm scales by (1 + w), in fp32
    embed_scale: bool = False  # Gemma: embeddings times sqrt(hidden_size)
    sandwich_norms: bool = False  # Gemma 2: a norm after attention, and before and after the MLP

    @classmethod
    def from_hf_config(cls, cfg: dict, source: str = "config.json") -> "ModelArgs":
        """Fill from an HF config.json dict; anything this model would get wrong is an error naming
        the field."""
        family = cfg.get("model_type")
        if family not in FAMILIES:
            raise InputError(
                f"{source}: model_type: expected one of {', '.join(FAMILIES)}, got {family!r}"
            )
        _, defaults, fixed = FAMILIES[family]
        cfg = {**defaults, **cfg}
        check_fields(cfg, source)
        act_key = "hidden_activation" if family == "gemma2" else "hidden_act"
        # the last is the one computed: Gemma's "gelu" is the tanh approximation, as in transformers
        acts = {"gemma": ("gelu", "gelu_pytorch_tanh"), "gemma2": ("gelu_pytorch_tanh",)}.get(
            family, ("silu",)
        )
        if cfg.get(act_key, "silu") not in acts:
            raise InputError(
                f"{source}: {act_key}: expected {' or '.join(map(json.dumps, acts))}, "
                f"got {cfg[act_key]!r}"
            )
        # the old key wins, as in HF
        rope_key = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
        rope = cfg.get(rope_key) or {}
        if not isinstance(rope, dict) or any(isinstance(v, dict) for v in rope.values()):
            raise InputError(
                f"{source}: {rope_key}: expected one object of RoPE parameters for every layer"
            )
        # partial_rotary_factor may stand at the top level or in rope
        for field, (ok, what) in REFUSED.items():
            for name, value in ((field, cfg.get(field)), (f"{rope_key}.{field}", rope.get(field))):
                if value not in ok:
                    raise InputError(
                        f"{source}: {name}: expected {json.dumps(ok[-1])} ({what} is not implemented),"
                        f" got {json.dumps(value)}"
                    )
        theta, scaling = rope_scaling(rope, rope_key, cfg.get("rope_theta", 10000.0), source)
        if family == "qwen2" and "sliding_attention" in (cfg.get("layer_types") or []):
            raise InputError(
                f'{source}: layer_types: expected only "full_attention" (Qwen2\'s sliding window is not '
                f"implemented)"
            )
        # the fields read as they stand: not those set here or below, nor those the family fixes
        names = {f.name for f in fields(cls)} - {"rope_scaling", "rope_theta", "hidden_act"}
        names -= {"sliding_window", "layer_types", *fixed}
        read = {k: cfg[k] for k in names if cfg.get(k) is not None}
        args = cls(**read, rope_theta=theta, rope_scaling=scaling, hidden_act=acts[-1], **fixed)
        # a sliding window in the layers config.json's layer_types marks; without them, in every
        # layer (Mistral) or in layers 0, 2, 4, ... (Gemma 2)
        if family in ("mistral", "gemma2") and cfg.get("sliding_window") is not None:
            L = args.num_hidden_layers
            alternating = [("sliding_attention", "full_attention")[i % 2] for i in range(L)]
            types = cfg.get("layer_types") or (None if family == "mistral" else alternating)
            known = {"sliding_attention", "full_attention"}
            if types is not None and (len(types) != L or not set(types) <= known):
                raise InputError(
                    f'{source}: layer_types: expected {L} of "sliding_attention" or "full_attention"'
                )
            args.sliding_window, args.layer_types = cfg["sliding_window"], types
        if cfg.get("num_key_value_heads") is None:
            args.num_key_value_heads = args.num_attention_heads
        if cfg.get("head_dim") is None:
            args.head_dim = args.hidden_size // args.num_attention_heads
        if args.num_attention_heads % args.num_key_value_heads:
            raise InputError(f"{source}: num_key_value_heads: must divide num_attention_heads")
        if args.head_dim % 2:  # RoPE rotates pairs (x_i, x_{i + hd/2})
            given = "" if cfg.get("head_dim") else " (hidden_size / num_attention_heads)"
            raise InputError(
                f"{source}: head_dim: expected an even integer, got {args.head_dim}{given}"
            )
        return args

    @classmethod
    def from_model_dir(cls, path) -> "ModelArgs":
        """From the config.json of a model (see model_dir), checked as from_hf_config checks it and
        against the headers of its checkpoint (checked_model): what load_pretrained builds, known
        before it loads."""
        return checked_model(path)[1]

    def to_hf_config(self, dtype: torch.dtype) -> dict:
        """config.json for transformers' class of this family. A family's own field that is unset is
        left out unless the class's default differs (transformers reads a Mistral config with
        layer_types as Ministral)."""
        architecture, defaults, _ = FAMILIES[self.model_type]
        cfg = {"architectures": [architecture], "torch_dtype": str(dtype).removeprefix("torch.")}
        for f in fields(self):
            value = getattr(self, f.name)
            unset = value is None and f.name in OWN and f.name not in defaults
            if f.name not in FIXED and not unset:
                cfg[f.name] = value
        if self.model_type == "gemma2":
            cfg["hidden_activation"] = self.hidden_act
        return cfg


def compute_dtype(flag, device) -> torch.dtype:
    """The --dtype of train.py and eval.py: "bf16", "fp32", or "auto" (bf16 on CUDA, else fp32)."""
    cuda = torch.device(device).type == "cuda"
    return torch.bfloat16 if flag == "bf16" or (flag == "auto" and cuda) else torch.float32


def rope_inv_freq(args: ModelArgs, device=None) -> torch.Tensor:
    """inv_freq_i = theta^(-2i/hd), i < hd/2, with Llama 3's long-context rescaling when configured."""
    hd = args.head_dim
    i2 = torch.arange(0, hd, 2, dtype=torch.int64, device=device).float()  # 2i
    inv_freq = 1.0 / (args.rope_theta ** (i2 / hd))
    if args.rope_scaling is None:
        return inv_freq
    # llama3: low frequencies divided by factor, high kept, a smooth ramp between
    s = args.rope_scaling
    old_len, factor = s["original_max_position_embeddings"], s["factor"]
    low, high = s["low_freq_factor"], s["high_freq_factor"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(is_medium, smoothed, scaled)


def rope_cos_sin(args: ModelArgs, positions: torch.Tensor, dtype: torch.dtype):
    """cos, sin of angle position * inv_freq, duplicated over both halves of head_dim: (B, 1, T, hd)
    each."""
    inv_freq = rope_inv_freq(args, positions.device)
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2), fp32 whatever the dtype
    angles = torch.cat([angles, angles], dim=-1)  # (B, T, hd)
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x_i, x_{i+hd/2}) by their angle: x*cos + rotate_half(x)*sin, HF's layout."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), the normalisation computed in fp32; with an offset
    (Gemma), y = (offset + w) * x / sqrt(mean(x^2) + eps), all of it in fp32."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset))  # the identity

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


class KVCache:
    """Keys and values of every layer, preallocated for max_len positions: (B, K, max_len, hd) each.

    The prompts fill positions [0, length) in one call (length: a Python int). Then each decoding
    step writes its one position at `slot`, a (1,) long tensor on the device, and attends over all
    max_len positions, those not yet written masked out: no shape and no Python number changes from
    one step to the next, so one compiled graph (decode_step) serves every step of a generation.
    """

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, dtype, device):
        shape = (batch_size, args.num_key_value_heads, max_len, args.head_dim)
        zeros = partial(torch.zeros, shape, dtype=dtype, device=device)
        self.k = [zeros() for _ in range(args.num_hidden_layers)]
        self.v = [zeros() for _ in range(args.num_hidden_layers)]
        self.length = 0  # positions [0, length) are filled by the prompts
        self.slot = None  # decoding: the (1,) position each row's new token is written at

    def update(self, layer: int, k, v):
        """Store k, v (B, K, T, hd); return the keys and values to attend over: the prompts' T
        after the filled positions, returning those so far (B, K, length + T, hd); or, decoding
        (T = 1), at slot, returning the whole cache (B, K, max_len, hd)."""
        if self.slot is None:
            end = self.length + k.shape[2]
            self.k[layer][:, :, self.length : end] = k
            self.v[layer][:, :, self.length : end] = v
            return self.k[layer][:, :, :end], self.v[layer][:, :, :end]
        self.k[layer].index_copy_(2, self.slot, k)
        self.v[layer].index_copy_(2, self.slot, v)
        return self.k[layer], self.v[layer]

    def keep(self, rows):
        """Keep these rows (n,) long of the batch, in this order; the others (finished) are freed,
        one layer at a time."""
        for layer in range(len(self.k)):
            self.k[layer] = self.k[layer].index_select(0, rows)
            self.v[layer] = self.v[layer].index_select(0, rows)


class Attention(nn.Module):
    """Grouped-query attention: H query heads share K key/value heads (H % K == 0).

    softmax(q k^T s + mask) v with s = 1/sqrt(query_pre_attn_scalar or hd); Gemma 2 soft-caps the
    scores, softmax(cap tanh(q k^T s / cap) + mask) v, which SDPA cannot do: that path is written
    out."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer, self.args = layer, args
        H, K = args.num_attention_heads, args.num_key_value_heads
        hd, D = args.head_dim, args.hidden_size
        qkv_bias = args.attention_bias or args.qkv_bias
        self.q_proj = nn.Linear(D, H * hd, bias=qkv_bias)
        self.k_proj = nn.Linear(D, K * hd, bias=qkv_bias)
        self.v_proj = nn.Linear(D, K * hd, bias=qkv_bias)
        self.o_proj = nn.Linear(H * hd, D, bias=args.attention_bias)
        self.scale = (args.query_pre_attn_scalar or hd) ** -0.5

    def forward(self, x, cos, sin, mask=None, cache=None, seqs=None):
        B, T, _ = x.shape
        hd = self.args.head_dim
        q = self.q_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, K, T, hd)
        v = self.v_proj(x).view(B, T, -1, hd).transpose(1, 2)  # (B, K, T, hd)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, K, S, hd), S = the positions attended over
        if seqs is None:
            y = self.attend(q, k, v, mask).transpose(1, 2)  # (B, T, H, hd)
        else:  # a packed row as its n sequences side by side, right-padded to L: each plain causal
            index, inverse = seqs
            y = self.attend(*(unpack(t, index) for t in (q, k, v)), mask)  # (n, H, L, hd)
            y = y.transpose(1, 2).flatten(0, 1).index_select(0, inverse)  # (B*T, H, hd), row order
        return self.o_proj(y.reshape(B, T, -1))  # (B, T, D)

    def attend(self, q, k, v, mask):
        """q (B, H, T, hd), k and v (B, K, S, hd) -> (B, H, T, hd). mask (B, 1, T, S) bool from
        attention_mask, True = may attend; None: plain causal, the T queries the last of the S keys.

        Given a mask, the G = H / K query heads that share a key/value head are folded into its
        queries, q (B, K, G T, hd), and the mask is repeated G times along T (at a decoding step,
        T = 1, it broadcasts as it is): k and v are never copied, though SDPA's fused kernels take
        no mask together with enable_gqa."""
        cap = self.args.attn_logit_softcapping
        if cap is None and mask is None:  # GQA inside the kernel
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=True
            )
        B, H, T, hd = q.shape
        K, S = k.shape[1], k.shape[2]
        if mask is None:  # soft-capped: the causal mask written out
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)[None, None]
        q = q.reshape(B, K, H // K * T, hd)  # head g + G kv, row t -> K-head kv, row g T + t
        if T > 1:
            mask = mask.repeat(1, 1, H // K, 1)  # (B, 1, G T, S)
        if cap is None:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            y = softcapped_attention(q, k, v, mask, self.scale, cap)
        return y.reshape(B, H, T, hd)


def attention_mask(positions, S, window=None, start=None):
    """(B, 1, T, S) bool, True where query i may attend to key j; the T queries are the last of the
    S keys, or, given start ((1,) long, a decoding step's cache slot), keys start .. start + T - 1.

    positions (B, T) count each token's place in its own sequence, so they say where sequences
    start: query i's sequence began at key i - pos_i. Query i sees key j when
        i - pos_i <= j <= i           (its own sequence, causal)
        i - j < window                (a sliding layer: the last `window` positions, itself included)
    One mask covers a packed row (positions restart at each sequence), a left-padded row of
    generation (positions start at the first real token; a padding query sees itself alone) and the
    KV cache."""
    T = positions.shape[1]
    i = (S - T if start is None else start) + torch.arange(T, device=positions.device)
    i = i[:, None]  # (T, 1) each query's index among the keys
    j = torch.arange(S, device=positions.device)  # (S,)
    first = (i[:, 0] - positions)[:, :, None]  # (B, T, 1) the first key of each query's sequence
    mask = (j >= first) & (j <= i)  # (B, T, S)
    if window is not None:
        mask = mask & (i - j < window)
    return mask[:, None]


def unpack(t, index):
    """(B, h, T, hd) -> (n, h, L, hd): the n sequences of packed rows, right-padded to the longest,
    L. index (n, L) long holds the flat (B*T) position of each sequence's t-th token; a padding
    place holds any position (data.packing: 0). Padding sits after each sequence's tokens, so under
    a causal mask no real query sees it, and its own outputs are never read back: the result is
    exact, whatever the padding holds."""
    B, h, T, hd = t.shape
    flat = t.transpose(1, 2).reshape(B * T, h, hd)  # (B*T, h, hd)
    # (n, h, L, hd)
    return flat.index_select(0, index.flatten()).view(*index.shape, h, hd).transpose(1, 2)


def softcapped_attention(q, k, v, mask, scale, cap):
    """softmax(cap tanh(q k^T scale / cap) + mask) v, the softmax in fp32. q, k, v (B, H, T|S, hd);
    mask (B, 1, T, S), True = may attend."""
    scores = cap * torch.tanh(q @ k.transpose(2, 3) * scale / cap)  # (B, H, T, S)
    # (B, H, T, hd)
    return torch.softmax(scores.masked_fill(~mask, -math.inf).float(), dim=-1).to(q.dtype) @ v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); Gemma's GeGLU has gelu (tanh approximation) for silu."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        D, I = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(D, I, bias=args.mlp_bias)
        self.up_proj = nn.Linear(D, I, bias=args.mlp_bias)
        self.down_proj = nn.Linear(I, D, bias=args.mlp_bias)
        self.act = F.silu if args.hidden_act == "silu" else partial(F.gelu, approximate="tanh")

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then + mlp(norm(x)). With sandwich norms (Gemma
    2) each sub-layer's output is normalised too: x + norm(attn(norm(x))), then +
    norm(mlp(norm(x)))."""

    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        norm = partial(RMSNorm, args.hidden_size, args.rms_norm_eps, args.norm_offset)
        self.input_layernorm = norm()
        self.self_attn = Attention(args, layer)
        # Gemma 2: on the attention output; others: before the MLP
        self.post_attention_layernorm = norm()
        self.mlp = MLP(args)
        if args.sandwich_norms:
            self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(), norm()

    def forward(self, x, cos, sin, mask=None, cache=None, seqs=None):
        if not self.self_attn.args.sandwich_norms:
            x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, seqs)
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(
            self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, seqs)
        )
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class LMHead(nn.Linear):
    """The LM head, W (V, D) with no bias: logits = h W^T. Given a head function, it hands W to it
    instead, head(h, W): a loss that applies W itself, in chunks (sftmix.head_losses). Every use of
    W goes through this module's call, because that call is where FSDP2 gathers W (its forward
    hooks)."""

    def forward(self, hidden, head=None):
        return super().forward(hidden) if head is None else head(hidden, self.weight)


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = nn.ModuleDict(
            dict(
                embed_tokens=nn.Embedding(args.vocab_size, args.hidden_size),
                layers=nn.ModuleList(Block(args, i) for i in range(args.num_hidden_layers)),
                norm=RMSNorm(args.hidden_size, args.rms_norm_eps, args.norm_offset),
            )
        )
        self.lm_head = LMHead(args.hidden_size, args.vocab_size, bias=False)
        if args.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        # keep only each block's input; recompute the rest in backward
        self.checkpoint_activations = False

    def forward(self, input_ids, positions=None, seqs=None, cache=None, logits_at=None, head=None):
        """input_ids (B, T) -> logits (B, T, V), or what `head` returns from the final-norm states.

        positions (B, T): each token's place in its own sequence (a left-padded row of generation; a
        packed row, where they restart at each sequence): attention_mask keeps each query inside its
        sequence, the boundaries being data, not a loop. None: each row is one sequence from
        position 0 (after the cache's filled length), plain causal attention with no mask.
        seqs (index (n, L), inverse (B*T,)) from data.packing, for packed rows in place of
        positions: the same result faster, attention on the n sequences right-padded to L (unpack)
        under SDPA's own causal mask: n L^2 scores, not T^2, none crossing a sequence. A sliding
        layer (window W) also limits query i to its last W keys, a band built only when a sequence
        is longer than W. logits_at (N,) long: the LM head only at these rows of the flattened
        (B*T), in that order -> (N, V): a loss needs only the trained positions (an index, not a
        boolean mask: no host sync). head(hidden (N, D), W (V, D), softcap=final-logit cap or None)
        replaces the LM head: a loss that applies W itself, in chunks (sftmix.head_losses).
        cache (KVCache): the prompts' keys and values go after its filled length; once its slot is
        set, a call is a decoding step, one token a row at positions (B, 1) (decode_step).
        """
        B, T = input_ids.shape
        W = self.args.sliding_window
        decoding = cache is not None and cache.slot is not None
        if decoding:  # one token a row at cache.slot, over the static cache (unwritten keys masked)
            S, slot = cache.k[0].shape[2], cache.slot
            full = attention_mask(positions, S, start=slot)  # (B, 1, T, S)
            band = attention_mask(positions, S, W, start=slot) if W is not None and S > W else full
        elif seqs is not None:  # packed: n padded sequences of L, causal, a (1, 1, L, L) band > W
            L = seqs[0].shape[1]
            # a token's place in its sequence: its padded place mod L
            positions = (seqs[1] % L).view(B, T)
            full = band = None
            if W and L > W:
                band = attention_mask(torch.arange(L, device=input_ids.device)[None], L, W)
        else:
            start = cache.length if cache is not None else 0
            S = start + T  # keys: the cached positions, then these
            masked = positions is not None or (start > 0 and T > 1)  # else SDPA's own causal mask
            if positions is None:
                positions = torch.arange(start, S, device=input_ids.device).expand(B, T)
            full = attention_mask(positions, S) if masked else None  # (B, 1, T, S) or None
            band = attention_mask(positions, S, W) if W is not None and S > W else full
        x = self.model.embed_tokens(input_ids)  # (B, T, D)
        # Gemma: times sqrt(D), rounded to the model's dtype as transformers does
        if self.args.embed_scale:
            x = x * torch.tensor(self.args.hidden_size**0.5).to(x.dtype)
        cos, sin = rope_cos_sin(self.args, positions, x.dtype)
        types = self.args.layer_types
        for layer, block in enumerate(self.model.layers):
            mask = band if types is None or types[layer] == "sliding_attention" else full
            if self.checkpoint_activations and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(
                    block, x, cos, sin, mask, cache, seqs, use_reentrant=False
                )
            else:
                x = block(x, cos, sin, mask, cache, seqs)
        if cache is not None and not decoding:
            cache.length += T
        hidden = self.model.norm(x)  # (B, T, D): what the LM head reads, and SFTMix interpolates
        if logits_at is not None:
            hidden = hidden.flatten(0, 1).index_select(0, logits_at)  # (N, D)
        if head is not None:  # training's loss
            return self.lm_head(hidden, partial(head, softcap=self.args.final_logit_softcapping))
        return self.softcap(self.lm_head(hidden))  # (B, T, V) or (N, V)

    def softcap(self, logits):
        """Gemma 2's final soft-cap, cap tanh(logits / cap); the identity for the other families. It
        is not linear: SFTMix's Mixup mixes the LM head's outputs (W Z~ = lam W Z^c + (1 - lam) W
        Z^u), then caps."""
        cap = self.args.final_logit_softcapping
        return logits if cap is None else cap * torch.tanh(logits / cap)


# ----------------------------------------------------------------------------- LoRA

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """y = x W^T + b + (alpha / r) x A^T B^T (Hu et al., LoRA): the frozen base W (out, in) and b
    keep their HF names (weight, bias); A (r, in) starts Kaiming-uniform and B (out, r) at zero, as
    peft, so step 0 is the base."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.weight, self.bias, self.scale = base.weight, base.bias, alpha / r
        like = dict(device=base.weight.device, dtype=base.weight.dtype)
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, **like))
        # else load_pretrained initialises them once the model has memory
        if not base.weight.is_meta:
            self.reset_lora()

    @torch.no_grad()
    def reset_lora(self):
        """A Kaiming-uniform, drawn on the CPU (the same on every rank: each keeps its part), B = 0."""
        A = nn.init.kaiming_uniform_(torch.empty(self.lora_A.shape), a=math.sqrt(5))
        load_into(self.lora_A, A)
        load_into(self.lora_B, torch.zeros(self.lora_B.shape))

    def forward(self, x):
        base = F.linear(x, self.weight, self.bias)
        return base + self.scale * F.linear(F.linear(x, self.lora_A), self.lora_B)


def add_lora(model: Transformer, r: int, alpha: float, targets=LORA_TARGETS) -> Transformer:
    """The model, every parameter frozen, each projection named in targets (HF names) wrapped in a
    LoRALinear."""
    model.requires_grad_(False)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if name in targets and isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha))
    return model


# ----------------------------------------------------------------------------- checkpoints


def model_dir(path) -> Path:
    """The HF model directory (config.json) a path names: itself, or a run directory's final/."""
    path = Path(path)
    if (path / "final" / "config.json").is_file():
        return path / "final"
    if not (path / "config.json").is_file():
        raise InputError(
            f"{path}: config.json: not found; expected an HF model directory "
            f"or a run directory with final/"
        )
    return path


def checkpoint_files(path: Path) -> list:
    """The safetensors files of a model directory: model.safetensors, or the shards its index lists."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not all(
            isinstance(f, str) for f in weight_map.values()
        ):
            raise InputError(f"{index}: weight_map: expected an object of tensor name -> file name")
        files = sorted(set(weight_map.values()))
        for file in files:
            if not (path / file).is_file():
                raise InputError(f"{path / file}: not found; {index.name} lists it")
        return files
    if (path / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise InputError(f"{path}: no model.safetensors or model.safetensors.index.json")


@torch.no_grad()
def load_into(param, full):
    """Copy a full tensor (on the CPU) into a parameter, cast to its dtype: all of it, or under
    FSDP2 (a DTensor sharded on dim 0 as torch.chunk cuts it) this rank's part alone, so the device
    never holds the full tensor."""
    if isinstance(param, DTensor):
        # HSDP: (R, S)
        mesh, dim = param.device_mesh, [p.is_shard() for p in param.placements].index(True)
        chunks = full.chunk(mesh.size(dim), dim=0)
        rank = mesh.get_local_rank(dim)
        full, param = (chunks[rank] if rank < len(chunks) else full[:0]), param.to_local()
    assert param.shape == full.shape, f"{tuple(full.shape)} into {tuple(param.shape)}"
    param.copy_(full)


@contextmanager
def read_safetensors(path: Path, file: str):
    """safe_open(path / file) on the CPU; a file that cannot be read, there or while the block reads
    it, is an InputError naming it."""
    try:
        with safe_open(str(path / file), framework="pt", device="cpu") as f:
            yield f
    except (OSError, SafetensorError) as e:
        raise InputError(
            f"{path / file}: not a readable safetensors file ({e}); truncated or corrupted?"
        ) from None


def checkpoint_tensors(path: Path, files: list) -> dict:
    """{tensor name: (file, shape, dtype)} from the safetensors headers alone (no tensor is read);
    dtype as safetensors names it ("F32", "BF16", "I8", ...)."""
    tensors = {}
    for file in files:
        with read_safetensors(path, file) as f:
            for name in f.keys():
                part = f.get_slice(name)
                tensors[name] = (file, tuple(part.get_shape()), part.get_dtype())
    return tensors


def untie_if_heads_differ(path: Path, args: ModelArgs, tensors: dict) -> bool:
    """A config.json with tie_word_embeddings true whose checkpoint also holds an lm_head.weight:
    the same matrix stored twice stays tied (the copy is skipped); a different one is kept as an
    untied head, as transformers loads it (it warns and does not tie), so that logits equal
    transformers'. True when it untied."""
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if not (args.tie_word_embeddings and {head, embed} <= tensors.keys()):
        return False
    with (
        safe_open(str(path / tensors[head][0]), "pt") as h,
        safe_open(str(path / tensors[embed][0]), "pt") as e,
    ):
        same = torch.equal(h.get_tensor(head), e.get_tensor(embed))
    if same:
        del tensors["lm_head.weight"]
    args.tie_word_embeddings = same
    return not same


# the dtypes a checkpoint's weights may have, as safetensors names them
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def check_checkpoint(path: Path, tensors: dict, params: dict) -> None:
    """Every parameter of the model config.json describes has its tensor, of its shape and a
    floating-point dtype (FLOAT_DTYPES), and no other tensor is there: else an InputError naming the
    file and the tensor, before any weight is read."""
    index = path / "model.safetensors.index.json"
    where = index.name if index.is_file() else "model.safetensors"
    missing = [n for n in params if n not in tensors]
    if missing:
        why = {
            "lm_head.weight": "tie_word_embeddings false, so the head is its own tensor",
            ".bias": "attention_bias or mlp_bias true, or the family's q, k, v bias",
        }
        ends = (f" (config.json: {w})" for end, w in why.items() if missing[0].endswith(end))
        reason = next(ends, "")
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise InputError(
            f"{path / where}: {missing[0]}: missing{reason}{more}; expected the "
            f"checkpoint of the model config.json describes"
        )
    for name, p in params.items():
        file, shape, dtype = tensors[name]
        if shape != tuple(p.shape):
            raise InputError(
                f"{path / file}: {name}: shape {shape}, but config.json makes it {tuple(p.shape)}"
            )
        if dtype not in FLOAT_DTYPES:
            raise InputError(
                f"{path / file}: {name}: expected a floating-point dtype "
                f"({', '.join(FLOAT_DTYPES)}), got {dtype}"
            )
    for name, (file, *_) in tensors.items():
        if name not in params:
            raise InputError(
                f"{path / file}: {name}: not a parameter of the model config.json describes"
            )


def checked_model(path, say=False) -> tuple:
    """(directory, ModelArgs, safetensors files) of a model (see model_dir), its config.json and the
    headers of its checkpoint checked against each other, no weight read (but a tied head stored
    twice, to compare)."""
    path = model_dir(path)
    args = ModelArgs.from_hf_config(read_json(path / "config.json"), str(path / "config.json"))
    files = checkpoint_files(path)
    tensors = checkpoint_tensors(path, files)
    if untie_if_heads_differ(path, args, tensors) and say:
        print(
            f"note: {path / tensors['lm_head.weight'][0]}: lm_head.weight differs from "
            f"model.embed_tokens.weight though config.json says tie_word_embeddings true; kept "
            f"as an untied head, as transformers loads it",
            file=sys.stderr,
        )
    with torch.device("meta"):
        check_checkpoint(path, tensors, dict(Transformer(args).named_parameters()))
    return path, args, files


def load_pretrained(path, dtype=torch.float32, device="cpu", prepare=None) -> Transformer:
    """The model of a directory (see model_dir), loaded from model.safetensors or the shards that
    model.safetensors.index.json lists, their headers checked against config.json first.

    The model is built on the meta device; prepare(model), if given, changes it there, before any
    memory is taken (train.py adds LoRA, compiles blocks and shards it with FSDP2). Then each tensor
    is read alone and copied into its parameter (only this rank's part under FSDP2), so at most one
    full tensor is held at a time, on the CPU. Only safetensors are read: no checkpoint is ever
    unpickled. A file that cannot be read (missing, empty, truncated, not JSON) is an InputError
    naming it."""
    path, args, files = checked_model(path, say=True)
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
    if prepare is not None:
        prepare(model)
    model.to_empty(device=device)
    if args.tie_word_embeddings:
        # one Parameter again (to_empty makes two)
        model.lm_head.weight = model.model.embed_tokens.weight
    params = {n: p for n, p in model.named_parameters() if not n.endswith((".lora_A", ".lora_B"))}
    for file in files:
        with read_safetensors(path, file) as f:
            for name in f.keys():
                if name in params:  # a tied checkpoint's second copy of the head is not
                    load_into(params[name], f.get_tensor(name))
    for module in model.modules():
        if isinstance(module, LoRALinear):
            module.reset_lora()
    return model


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "generation_config.json",
)


def save_pretrained(
    model: Transformer, path, tokenizer_dir=None, state_dict=None, max_shard_bytes=5 * 2**30
):
    """Write config.json and model.safetensors (sharded with an index above max_shard_bytes),
    loadable by transformers' class of the family (LlamaForCausalLM, Gemma2ForCausalLM, ...). A tied
    LM head is written once, as model.embed_tokens.weight. state_dict (name -> full CPU tensor, or
    an iterable of (name, tensor) pairs) replaces model.state_dict(), for callers that gather it:
    pairs are consumed one shard at a time, so only one shard is held at once. Every file is written
    to a temporary name and renamed, so a crash never leaves a half-written file."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    pairs = state.items() if isinstance(state, dict) else state
    shard, size, parts, weight_map, total, dtype = {}, 0, [], {}, 0, None

    def write(shard):  # each shard under a temporary name until the count of shards is known
        parts.append(path / f"model-{len(parts) + 1:05d}.safetensors.tmp")
        save_file(shard, str(parts[-1]), metadata={"format": "pt"})

    for name, t in pairs:
        if model.args.tie_word_embeddings and name == "lm_head.weight":
            continue
        t = t.detach().cpu().contiguous()
        nbytes, dtype = t.numel() * t.element_size(), t.dtype
        if shard and size + nbytes > max_shard_bytes:
            write(shard)
            shard, size = {}, 0
        shard[name], size, total = t, size + nbytes, total + nbytes
        weight_map[name] = len(parts)
    write(shard)
    names = [f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors" for i in range(len(parts))]
    if len(parts) == 1:
        names = ["model.safetensors"]
    for part, name in zip(parts, names):
        os.replace(part, path / name)
    if len(parts) > 1:
        weight_map = {k: names[i] for k, i in weight_map.items()}
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_json(path / "model.safetensors.index.json", index)
    write_json(path / "config.json", model.args.to_hf_config(dtype))
    if tokenizer_dir is not None:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).is_file():
                with atomic_path(path / name) as tmp:
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp)


# ----------------------------------------------------------------------------- generation


@torch.no_grad()
def generate(
    model: Transformer,
    prompt_ids,
    max_new_tokens,
    temperature=0.0,
    top_p=1.0,
    eos_ids=(),
    seed=None,
    compile=None,
):
    """The new tokens of each prompt (a list of token-id lists, any lengths) that a Transformer
    continues, each ending with the EOS token when one was produced: greedy at temperature 0, else
    sampled from softmax(logits / temperature) cut to the smallest set of tokens with probability
    >= top_p.

    Prompts are left-padded; positions count real tokens only, so padding is masked out of attention
    (attention_mask) and each row continues exactly as it would alone. The prompts run in one
    forward (no mask when no row is padded); then each step decodes one token a row (decode_step)
    over a KV cache preallocated for P + max_new_tokens positions. compile: a torch.compile backend
    for that step ("inductor"; tests use "aot_eager"), or None: eager; its slot and positions are
    tensors, so one graph serves every step. A row that produced an EOS token leaves the batch (its
    cache rows are dropped). Each step's noise is drawn for all B rows and the rows still decoding
    keep theirs, so no row's tokens depend on when others end. One host sync a step: its new ids.
    """
    device, V = model.lm_head.weight.device, model.args.vocab_size
    B, P = len(prompt_ids), max(len(p) for p in prompt_ids)
    ids = torch.tensor([[0] * (P - len(p)) + p for p in prompt_ids], device=device)  # (B, P)
    pad = torch.tensor([P - len(p) for p in prompt_ids], device=device)[:, None]  # (B, 1)
    positions = None  # no padding: positions 0, 1, ... and causal attention, the model's defaults
    if len(set(map(len, prompt_ids))) > 1:
        positions = (torch.arange(P, device=device) - pad).clamp(min=0)  # (B, P); padding's: 0
    cache = KVCache(model.args, B, P + max_new_tokens, model.lm_head.weight.dtype, device)
    last = torch.arange(B, device=device) * P + P - 1  # (B,) each row's last token: LM head there
    logits = model(ids, positions=positions, cache=cache, logits_at=last).float()  # (B, V)
    cache.slot, positions = torch.tensor([P], device=device), P - pad  # the first new token's
    step = decode_step if compile is None else compiled(decode_step, compile)
    gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
    stop, out = set(eos_ids), [[] for _ in range(B)]
    rows, live = list(range(B)), torch.arange(B, device=device)  # the rows still decoding
    for t in range(max_new_tokens):
        noise = None
        if temperature != 0.0:  # (B, V) Exp(1) draws, the live rows'
            noise = torch.empty(B, V, device=device).exponential_(generator=gen)[live]
        next_id = _sample(logits, temperature, top_p, noise)  # (len(rows),)
        for i, token in zip(rows, next_id.tolist()):  # the step's one host-device sync
            out[i].append(token)
        keep = [k for k, i in enumerate(rows) if out[i][-1] not in stop]
        if not keep or t == max_new_tokens - 1:
            break
        if len(keep) < len(rows):  # finished rows leave the batch
            kept = torch.tensor(keep, device=device)
            cache.keep(kept)
            next_id, positions, live = (t.index_select(0, kept) for t in (next_id, positions, live))
            rows = [rows[k] for k in keep]
        logits = step(model, next_id[:, None], positions, cache)  # (len(rows), V)
        cache.slot, positions = cache.slot + 1, positions + 1
    return out


def decode_step(model: Transformer, ids, positions, cache: KVCache):
    """One token a row: ids (B, 1) at positions (B, 1), written at cache.slot -> logits (B, V),
    fp32. No Python number in it changes from step to step: torch.compile(fullgraph=True) traces it
    once."""
    return model(ids, positions=positions, cache=cache)[:, 0].float()


@lru_cache(maxsize=None)
def compiled(fn, backend):
    """torch.compile(fn, fullgraph=True) on backend, made once per process (its graphs are kept)."""
    return torch.compile(fn, backend=backend, fullgraph=True)


def _sample(logits, temperature, top_p, noise=None):
    """Next ids (B,) from logits (B, V), on the device: no host sync (torch.multinomial reads its
    input's range back to check it). Sampling reads noise (B, V), Exp(1) draws; greedy, none."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # tokens after the top-p mass is reached
    outside = sorted_probs.cumsum(-1) - sorted_probs >= top_p
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    # p_i / q_i with q_i ~ Exp(1) peaks at i with probability p_i / sum p: torch.multinomial's own
    # one-sample draw
    choice = (sorted_probs / noise).argmax(-1, keepdim=True)
    return order.gather(-1, choice).squeeze(-1)
