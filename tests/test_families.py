"""The paper's other families against transformers' own classes: Qwen2 (Qwen2.5), Mistral with its sliding window,
Gemma and Gemma 2 give the same logits, gradients, checkpoints and generations; weak-to-strong crosses families."""
import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM, Gemma2Config, GemmaConfig, MistralConfig, Qwen2Config

import model as M
import sftmix
from test_data import family_tokenizer_dir
from test_model import hf_greedy, randomize
from test_train import COMMON, run_train

V = 101
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, vocab_size=V,
            max_position_embeddings=256, rms_norm_eps=1e-6, bos_token_id=None, eos_token_id=None,
            pad_token_id=None)  # a pad token's embedding row gets no gradient in transformers: see the test below
CONFIGS = {  # two random configs a family: tied and untied heads, GQA and MQA, windows shorter than the sequences
    "qwen2-gqa": (Qwen2Config, dict(num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False)),
    "qwen2-mqa-tied": (Qwen2Config, dict(num_key_value_heads=1, tie_word_embeddings=True)),
    "mistral-window8-gqa": (MistralConfig, dict(num_key_value_heads=2, sliding_window=8)),
    "mistral-window5-mqa-tied": (MistralConfig, dict(num_key_value_heads=1, sliding_window=5, tie_word_embeddings=True)),
    "gemma-mha-tied": (GemmaConfig, dict(num_key_value_heads=4, head_dim=24)),
    "gemma-mqa": (GemmaConfig, dict(num_key_value_heads=1, head_dim=16, tie_word_embeddings=False)),
    "gemma2-window8-gqa-tied": (Gemma2Config, dict(num_key_value_heads=2, head_dim=16, sliding_window=8,
                                                   query_pre_attn_scalar=16)),
    "gemma2-window6-mqa": (Gemma2Config, dict(num_key_value_heads=1, head_dim=24, sliding_window=6,
                                              query_pre_attn_scalar=20, attn_logit_softcapping=2.0,
                                              final_logit_softcapping=3.0, tie_word_embeddings=False)),
}  # small caps (2, 3) so that they bite: random logits stay far below Gemma 2's own 50 and 30
T = 40  # tokens per sequence: several windows long


def hf_model(name, seed=0, **overrides):
    cls, extra = CONFIGS[name]
    cfg = cls(**{**BASE, **extra, **overrides}, attn_implementation="eager")
    return randomize(AutoModelForCausalLM.from_config(cfg).float(), seed)


def ids_and_targets(batch=3, length=T):
    return (torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(1)),
            torch.randint(0, V, (batch, length), generator=torch.Generator().manual_seed(2)))


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
    assert (ours(ids, logits_at=at) - hf_logits[at]).abs().max().item() <= 1e-5

    F.cross_entropy(hf_logits.flatten(0, 1), targets.flatten()).backward()
    F.cross_entropy(our_logits.flatten(0, 1), targets.flatten()).backward()
    hf_grads = dict(hf.named_parameters())
    assert {n for n, _ in ours.named_parameters()} == set(hf_grads)
    for pname, p in ours.named_parameters():
        assert (p.grad - hf_grads[pname].grad).abs().max().item() <= 1e-5, pname


