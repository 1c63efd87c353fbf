"""The paper's other families against transformers' own classes: Qwen2 (Qwen2.5), Mistral with its
sliding window, Gemma and Gemma 2 give the same logits, gradients, checkpoints and generations;
weak-to-strong crosses families."""

import dataclasses
import json
import typing

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY
from test_data import family_tokenizer_dir
from test_model import hf_greedy, randomize
from test_train import COMMON, cli, run_train
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    Gemma2Config,
    GemmaConfig,
    LlamaConfig,
    MistralConfig,
    Qwen2Config,
)
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, RopeParameters

import data
import model as M
import sftmix
from data import InputError

V = 101
BASE = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    vocab_size=V,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    bos_token_id=None,
    eos_token_id=None,
    # a pad token's embedding row gets no gradient in transformers: see the test below
    pad_token_id=None,
)
# two random configs a family: tied and untied heads, GQA and MQA, windows shorter than the
# sequences
CONFIGS = {
    "qwen2-gqa": (
        Qwen2Config,
        dict(num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False),
    ),
    "qwen2-mqa-tied": (Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral-window8-gqa": (MistralConfig, dict(num_key_value_heads=2, sliding_window=8)),
    "mistral-window5-mqa-tied": (
        MistralConfig,
        dict(num_key_value_heads=1, sliding_window=5, tie_word_embeddings=True),
    ),
    "gemma-mha-tied": (GemmaConfig, dict(num_key_value_heads=4, head_dim=24)),
    "gemma-mqa": (GemmaConfig, dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)),
    "gemma2-window8-gqa-tied": (
        Gemma2Config,
        dict(num_key_value_heads=2, head_dim=16, sliding_window=8, query_pre_attn_scalar=16),
    ),
    "gemma2-window6-mqa": (
        Gemma2Config,
        dict(
            num_key_value_heads=1,
            head_dim=24,
            sliding_window=6,
            query_pre_attn_scalar=20,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            tie_word_embeddings=False,
        ),
    ),
}  # small caps (2, 3) so that they bite: random logits stay far below Gemma 2's own 50 and 30
T = 40  # tokens per sequence: several windows long


def hf_model(name, seed=0, **overrides):
    cls, extra = CONFIGS[name]
    cfg = cls(**{**BASE, **extra, **overrides}, attn_implementation="eager")
    return randomize(AutoModelForCausalLM.from_config(cfg).float(), seed)


