"""model.py against transformers' LlamaForCausalLM: same logits, same gradients, same checkpoints,
same tokens.
"""

import ast
import json
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import model as M
from data import InputError

ROOT = Path(__file__).resolve().parent.parent
aten = torch.ops.aten

SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=101,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
CONFIGS = {
    "mha": {},
    "gqa": dict(num_key_value_heads=2, rope_theta=100000.0),
    "llama3_rope": dict(
        num_key_value_heads=2,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=16,
        ),
    ),
    "tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "head_dim": dict(head_dim=24, num_key_value_heads=2),
}


def randomize(module: torch.nn.Module, seed=0):
    """Draw every parameter (norms and biases too) at random, so no zero bias or unit norm hides a
    bug.
    """
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(
                torch.empty_like(p).uniform_(0.5, 1.5)
                if "norm" in name
                else torch.randn_like(p) * 0.1
            )
    return module.eval()


def hf_random_model(overrides, seed=0) -> LlamaForCausalLM:
    cfg = LlamaConfig(**{**SMALL, **overrides}, attn_implementation="eager")
    return randomize(LlamaForCausalLM(cfg).float(), seed)


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_gradients_equal_transformers(name, tmp_path):
    hf = hf_random_model(CONFIGS[name])
    hf.save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(1))
    targets = torch.randint(
        0, SMALL["vocab_size"], (3, 40), generator=torch.Generator().manual_seed(2)
    )

    hf_logits = hf(ids).logits
    our_logits = ours(ids)
    assert (our_logits - hf_logits).abs().max().item() <= 1e-5

    F.cross_entropy(hf_logits.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(our_logits.flatten(0, 1), targets.flatten()).backward()
    hf_grads = dict(hf.named_parameters())
    for pname, p in ours.named_parameters():
        assert (p.grad - hf_grads[pname].grad).abs().max().item() <= 1e-5, pname


def test_a_head_receives_the_final_norm_output_transformers_exposes(tmp_path):
    hf = hf_random_model(CONFIGS["gqa"])
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 17))
    hidden = M.load_pretrained(tmp_path)(ids, head=lambda h, w, softcap: h)
    hf_hidden = hf(ids, output_hidden_states=True).hidden_states[-1]
    assert hidden.shape == (2, 17, SMALL["hidden_size"])
    assert (hidden - hf_hidden).abs().max().item() <= 1e-5


def test_logits_at_positions_are_those_rows_of_the_full_logits(tmp_path):
    hf_random_model(CONFIGS["gqa"]).save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (3, 20))
    at = torch.rand(3, 20, generator=torch.Generator().manual_seed(0)) < 0.5
    index = at.flatten().nonzero()[:, 0]  # the same positions as indices into the flattened rows
    assert torch.allclose(ours(ids, logits_at=index), ours(ids)[at], atol=1e-6)


def test_tied_checkpoint_loads_tied_and_is_saved_once(tmp_path):
    hf_random_model(CONFIGS["tied"]).save_pretrained(tmp_path / "hf")
    ours = M.load_pretrained(tmp_path / "hf")
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    M.save_pretrained(ours, tmp_path / "ours")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys() and f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("name", ["gqa", "tied", "llama3_rope", "bias"])
def test_save_then_transformers_load_gives_same_logits(name, tmp_path):
    args = M.ModelArgs.from_hf_config(LlamaConfig(**{**SMALL, **CONFIGS[name]}).to_dict())
    ours = randomize(M.Transformer(args))
    M.save_pretrained(ours, tmp_path)
    hf = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    ids = torch.randint(0, SMALL["vocab_size"], (2, 33))
    assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-5


def test_sharded_checkpoint_loads_equal_to_single_file(tmp_path):
    torch.manual_seed(0)
    ours = M.Transformer(M.ModelArgs.from_hf_config(LlamaConfig(**SMALL).to_dict()))
    M.save_pretrained(ours, tmp_path / "one")
    M.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    one, sharded = M.load_pretrained(tmp_path / "one"), M.load_pretrained(tmp_path / "sharded")
    for (n1, p1), (n2, p2) in zip(one.state_dict().items(), sharded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "sharded")
    for name, p in hf.state_dict().items():
        assert torch.equal(p, one.state_dict()[name]), name