@pytest.mark.parametrize("name", ["qwen2-gqa", "mistral-window5-mqa-tied", "gemma-mqa", "gemma2-window8-gqa-tied"])
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
        assert type(hf).__name__ == M.FAMILIES[ours.args.model_type][0] == f"{cls.__name__[:-6]}ForCausalLM"
        assert (hf(ids).logits - ours(ids)).abs().max().item() <= 1e-5

    hf = hf_model(name, seed=1)
    hf.save_pretrained(tmp_path / "hf", max_shard_size="40KB")
    assert len(set(json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())["weight_map"].values())) > 2
    assert (M.load_pretrained(tmp_path / "hf")(ids) - hf(ids).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", ["mistral-window5-mqa-tied", "gemma2-window6-mqa"])
def test_generation_past_the_window_equals_transformers_and_batching(name, tmp_path):
    hf = hf_model(name)
    hf.save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    prompts = [[5, 9, 2, 7], [7, 1, 4, 4, 8, 3, 2, 11, 6, 3], [3]]  # the longest already past the window
    batched = M.generate(ours, prompts, max_new_tokens=14)
    alone = [M.generate(ours, [p], max_new_tokens=14)[0] for p in prompts]
    assert batched == alone
    assert alone == [hf_greedy(hf, p, 14) for p in prompts]


@pytest.mark.parametrize("name", ["mistral-window5-mqa-tied", "gemma2-window6-mqa"])
def test_packed_sequences_with_a_sliding_window_each_compute_as_alone(name, tmp_path):
    hf_model(name).save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    seqs = [torch.randint(0, V, (n,), generator=torch.Generator().manual_seed(n)) for n in (13, 4, 20)]
    packed = ours(torch.cat(seqs)[None], seq_lens=[13, 4, 20])[0]
    alone = torch.cat([ours(s[None])[0] for s in seqs])
    assert (packed - alone).abs().max().item() <= 1e-5


def test_pad_token_embedding_row_trains_here_but_not_in_transformers(tmp_path):
    """transformers builds nn.Embedding(padding_idx=pad_token_id): the pad token's embedding row gets no gradient
    from the input lookup. Here every row trains (README); all other gradients are the same."""
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
    """Gemma 2 caps its logits, cap(z) = c tanh(z / c), which is not linear. Mixup's CE of the mixed hidden state,
    CE(cap(W Z~), Y~), equals mixing the head's outputs and capping after: cap(lam W Z^c + (1 - lam) W Z^u)
    (sftmix.head_losses); mixing the capped logits instead would differ."""
    hf_model("gemma2-window6-mqa").save_pretrained(tmp_path)
    ours = M.load_pretrained(tmp_path)
    cap, W = ours.args.final_logit_softcapping, ours.lm_head.weight
    ids, targets = ids_and_targets(4, 20)
    labels = targets.clone()
    labels[:, :6], labels[1, 15:], labels[3, 9:] = sftmix.IGNORE, sftmix.IGNORE, sftmix.IGNORE  # responses of 14, 9, 14, 3
    lam = torch.tensor([0.3, 0.8])  # pairs (row 0, row 2) and (row 1, row 3)
    _, hidden = ours(ids, return_hidden=True)
    mask_c, mask_u = sftmix.first_n_response_positions(labels[:2], labels[2:])
    lam_pos = lam[:, None].expand(2, 20)[mask_c]  # (M,)
    z_mixed = (lam_pos[:, None] * hidden[:2][mask_c] + (1 - lam_pos[:, None]) * hidden[2:][mask_u]) @ W.T  # W Z~

    def soft_ce(z):  # (M,): lam CE(z, y^c) + (1 - lam) CE(z, y^u)
        return (lam_pos * F.cross_entropy(z, labels[:2][mask_c], reduction="none")
                + (1 - lam_pos) * F.cross_entropy(z, labels[2:][mask_u], reduction="none"))

    hidden_form = soft_ce(ours.softcap(z_mixed))
    uncapped = soft_ce(z_mixed).mean()  # tie the hidden-state form to sftmix.mixup_loss, which knows no cap
    assert uncapped.item() == pytest.approx(sftmix.mixup_loss(hidden[:2], labels[:2], hidden[2:], labels[2:], lam,
                                                              W).item(), rel=1e-6)

    trained = labels != sftmix.IGNORE  # (4, 20): the model's N trained positions, row by row
    number = torch.full(labels.shape, -1).masked_scatter(trained, torch.arange(int(trained.sum())))  # (4, 20)
    mix_c, mix_u = number[:2][mask_c], number[2:][mask_u]  # (M,) each: the aligned positions among the N
    _, mixed = ours(ids, logits_at=trained, head=lambda h, w, softcap: sftmix.head_losses(
        h, w, labels[trained], mix_c, mix_u, lam_pos, softcap=softcap))
    assert (mixed - hidden_form).abs().max().item() <= 1e-5

    z = ours(ids, logits_at=trained, head=lambda h, w, softcap: h @ w.T)  # the head's outputs before the cap
    capped_then_mixed = torch.lerp(ours.softcap(z[mix_u]), ours.softcap(z[mix_c]), lam_pos[:, None])
    assert (soft_ce(capped_then_mixed) - hidden_form).abs().max().item() > 1e-3


PUBLISHED = {  # config.json of the paper's models (and the weak-to-strong reference), as their hubs publish them
    "Llama-3.1-8B": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", attention_bias=False, bos_token_id=128000,
        eos_token_id=128001, hidden_act="silu", hidden_size=4096, intermediate_size=14336,
        max_position_embeddings=131072, mlp_bias=False, num_attention_heads=32, num_hidden_layers=32,
        num_key_value_heads=8, rms_norm_eps=1e-05, rope_theta=500000.0, tie_word_embeddings=False, vocab_size=128256,
        rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192,
                          rope_type="llama3")),
    "Mistral-7B-v0.1": dict(
        architectures=["MistralForCausalLM"], model_type="mistral", bos_token_id=1, eos_token_id=2, hidden_act="silu",
        hidden_size=4096, intermediate_size=14336, max_position_embeddings=32768, num_attention_heads=32,
        num_hidden_layers=32, num_key_value_heads=8, rms_norm_eps=1e-05, rope_theta=10000.0, sliding_window=4096,
        tie_word_embeddings=False, vocab_size=32000),
    "Qwen2.5-14B": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", bos_token_id=151643, eos_token_id=151643,
        hidden_act="silu", hidden_size=5120, intermediate_size=13824, max_position_embeddings=131072,
        max_window_layers=48, num_attention_heads=40, num_hidden_layers=48, num_key_value_heads=8, rms_norm_eps=1e-05,
        rope_theta=1000000.0, sliding_window=131072, tie_word_embeddings=False, use_sliding_window=False,
        vocab_size=152064),
    "gemma-2b": dict(
        architectures=["GemmaForCausalLM"], model_type="gemma", attention_bias=False, bos_token_id=2, eos_token_id=1,
        head_dim=256, hidden_act="gelu", hidden_size=2048, intermediate_size=16384, max_position_embeddings=8192,
        num_attention_heads=8, num_hidden_layers=18, num_key_value_heads=1, pad_token_id=0, rms_norm_eps=1e-06,
        rope_scaling=None, rope_theta=10000.0, vocab_size=256000),
    "gemma-2-2b": dict(
        architectures=["Gemma2ForCausalLM"], model_type="gemma2", attention_bias=False, attn_logit_softcapping=50.0,
        bos_token_id=2, cache_implementation="hybrid", eos_token_id=1, final_logit_softcapping=30.0, head_dim=256,
        hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh", hidden_size=2304,
        intermediate_size=9216, max_position_embeddings=8192, num_attention_heads=8, num_hidden_layers=26,
        num_key_value_heads=4, pad_token_id=0, query_pre_attn_scalar=256, rms_norm_eps=1e-06, rope_theta=10000.0,
        sliding_window=4096, vocab_size=256000),
}