def ids_and_targets(batch=3, length=T):
    return (
        torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(1)),
        torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(2)),
    )


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_and_gradients_equal_transformers(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    assert M.FAMILIES[ours.args.model_type][0] == type(hf).__name__
    ids, targets = ids_and_targets()

    hf_logits = hf(ids).logits
    our_logits = ours(ids)
    assert (our_logits - hf_logits).abs().max().item() <= 1e-5
    at = torch.rand(ids.shape, generator=torch.Generator().manual_seed(3)) < 0.5
    assert (
        ours(ids, logits_at=at.flatten().nonzero()[:, 0]) - hf_logits[at]
    ).abs().max().item() <= 1e-5

    F.cross_entropy(hf_logits.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(our_logits.flatten(0, 1), targets.flatten()).backward()
    hf_grads = dict(hf.named_parameters())
    assert {n for n, _ in ours.named_parameters()} == set(hf_grads)
    for pname, p in ours.named_parameters():
        assert (p.grad - hf_grads[pname].grad).abs().max().item() <= 1e-5, pname


@pytest.mark.parametrize("name", ["qwen2-mqa-tied", "gemma-mha-tied", "gemma2-window8-gqa-tied"])
@pytest.mark.parametrize("head", ["the embedding again", "another matrix"])
def test_a_tied_config_whose_checkpoint_holds_a_head_loads_as_transformers_loads_it(
    name, head, tmp_path, capsys
):
    """config.json says tie_word_embeddings true, the checkpoint also holds lm_head.weight:
    transformers keeps a different head untied (and warns), the same matrix tied. Logits and the
    response NLL equal transformers', and what save_pretrained writes back loads in transformers to
    the same logits."""
    from safetensors.torch import load_file, save_file

    hf_model(name).save_pretrained(tmp_path / "m")
    tensors = load_file(tmp_path / "m" / "model.safetensors")
    embed = tensors["model.embed_tokens.weight"]
    other = torch.randn(embed.shape) * 0.1
    tensors["lm_head.weight"] = embed.clone() if head == "the embedding again" else other
    save_file(tensors, str(tmp_path / "m" / "model.safetensors"), metadata={"format": "pt"})
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is True

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "m", attn_implementation="eager").eval()
    hf_tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert hf_tied == (head == "the embedding again")  # transformers' behaviour, which ours matches
    ours = M.load_pretrained(tmp_path / "m")
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == hf_tied
    assert ("lm_head.weight differs" in capsys.readouterr().err) == (not hf_tied)
    ids, targets = ids_and_targets()
    with torch.no_grad():
        hf_logits, our_logits = hf(ids).logits, ours(ids)
        assert (our_logits - hf_logits).abs().max().item() <= 1e-5
        nll = [
            F.cross_entropy(z.flatten(0, 1), targets.flatten()).item()
            for z in (hf_logits, our_logits)
        ]
        assert nll[1] == pytest.approx(nll[0], abs=1e-5)
        M.save_pretrained(ours, tmp_path / "ours")
        again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", attn_implementation="eager")
        assert (again(ids).logits - hf_logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "name", ["qwen2-gqa", "mistral-window5-mqa-tied", "gemma-mqa", "gemma2-window8-gqa-tied"]
)
def test_checkpoints_load_both_ways_as_the_familys_class_single_and_sharded(name, tmp_path):
    cls, extra = CONFIGS[name]
    ours = randomize(M.Transformer(M.ModelArgs.from_hf_config(cls(**BASE, **extra).to_dict())))
    ids, _ = ids_and_targets(2)
    M.save_pretrained(ours, tmp_path / "one")
    M.save_pretrained(ours, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    for d in ("one", "sharded"):
        hf = AutoModelForCausalLM.from_pretrained(tmp_path / d, attn_implementation="eager").eval()
        assert (
            type(hf).__name__
            == M.FAMILIES[ours.args.model_type][0]
            == f"{cls.__name__[:-6]}ForCausalLM"
        )
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-5

    hf = hf_model(name, seed=1)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert (
        len(
            set(
                json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())[
                    "weight_map"
                ].values()
            )
        )
        > 2
    )
    assert (M.load_pretrained(tmp_path / "hf")(ids) - hf(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["mistral-window5-mqa-tied", "gemma2-window6-mqa"])
def test_generation_past_the_window_equals_transformers_and_batching(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    # the longest already past the window
    prompts = [[5, 9, 2, 7], [7, 1, 4, 4, 8, 3, 2, 11, 6, 3], [3]]
    batched = M.generate(ours, prompts, max_new_tokens=14)
    alone = [M.generate(ours, [p], max_new_tokens=14)[0] for p in prompts]
    assert batched == alone
    assert alone == [hf_greedy(hf, p, 14) for p in prompts]


@pytest.mark.parametrize("name", ["mistral-window5-mqa-tied", "gemma2-window6-mqa"])
def test_packed_sequences_with_a_sliding_window_each_compute_as_alone(name, tmp_path):
    hf_model(name).save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    seqs = [
        torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (13, 4, 20)
    ]
    positions = torch.cat([torch.arange(len(s)) for s in seqs])[None]  # restarting at each sequence
    alone = torch.cat([ours(s[None])[0] for s in seqs])
    # padded sequences, or the whole-row mask
    for layout in (data.packing([len(s) for s in seqs]), None):
        packed = ours(torch.cat(seqs)[None], positions=positions, seqs=layout)[0]
        assert (packed - alone).abs().max().item() <= 1e-5


def test_pad_token_embedding_row_trains_here_but_not_in_transformers(tmp_path):
    """transformers builds nn.Embedding(padding_idx=pad_token_id): the pad token's embedding row
    gets no gradient from the input lookup. Here every row trains (docs/training.md); all other gradients are
    the same."""
    hf = hf_model("gemma-mqa", pad_token_id=0)
    hf.save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    ids, targets = ids_and_targets()
    ids[:, 5] = 0  # the pad token inside the text
    for m in (hf, ours):
        logits = m(ids).logits if m is hf else m(ids)
        F.cross_entropy(logits.flatten(0, 1), targets.flatten()).backward()
    hf_grads = dict(hf.named_parameters())
    for pname, p in ours.named_parameters():
        rows = slice(1, None) if pname == "model.embed_tokens.weight" else slice(None)
        assert (p.grad[rows] - hf_grads[pname].grad[rows]).abs().max().item() <= 1e-5, pname
    assert hf_grads["model.embed_tokens.weight"].grad[0].abs().max() == 0
    assert ours.model.embed_tokens.weight.grad[0].abs().max() > 1e-4


def test_mixup_with_a_soft_capped_head_mixes_logits_before_the_cap(tmp_path):
    """Gemma 2 caps its logits, cap(z) = c tanh(z / c), which is not linear. Mixup's CE of the mixed
    hidden state, CE(cap(W Z~), Y~), equals mixing the head's outputs and capping after: cap(lam W
    Z^c + (1 - lam) W Z^u) (sftmix.head_losses); mixing the capped logits instead would differ."""
    hf_model("gemma2-window6-mqa").save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    W = ours.lm_head.weight
    ids, targets = ids_and_targets(4, 20)
    labels = targets.clone()
    # responses of 14, 9, 14, 3
    labels[:, :6], labels[1, 15:], labels[3, 9:] = sftmix.IGNORE, sftmix.IGNORE, sftmix.IGNORE
    lam = torch.tensor([0.3, 0.8])  # pairs (row 0, row 2) and (row 1, row 3)
    hidden = ours(ids, head=lambda h, w, softcap: h)
    # (2, 20)
    rank_c, rank_u = (
        (labels[:2] != sftmix.IGNORE).cumsum(1),
        (labels[2:] != sftmix.IGNORE).cumsum(1),
    )
    n = torch.minimum(rank_c[:, -1], rank_u[:, -1])[:, None]  # each pair's mixed positions
    mask_c = (labels[:2] != sftmix.IGNORE) & (rank_c <= n)  # the first n response positions of each
    mask_u = (labels[2:] != sftmix.IGNORE) & (rank_u <= n)
    lam_pos = lam[:, None].expand(2, 20)[mask_c]  # (M,)
    # W Z~
    z_mixed = (
        lam_pos[:, None] * hidden[:2][mask_c] + (1 - lam_pos[:, None]) * hidden[2:][mask_u]
    ) @ W.T

    def soft_ce(z):  # (M,): lam CE(z, y^c) + (1 - lam) CE(z, y^u)
        return lam_pos * F.cross_entropy(z, labels[:2][mask_c], reduction="none") + (
            1 - lam_pos
        ) * F.cross_entropy(z, labels[2:][mask_u], reduction="none")

    hidden_form = soft_ce(ours.softcap(z_mixed))
    # tie the hidden-state form to sftmix.mixup_loss, which knows no cap
    uncapped = soft_ce(z_mixed).mean()
    assert uncapped.item() == pytest.approx(
        sftmix.mixup_loss(hidden[:2], labels[:2], hidden[2:], labels[2:], lam, W).item(), rel=1e-6
    )

    trained = labels != sftmix.IGNORE  # (4, 20): the model's N trained positions, row by row
    # (4, 20)
    number = torch.full(labels.shape, -1).masked_scatter(trained, torch.arange(int(trained.sum())))
    # (M,) each: the aligned positions among the N
    mix_c, mix_u = number[:2][mask_c], number[2:][mask_u]
    rest = torch.tensor(
        sorted(set(range(len(number[trained]))) - set(mix_c.tolist()) - set(mix_u.tolist()))
    )
    at = trained.flatten().nonzero()[:, 0]
    _, mixed = ours(
        ids,
        logits_at=at,
        head=lambda h, w, softcap: sftmix.head_losses(
            h, w, labels[trained], mix_c, mix_u, lam_pos, rest, softcap=softcap
        ),
    )
    assert (mixed - hidden_form).abs().max().item() <= 1e-5

    # the head's outputs before the cap
    z = ours(ids, logits_at=at, head=lambda h, w, softcap: h @ w.T)
    capped_then_mixed = torch.lerp(ours.softcap(z[mix_u]), ours.softcap(z[mix_c]), lam_pos[:, None])
    assert (soft_ce(capped_then_mixed) - hidden_form).abs().max().item() > 1e-3


# config.json of the paper's models (and the weak-to-strong reference), as their hubs publish them
PUBLISHED = {
    "Llama-3.1-8B": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        attention_bias=False,
        bos_token_id=128000,
        eos_token_id=128001,
        hidden_act="silu",
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=131072,
        mlp_bias=False,
        num_attention_heads=32,
        num_hidden_layers=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-05,
        rope_theta=500000.0,
        tie_word_embeddings=False,
        vocab_size=128256,
        rope_scaling=dict(
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
            rope_type="llama3",
        ),
    ),
    "Mistral-7B-v0.1": dict(
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        bos_token_id=1,
        eos_token_id=2,
        hidden_act="silu",
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=32768,
        num_attention_heads=32,
        num_hidden_layers=32,
        num_key_value_heads=8,
        rms_norm_eps=1e-05,
        rope_theta=10000.0,
        sliding_window=4096,
        tie_word_embeddings=False,
        vocab_size=32000,
    ),
    "Qwen2.5-14B": dict(
        architectures=["Qwen2ForCausalLM"],
        model_type="qwen2",
        bos_token_id=151643,
        eos_token_id=151643,
        hidden_act="silu",
        hidden_size=5120,
        intermediate_size=13824,
        max_position_embeddings=131072,
        max_window_layers=48,
        num_attention_heads=40,
        num_hidden_layers=48,
        num_key_value_heads=8,
        rms_norm_eps=1e-05,
        rope_theta=1000000.0,
        sliding_window=131072,
        tie_word_embeddings=False,
        use_sliding_window=False,
        vocab_size=152064,
    ),
    "gemma-2b": dict(
        architectures=["GemmaForCausalLM"],
        model_type="gemma",
        attention_bias=False,
        bos_token_id=2,
        eos_token_id=1,
        head_dim=256,
        hidden_act="gelu",
        hidden_size=2048,
        intermediate_size=16384,
        max_position_embeddings=8192,
        num_attention_heads=8,
        num_hidden_layers=18,
        num_key_value_heads=1,
        pad_token_id=0,
        rms_norm_eps=1e-06,
        rope_scaling=None,
        rope_theta=10000.0,
        vocab_size=256000,
    ),
    "gemma-2-2b": dict(
        architectures=["Gemma2ForCausalLM"],
        model_type="gemma2",
        attention_bias=False,
        attn_logit_softcapping=50.0,
        bos_token_id=2,
        cache_implementation="hybrid",
        eos_token_id=1,
        final_logit_softcapping=30.0,
        head_dim=256,
        hidden_act="gelu_pytorch_tanh",
        hidden_activation="gelu_pytorch_tanh",
        hidden_size=2304,
        intermediate_size=9216,
        max_position_embeddings=8192,
        num_attention_heads=8,
        num_hidden_layers=26,
        num_key_value_heads=4,
        pad_token_id=0,
        query_pre_attn_scalar=256,
        rms_norm_eps=1e-06,
        rope_theta=10000.0,
        sliding_window=4096,
        vocab_size=256000,
    ),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_build_the_same_parameters_and_attention_as_transformers(name):
    """Built on the meta device (no memory): the same parameter names and shapes as transformers'
    class from the same config.json, and the same layers sliding."""
    cfg = PUBLISHED[name]
    args = M.ModelArgs.from_hf_config(cfg)
    hf_cfg = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        ours, hf = M.Transformer(args), AutoModelForCausalLM.from_config(hf_cfg)
    assert {n: p.shape for n, p in ours.named_parameters()} == {
        n: p.shape for n, p in hf.named_parameters()
    }
    assert M.FAMILIES[args.model_type][0] == type(hf).__name__ == cfg["architectures"][0]
    L, W = args.num_hidden_layers, args.sliding_window
    windows = [
        W
        if W is not None
        and (args.layer_types is None or args.layer_types[i] == "sliding_attention")
        else None
        for i in range(L)
    ]
    hf_windows = [
        getattr(layer.self_attn, "sliding_window", getattr(hf_cfg, "sliding_window", None))
        # Mistral's layers read the config's; Gemma 2's and Qwen2's, their own
        for layer in hf.model.layers
    ]
    assert windows == hf_windows
    print(name, f"{sum(p.numel() for p in ours.parameters()) / 1e9:.2f}B parameters")


def test_weak_to_strong_dynamics_of_a_gemma2_reference_train_sftmix_on_llama(
    smollm2_dir, tiny_model_dir, chat_data, tmp_path
):
    """As the paper: the reference run is another, smaller family (Gemma 2, its own tokenizer and
    template); the split of its dynamics trains SFTMix on a Llama. Dynamics are keyed by example id,
    whatever the tokenizer."""
    # SmolLM2's BPE + Gemma's turns
    ref_dir = family_tokenizer_dir(smollm2_dir, tmp_path / "gemma2", "gemma")
    cfg = Gemma2Config(
        **TINY,
        vocab_size=49156,
        sliding_window=16,
        bos_token_id=49152,
        eos_token_id=49153,
        pad_token_id=None,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(ref_dir)
    ref = run_train(
        *cli(mode="ntp", dynamics="2", model=ref_dir, data=chat_data, out=tmp_path / "ref"),
        *COMMON,
        *cli(micro_batch="4", save_every="1000"),
    )
    assert "prompt format gemma" in ref.stdout
    assert json.loads((tmp_path / "ref" / "final" / "config.json").read_text())[
        "architectures"
    ] == ["Gemma2ForCausalLM"]
    split = tmp_path / "split.json"
    sftmix.main(
        ["split", "--dynamics", str(tmp_path / "ref" / "dynamics.jsonl"), "--out", str(split)]
    )
    ids = [json.loads(line)["id"] for line in chat_data.read_text().splitlines()]
    halves = json.loads(split.read_text())
    assert sorted(halves["confident"] + halves["unconfident"]) == sorted(ids)
    strong = run_train(
        *cli(
            mode="sftmix",
            split=split,
            model=tiny_model_dir,
            data=chat_data,
            out=tmp_path / "strong",
        ),
        *COMMON,
        *cli(micro_batch="4", save_every="1000"),
    )
    assert "prompt format chatml" in strong.stdout
    metrics = [
        json.loads(line)
        for line in (tmp_path / "strong" / "metrics.jsonl").read_text().splitlines()
    ]
    assert metrics and all(m["mixup_loss"] > 0 for m in metrics)
    assert json.loads((tmp_path / "strong" / "final" / "config.json").read_text())[
        "architectures"
    ] == ["LlamaForCausalLM"]


# -------------------------------------------------------------- every config field, every RoPE type

CLASSES = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "gemma": GemmaConfig,
    "gemma2": Gemma2Config,
}
SMALL = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=V,
    max_position_embeddings=256,
)
# read by transformers outside the fields
TOP_LEVEL_ROPE = ("rope_scaling", "rope_theta", "partial_rotary_factor")
READ = {f.name for f in dataclasses.fields(M.ModelArgs)} - set(M.FIXED) | {
    "hidden_activation",
    "rope_parameters",
    "rope_scaling",
}
# fields that do not change the logits or gradients, and why ("family.field": that family's alone)
NOT_READ = {
    "transformers_version": "provenance",
    "architectures": "the class, which model_type also names",
    "output_hidden_states": "what a call returns, not what it computes",
    "output_attentions": "what a call returns, not what it computes",
    "return_dict": "what a call returns, not what it computes",
    "dtype": "the dtype the weights were saved in; the compute dtype is --dtype's",
    "chunk_size_feed_forward": "not read by these five classes",
    "is_encoder_decoder": "not read by these decoder-only classes",
    "id2label": "sequence-classification heads only",
    "label2id": "sequence-classification heads only",
    "problem_type": "sequence-classification heads only",
    "initializer_range": "initialisation only: the weights are loaded",
    "use_cache": "generation computes the same with or without a KV cache",
    "pretraining_tp": "not read by transformers 5 (4 cut the projections into this many matmuls: the same products)",
    "pad_token_id": "the embedding's padding_idx only keeps that row's gradient at 0 in transformers; here it trains "
    "([ours]: docs/training.md, test_the_pad_tokens_embedding_row_is_trained_unlike_transformers_padding_idx)",
    "qwen2.sliding_window": "Qwen2 reads it only with use_sliding_window, which is refused",
    "qwen2.max_window_layers": "Qwen2 reads it only with use_sliding_window, which is refused",
}
# keys of transformers' RopeParameters that the RoPE types computed here do not read
ROPE_NOT_READ = {
    **dict.fromkeys(
        [
            "attention_factor",
            "beta_fast",
            "beta_slow",
            "mscale",
            "mscale_all_dim",
            "truncate",
            "short_factor",
            "long_factor",
        ],
        "yarn's and longrope's, which are refused",
    ),
    "mrope_section": "multimodal RoPE (Qwen2-VL), not read by these five classes",
}


@pytest.mark.parametrize("family", CLASSES)
def test_every_config_field_is_read_refused_or_known_not_to_change_the_computation(family):
    """A field transformers adds to one of these classes fails here until it is implemented, refused
    (model.REFUSED) or listed in NOT_READ with the reason it changes nothing."""
    names = [f.name for f in dataclasses.fields(CLASSES[family])] + list(TOP_LEVEL_ROPE)
    unplaced = [
        n
        for n in names
        if n not in READ
        and n not in M.REFUSED
        and n not in NOT_READ
        and f"{family}.{n}" not in NOT_READ
    ]
    assert unplaced == []
    keys = typing.get_type_hints(RopeParameters)
    unplaced = [
        k
        for k in keys
        if k not in ("rope_type", "rope_theta", *M.LLAMA3_ROPE, *M.REFUSED, *ROPE_NOT_READ)
    ]
    assert unplaced == []


REFUSED_VALUES = {
    "attention_dropout": 0.1,
    "partial_rotary_factor": 0.5,
    "use_bidirectional_attention": True,
    "use_sliding_window": True,
}


@pytest.mark.parametrize("family", CLASSES)
def test_a_refused_field_with_another_value_is_one_error_naming_it(family):
    cfg = CLASSES[family](**SMALL).to_dict()
    M.ModelArgs.from_hf_config(cfg)  # the class's defaults are accepted
    fields = [
        n
        for n in [f.name for f in dataclasses.fields(CLASSES[family])] + list(TOP_LEVEL_ROPE)
        if n in M.REFUSED
    ]
    assert set(REFUSED_VALUES) == set(M.REFUSED) and "partial_rotary_factor" in fields
    for field in fields:
        with pytest.raises(InputError) as e:
            M.ModelArgs.from_hf_config({**cfg, field: REFUSED_VALUES[field]}, "cfg")
        assert str(e.value).startswith(f"cfg: {field}: expected ") and "not implemented" in str(
            e.value
        )
    rope = {**cfg["rope_parameters"], "partial_rotary_factor": 0.5}  # where transformers 5 keeps it
    with pytest.raises(
        InputError, match=r"^cfg: rope_parameters.partial_rotary_factor: expected 1.0"
    ):
        M.ModelArgs.from_hf_config({**cfg, "rope_parameters": rope}, "cfg")
    # sliding layers listed without use_sliding_window: transformers itself fails on them
    if family == "qwen2":
        with pytest.raises(InputError, match=r'^cfg: layer_types: expected only "full_attention"'):
            M.ModelArgs.from_hf_config(
                {**cfg, "layer_types": ["sliding_attention", "full_attention"]}, "cfg"
            )


# parameters transformers accepts for each of its RoPE types (head_dim 16: 8 frequencies)
ROPE_EXAMPLES = {
    "linear": dict(factor=2.0),
    "dynamic": dict(factor=2.0),
    "yarn": dict(factor=4.0, original_max_position_embeddings=64),
    # Phi-3's
    "longrope": dict(
        short_factor=[1.5] * 8, long_factor=[4.0] * 8, original_max_position_embeddings=64
    ),
    "llama3": dict(
        factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16
    ),
}
LLAMA3 = ROPE_EXAMPLES["llama3"]
# config.json's RoPE as checkpoints hold it: transformers 5's rope_parameters, 4's keys, mixtures
ROPE_LAYOUTS = {
    "none": {},
    "theta at the top": dict(rope_theta=5e5),
    "rope_parameters default": dict(rope_parameters=dict(rope_type="default", rope_theta=7e4)),
    "rope_parameters' theta wins": dict(
        rope_theta=1.0, rope_parameters=dict(rope_type="default", rope_theta=7e4)
    ),
    "rope_parameters llama3": dict(
        rope_parameters=dict(rope_type="llama3", rope_theta=5e5, **LLAMA3)
    ),
    "rope_scaling llama3": dict(rope_theta=5e5, rope_scaling=dict(rope_type="llama3", **LLAMA3)),
    "rope_scaling with the old key type": dict(
        rope_theta=5e5, rope_scaling=dict(type="llama3", **LLAMA3)
    ),
    "rope_scaling wins": dict(
        rope_theta=5e5,
        rope_scaling=dict(rope_type="llama3", **LLAMA3),
        rope_parameters=dict(rope_type="default", rope_theta=123.0),
    ),
}


@pytest.mark.parametrize("layout", ROPE_LAYOUTS)
@pytest.mark.parametrize("family", CLASSES)
def test_rope_types_computed_here_give_transformers_frequencies(family, layout):
    """Every layout of the RoPE types implemented (model.ROPE_TYPES) gives the inverse frequencies
    of transformers' rotary embedding for the same config.json, which scales no attention
    (attention_scaling 1)."""
    raw = {**SMALL, "model_type": family, **ROPE_LAYOUTS[layout]}
    hf = AutoModelForCausalLM.from_config(
        CLASSES[family].from_dict(json.loads(json.dumps(raw)))
    ).model.rotary_emb
    ours = M.rope_inv_freq(M.ModelArgs.from_hf_config(raw))
    assert hf.attention_scaling == 1.0
    assert torch.equal(ours, hf.inv_freq)


@pytest.mark.parametrize("rope_type", ["default", *ROPE_INIT_FUNCTIONS])
def test_every_rope_type_of_transformers_is_computed_here_or_refused_naming_it(rope_type):
    """A type not in model.ROPE_TYPES is one error naming rope_parameters.rope_type, whatever keys
    it has (longrope has no "factor": it was once read as plain RoPE); a type that is in it has a
    layout in ROPE_LAYOUTS."""
    cfg = {
        **LlamaConfig(**SMALL).to_dict(),
        "rope_parameters": dict(
            rope_type=rope_type, rope_theta=1e4, **ROPE_EXAMPLES.get(rope_type, {})
        ),
    }
    if rope_type in M.ROPE_TYPES:
        rope = [
            layout.get("rope_scaling") or layout.get("rope_parameters") or {}
            for layout in ROPE_LAYOUTS.values()
        ]
        assert rope_type in {r.get("rope_type", r.get("type")) for r in rope}
        return
    with pytest.raises(InputError) as e:
        M.ModelArgs.from_hf_config(cfg, "cfg")
    assert (
        str(e.value)
        == f'cfg: rope_parameters.rope_type: expected "default" or "llama3" (the RoPE implemented '
        f'here), got "{rope_type}"'
    )