class HeadersOnly:
    """model.py's safe_open with the header alone: keys, metadata, each tensor's shape and dtype;
    reading a tensor (get_tensor, or a slice's data) fails the test."""

    real = staticmethod(M.safe_open)

    def __init__(self, *args, **kwargs):
        self.file = self.real(*args, **kwargs)

    def __enter__(self):
        self.file.__enter__()
        return self

    def __exit__(self, *exc):
        return self.file.__exit__(*exc)

    def keys(self):
        return self.file.keys()

    def metadata(self):
        return self.file.metadata()

    def get_slice(self, name):
        part = self.file.get_slice(name)
        return SimpleNamespace(get_shape=part.get_shape, get_dtype=part.get_dtype)

    def get_tensor(self, name):
        pytest.fail(f"{name} read before the checks")


@pytest.mark.parametrize(
    "change, expected",
    [
        (
            {"num_hidden_layers": 3},
            "model.safetensors: model.layers.2.input_layernorm.weight: missing and 8 more; ",
        ),
        (
            {"intermediate_size": 90},
            "model.safetensors: model.layers.0.mlp.gate_proj.weight: shape (96, 64), but config.json "
            "makes it (90, 64)",
        ),
        (
            {"num_hidden_layers": 1},
            "model.safetensors: model.layers.1.input_layernorm.weight: not a parameter of the model "
            "config.json describes",
        ),
        (
            torch.int8,
            "model.safetensors: model.norm.weight: expected a floating-point dtype (F32, F16, BF16, "
            "F64), got I8",
        ),
        (torch.bool, "model.safetensors: model.norm.weight: expected a floating-point dtype"),
    ],
)
def test_checkpoint_mismatch_is_one_line_naming_the_file_and_tensor_before_any_weight_is_read(
    change, expected, tmp_path, monkeypatch
):
    hf_random_model(CONFIGS["mha"]).save_pretrained(tmp_path)
    if isinstance(change, torch.dtype):  # model.norm.weight stored in this dtype
        weights = load_file(tmp_path / "model.safetensors")
        weights["model.norm.weight"] = weights["model.norm.weight"].to(change)
        save_file(weights, tmp_path / "model.safetensors")
    else:
        cfg = json.loads((tmp_path / "config.json").read_text())
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
    monkeypatch.setattr(M, "safe_open", HeadersOnly)
    with pytest.raises(InputError) as e:
        M.load_pretrained(tmp_path)
    assert str(e.value).startswith(f"{tmp_path / expected}"), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "field,value,expected",
    [
        ("model_type", "phi3", "model_type"),
        ("rope_scaling", {"type": "yarn", "factor": 4.0}, "rope_scaling.rope_type"),
        ("hidden_act", "gelu", "hidden_act"),
    ],
)
def test_unsupported_config_is_an_error_naming_the_field(field, value, expected):
    cfg = {**LlamaConfig(**SMALL).to_dict(), field: value}
    with pytest.raises(InputError, match=expected):
        M.ModelArgs.from_hf_config(cfg)


def test_mistral_without_sliding_window_loads_as_the_same_architecture(tmp_path):
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(
        **{**SMALL, "num_key_value_heads": 2}, sliding_window=None, attn_implementation="eager"
    )
    hf = randomize(MistralForCausalLM(cfg).float())
    hf.save_pretrained(tmp_path)
    ids = torch.randint(0, SMALL["vocab_size"], (2, 30))
    assert (M.load_pretrained(tmp_path)(ids) - hf(ids).logits).abs().max().item() <= 1e-5