@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_build_the_same_parameters_and_attention_as_transformers(name):
    """Built on the meta device (no memory): the same parameter names and shapes as transformers' class from the
    same config.json, and the same layers sliding."""
    cfg = PUBLISHED[name]
    args = M.ModelArgs.from_hf_config(cfg)
    hf_cfg = AutoConfig.for_model(**cfg)
    with torch.device("meta"):
        ours, hf = M.Transformer(args), AutoModelForCausalLM.from_config(hf_cfg)
    assert {n: p.shape for n, p in ours.named_parameters()} == {n: p.shape for n, p in hf.named_parameters()}
    assert M.FAMILIES[args.model_type][0] == type(hf).__name__ == cfg["architectures"][0]
    L, W = args.num_hidden_layers, args.sliding_window
    windows = [W if W is not None and (args.layer_types is None or args.layer_types[i] == "sliding_attention")
               else None for i in range(L)]
    hf_windows = [getattr(layer.self_attn, "sliding_window", getattr(hf_cfg, "sliding_window", None))
                  for layer in hf.model.layers]  # Mistral's layers read the config's; Gemma 2's and Qwen2's, their own
    assert windows == hf_windows
    print(name, f"{sum(p.numel() for p in ours.parameters()) / 1e9:.2f}B parameters")


def test_weak_to_strong_dynamics_of_a_gemma2_reference_train_sftmix_on_llama(smollm2_dir, tiny_model_dir, chat_data,
                                                                           tmp_path):
    """As the paper: the reference run is another, smaller family (Gemma 2, its own tokenizer and template); the
    split of its dynamics trains SFTMix on a Llama. Dynamics are keyed by example id, whatever the tokenizer."""
    ref_dir = family_tokenizer_dir(smollm2_dir, tmp_path / "gemma2", "gemma")  # SmolLM2's BPE + Gemma's turns
    cfg = Gemma2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=8, vocab_size=49156, sliding_window=16, bos_token_id=49152,
                       eos_token_id=49153, pad_token_id=None)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(ref_dir)
    ref = run_train("--mode", "ntp", "--dynamics", "2", "--model", ref_dir, "--data", chat_data,
                    "--out", tmp_path / "ref", *COMMON, "--micro-batch", "4", "--save-every", "1000")
    assert "prompt format gemma" in ref.stdout
    assert json.loads((tmp_path / "ref" / "final" / "config.json").read_text())["architectures"] == ["Gemma2ForCausalLM"]
    split = tmp_path / "split.json"
    sftmix.main(["split", "--dynamics", str(tmp_path / "ref" / "dynamics.jsonl"), "--out", str(split)])
    ids = [json.loads(line)["id"] for line in chat_data.read_text().splitlines()]
    halves = json.loads(split.read_text())
    assert sorted(halves["confident"] + halves["unconfident"]) == sorted(ids)
    strong = run_train("--mode", "sftmix", "--split", split, "--model", tiny_model_dir, "--data", chat_data,
                       "--out", tmp_path / "strong", *COMMON, "--micro-batch", "4", "--save-every", "1000")
    assert "prompt format chatml" in strong.stdout
    metrics = [json.loads(line) for line in (tmp_path / "strong" / "metrics.jsonl").read_text().splitlines()]
    assert metrics and all(m["mixup_loss"] > 0 for m in metrics)
    assert json.loads((tmp_path / "strong" / "final" / "config.json").read_text())["architectures"] == \
        ["LlamaForCausalLM"]