def test_old_rope_scaling_key_type_is_accepted():
    cfg = {
        **LlamaConfig(**SMALL).to_dict(),
        "rope_scaling": {
            "type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    }
    assert M.ModelArgs.from_hf_config(cfg).rope_scaling["rope_type"] == "llama3"


def test_pickled_checkpoints_are_never_read(tmp_path):
    hf = hf_random_model(CONFIGS["mha"])
    hf.config.save_pretrained(tmp_path)
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(InputError, match="model.safetensors"):
        M.load_pretrained(tmp_path)


def test_batched_generation_of_unequal_prompts_equals_one_at_a_time(tmp_path):
    hf_random_model(CONFIGS["gqa"]).save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3, 2, 11], [3]]
    batched = M.generate(ours, prompts, max_new_tokens=12)
    alone = [M.generate(ours, [p], max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    hf_alone = [hf_greedy(LlamaForCausalLM.from_pretrained(tmp_path), p, 12) for p in prompts]
    assert alone == hf_alone


def hf_greedy(hf, prompt, max_new_tokens, eos=None):
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def test_generation_stops_at_eos_and_includes_it(tmp_path):
    hf_random_model(CONFIGS["mha"]).save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    free = M.generate(ours, [[1, 2, 3]], max_new_tokens=10)[0]
    eos = free[4]
    stopped = M.generate(ours, [[1, 2, 3]], max_new_tokens=10, eos_ids=[eos])[0]
    assert stopped == free[: free.index(eos) + 1]


def test_top_p_sampling_only_draws_from_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    gen = torch.Generator().manual_seed(0)
    draws = {
        M._sample(logits, 1.0, 0.7, torch.empty(1, 4).exponential_(generator=gen)).item()
        for _ in range(300)
    }
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are outside


def test_top_p_sampling_draws_each_token_of_the_nucleus_in_proportion():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    noise = torch.empty(20000, 4).exponential_(generator=torch.Generator().manual_seed(0))
    draws = M._sample(logits, 1.0, 0.9, noise)  # nucleus 0, 1, 2: 0.95 of the mass
    share = torch.bincount(draws, minlength=4) / len(draws)
    assert torch.allclose(share, torch.tensor([0.5, 0.3, 0.15, 0.0]) / 0.95, atol=0.015)


class HostSyncs(TorchDispatchMode):
    """Counts the ops after which the host waits for the device: reading values back
    (aten._local_scalar_dense: .item(), bool(), int()), and ops whose output size or validity
    depends on values (nonzero, masked_select, boolean-mask indexing, unique, repeat_interleave
    without output_size; torch.multinomial, which checks its input's range on the host). `.tolist()`
    of a CPU tensor dispatches no op: `spy_tolist` counts it."""

    VALUE_SIZED = {
        aten._local_scalar_dense,
        aten.nonzero,
        aten.masked_select,
        aten.multinomial,
        aten._unique2,
        aten.unique_consecutive,
        aten.repeat_interleave,
    }

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        masked = func.overloadpacket in (aten.index, aten.index_put, aten.index_put_) and any(
            i is not None and i.dtype == torch.bool for i in args[1]
        )
        self.count += masked or func.overloadpacket in self.VALUE_SIZED
        return func(*args, **(kwargs or {}))

    def spy_tolist(self, monkeypatch):
        real = torch.Tensor.tolist

        def tolist(t):
            self.count += 1
            return real(t)

        monkeypatch.setattr(torch.Tensor, "tolist", tolist)


@pytest.mark.parametrize(
    "prompts",
    [[[5, 9, 2, 7]], [[5, 9, 2, 7], [1, 4, 4, 8]], [[5, 9, 2], [7, 1, 4, 4, 8]]],
    ids=["one", "same-length", "padded"],
)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generation_syncs_with_the_host_once_per_new_token_and_masks_padding_and_unwritten_keys(
    prompts, temperature, monkeypatch, tmp_path
):
    hf_random_model(CONFIGS["gqa"]).save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    # the mask of every attention call (2 layers a step)
    masks, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(
        F,
        "scaled_dot_product_attention",
        lambda *a, attn_mask=None, **k: (
            masks.append(attn_mask) or sdpa(*a, attn_mask=attn_mask, **k)
        ),
    )
    syncs = HostSyncs()
    syncs.spy_tolist(monkeypatch)
    with syncs:
        new = M.generate(
            ours, prompts, max_new_tokens=6, temperature=temperature, top_p=0.9, seed=0
        )
    assert [len(n) for n in new] == [6] * len(prompts)  # no EOS: the prompts, then 5 decoding steps
    assert syncs.count == 6
    B, P = len(prompts), max(map(len, prompts))
    pads = [P - len(p) for p in prompts]
    if len(set(pads)) == 1:  # the prompts: plain causal attention
        assert masks[:2] == [None] * 2
    else:  # (B, 1, T, S) bool: 2 padding tokens, each sees itself
        assert [tuple(m.shape) for m in masks[:2]] == [(2, 1, 2 * 5, 5)] * 2  # for 2 heads a group
        assert masks[0][0, 0, :5].tolist() == [
            [True] + [False] * 4,
            [False, True] + [False] * 3,
        ] + [[False, False] + [j <= i for j in range(3)] for i in range(3)]
    # each step: its one query over the whole cache of P + 6 keys, its row's own tokens so far alone
    for k in range(5):
        for layer in range(2):
            mask = masks[2 + 2 * k + layer]
            assert tuple(mask.shape) == (B, 1, 1, P + 6)
            assert mask[:, 0, 0].tolist() == [
                [pad <= j <= P + k for j in range(P + 6)] for pad in pads
            ]


def test_decoding_with_grouped_heads_copies_no_key_or_value(tmp_path):
    """At a decoding step the 4 query heads of the "gqa" config (2 key/value heads) attend to the
    cache as it is: no op makes a tensor the size of the keys or values expanded to 4 heads
    (B, 4, S, hd), padded rows or not; and each step's logits are those of the whole sequence in one
    causal forward, position by position."""
    hf_random_model(CONFIGS["gqa"]).save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    hd = SMALL["hidden_size"] // SMALL["num_attention_heads"]

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes = [
                tuple(t.shape)
                for t in torch.utils._pytree.tree_leaves(out)
                if isinstance(t, torch.Tensor)
            ]
            self.ops.append((func.overloadpacket, shapes))
            return out

    logits, real = [], M.decode_step

    def spy(model, ids, positions, cache):
        with Sizes() as sizes:
            sizes.ops = []
            out = real(model, ids, positions, cache)
        B, S = ids.shape[0], cache.k[0].shape[2]
        assert not [
            op
            for op, shapes in sizes.ops
            if (B, 4, S, hd) in shapes or op == aten.repeat_interleave
        ]
        logits.append(out)
        return out

    for prompts in ([[5, 9, 2, 7], [1, 4, 4, 8]], [[5, 9, 2], [7, 1, 4, 4, 8, 3]]):
        logits.clear()
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(M, "decode_step", spy)
            new = M.generate(ours, prompts, max_new_tokens=5)
        assert len(logits) == 4
        for r, (p, n) in enumerate(zip(prompts, new)):
            alone = ours(torch.tensor([p + n]))[0, len(p) : -1]  # (4, V): after new tokens 1..4
            assert (torch.stack([step[r] for step in logits]) - alone).abs().max().item() <= 1e-5


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_finished_rows_leave_the_batch_and_the_others_decode_as_before(temperature, tmp_path):
    """With an EOS token, each row's tokens are the row's tokens without one, cut after its first
    EOS, greedy or sampled with a seed (each step's noise is drawn for the whole batch and a row
    keeps its own); and a row stops costing anything once it ended: the positions computed (token
    ids entering the embedding) are the prompts' B P, then one per decoded token of a row still
    running, not B a step until the last row ends."""
    hf_random_model(CONFIGS["gqa"]).save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    prompts = [[5, 9, 2], [7, 1, 4, 4, 8, 3], [3], [2, 2, 6, 1]]
    free = M.generate(ours, prompts, max_new_tokens=12, temperature=temperature, seed=3)
    ends = lambda t: {n.index(t) if t in n else 12 for n in free}  # noqa: E731
    eos = max(sorted(set(sum(free, []))), key=lambda t: len(ends(t)))  # ends rows most apart
    expected = [n[: n.index(eos) + 1] if eos in n else n for n in free]
    assert len({len(n) for n in expected}) > 2  # rows end at different steps
    counted = [0]
    hook = ours.model.embed_tokens.register_forward_hook(
        lambda m, i, o: counted.__setitem__(0, counted[0] + i[0].numel())
    )
    stopped = M.generate(
        ours, prompts, max_new_tokens=12, temperature=temperature, eos_ids=[eos], seed=3
    )
    hook.remove()
    assert stopped == expected
    B, P = len(prompts), max(map(len, prompts))
    every_step = B * P + B * (max(map(len, expected)) - 1)  # had no row left the batch
    assert counted[0] == B * P + sum(len(n) - 1 for n in expected) < every_step


@pytest.mark.parametrize(
    "prompts",
    [[[5, 9, 2, 7], [1, 4, 4, 8]], [[5, 9, 2], [7, 1, 4, 4, 8, 3], [4]]],
    ids=["same-length", "padded"],
)
def test_compiled_decoding_gives_the_eager_tokens_with_one_graph_for_every_step(prompts, tmp_path):
    """generate(compile=...) with the aot_eager backend (dynamo's graph, run by eager kernels) gives
    greedy decoding's tokens, and dynamo compiles the decoding step once (fullgraph: no break) for
    all 7 steps."""
    from torch._dynamo.testing import CompileCounterWithBackend

    hf_random_model(CONFIGS["gqa"]).save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    assert M.generate(ours, prompts, 8, compile=counter) == M.generate(ours, prompts, 8)
    assert counter.frame_count == 1


def test_smollm2_logits_match_transformers(smollm2_dir):
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    ours = M.load_pretrained(smollm2_dir)
    ids = torch.randint(0, 49152, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max().item() <= 1e-4


def test_smollm2_greedy_chatml_generation_matches_transformers(smollm2_dir):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    prompt = tok.encode(
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ).ids
    ours = M.generate(M.load_pretrained(smollm2_dir), [prompt], max_new_tokens=24, eos_ids=[2])[0]
    hf = hf_greedy(AutoModelForCausalLM.from_pretrained(smollm2_dir), prompt, 24, eos=2)
    assert ours == hf
    assert "Paris" in tok.decode(ours)


def test_main_files_never_import_transformers():
    allowed = {
        "torch",
        "numpy",
        "safetensors",
        "tokenizers",
        "tqdm",
        "model",
        "data",
        "sftmix",
        "train",
        "eval",
    }
    # an optional extra, imported where used, with a one-line message naming what to install when
    # missing: pyarrow for parquet data (matplotlib, for the pictures, is scripts/report.py's)
    optional = {"data.py": {"pyarrow"}}
    for file in [
        "model.py",
        "data.py",
        "sftmix.py",
        "train.py",
        "eval.py",
    ]:
        for node in ast.walk(ast.parse((ROOT / file).read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = (
                    [a.name for a in node.names]
                    if isinstance(node, ast.Import)
                    else [node.module or ""]
                )
                for n in names:
                    top = n.split(".")[0]
                    ok = (
                        top in allowed | optional.get(file, set()) or top in sys.stdlib_module_names
                    )
                    assert ok, f"{file}: {n}"


def corrupt(kind: str, data: bytes) -> bytes:
    return {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "garbage": bytes(range(256)) * 4,
        "not an object": b"[1, 2]",
    }[kind]


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sharded")
    M.save_pretrained(
        M.Transformer(M.ModelArgs.from_hf_config(LlamaConfig(**SMALL).to_dict())),
        path,
        max_shard_bytes=40_000,
    )
    return path


@pytest.mark.parametrize("kind", ["empty", "truncated", "garbage", "not an object"])
@pytest.mark.parametrize(
    "file", ["config.json", "model.safetensors.index.json", "model-00002-of-00012.safetensors"]
)
def test_every_corrupted_checkpoint_file_is_one_error_line_naming_it(
    file, kind, sharded_dir, tmp_path
):
    if kind == "not an object" and file.endswith(".safetensors"):
        kind = "garbage"
    shutil.copytree(sharded_dir, tmp_path / "m")
    assert (tmp_path / "m" / file).is_file()
    (tmp_path / "m" / file).write_bytes(corrupt(kind, (tmp_path / "m" / file).read_bytes()))
    with pytest.raises(InputError) as e:
        M.load_pretrained(tmp_path / "m")
    assert str(e.value).startswith(f"{tmp_path / 'm' / file}: ") and "\n" not in str(e.value), str(
        e.value
    )


def test_missing_shard_and_bad_weight_map_are_one_line_naming_the_file(sharded_dir, tmp_path):
    shutil.copytree(sharded_dir, tmp_path / "m")
    (tmp_path / "m" / "model-00003-of-00012.safetensors").unlink()
    with pytest.raises(
        InputError,
        match=f"^{tmp_path / 'm' / 'model-00003-of-00012.safetensors'}: not found; "
        "model.safetensors.index.json lists it$",
    ):
        M.load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(
        '{"weight_map": ["model.safetensors"]}'
    )
    with pytest.raises(
        InputError,
        match=f"^{tmp_path / 'm' / 'model.safetensors.index.json'}: weight_map: expected",
    ):
        M.load_pretrained(tmp_path / "m")


def test_a_run_directory_names_its_final_checkpoint(sharded_dir, tmp_path):
    shutil.copytree(sharded_dir, tmp_path / "run" / "final")
    (tmp_path / "run" / "state").mkdir()
    assert M.model_dir(tmp_path / "run") == tmp_path / "run" / "final"
    assert M.model_dir(sharded_dir) == sharded_dir
    one, run = M.load_pretrained(sharded_dir), M.load_pretrained(tmp_path / "run")
    assert all(
        torch.equal(p, q) for p, q in zip(one.state_dict().values(), run.state_dict().values())
    )
    with pytest.raises(
        InputError,
        match=f"^{tmp_path}: config.json: not found; expected an HF model directory or "
        f"a run directory with final/$",
    ):
        M.load_pretrained(tmp_path)
