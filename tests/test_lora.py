"""LoRA: the adapted forward is peft's, final/ is W + (alpha/r) B A in plain HF weights, only the
adapters train, and a LoRA SFTMix run resumes bitwise and trains the same update on one process, two
DDP ranks and FSDP2."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_train import COMMON, assert_same_steps, cli, one_line_error, run_train, weights
from transformers import LlamaConfig, LlamaForCausalLM

import model as M

# scale alpha / r = 2: a merge that forgot it, or used alpha or r alone, is off by 2x or more
R, ALPHA = 4, 8.0


@pytest.mark.parametrize("targets", [("q_proj", "v_proj"), M.LORA_TARGETS])
def test_adapted_forward_equals_peft_lora_on_transformers(targets, tmp_path):
    cfg = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path)
    ours = M.add_lora(M.load_pretrained(tmp_path), R, ALPHA, targets)
    hf = get_peft_model(
        LlamaForCausalLM.from_pretrained(tmp_path),
        LoraConfig(r=R, lora_alpha=ALPHA, target_modules=list(targets), lora_dropout=0.0),
    )
    peft_params = dict(hf.named_parameters())
    adapters = {n: p for n, p in ours.named_parameters() if p.requires_grad}
    assert len(adapters) == 2 * len(targets) * cfg.num_hidden_layers
    with torch.no_grad():
        # random on both sides; B = 0 at init would hide the adapter path
        for n, p in adapters.items():
            p.normal_(0, 0.5)
            # peft: q_proj.lora_A.default.weight
            peft_params[f"base_model.model.{n}.default.weight"].copy_(p)
        ids = torch.randint(0, cfg.vocab_size, (2, 12))
        ref, got = hf(ids).logits, ours(ids)
    assert (got - ref).abs().max() / ref.abs().max() <= 1e-5


@pytest.fixture(scope="module")
def runs(tiny_model_dir, chat_data, tmp_path_factory):
    """One LoRA SFTMix run (5 steps) four ways, the state kept: whole on one process, stopped after
    step 2 and resumed, on 2 DDP ranks, on 2 FSDP2 ranks."""
    out = tmp_path_factory.mktemp("lora")
    split = out / "split.json"
    split.write_text(
        json.dumps(
            {
                "confident": [f"ex{i}" for i in range(0, 40, 2)],
                "unconfident": [f"ex{i}" for i in range(1, 40, 2)],
            }
        )
    )
    base = [
        *cli(mode="sftmix", split=split, model=tiny_model_dir, data=chat_data),
        *COMMON,
        *cli(micro_batch="2", lr="1e-4", lora_rank=R, lora_alpha=ALPHA),
        "--keep-state",
    ]
    run_train(*base, "--out", out / "one")
    run_train(*base, "--out", out / "parts", "--stop-at-step", "2")
    run_train(*base, "--out", out / "parts", "--resume")
    run_train(*base, "--out", out / "ddp", nproc=2)
    run_train(*base, "--out", out / "fsdp", "--shard", "fsdp", nproc=2)
    return out


def state_of(run):
    """The kept state read with safetensors alone: each rank's file (shard-R-...), FSDP's shards of
    a tensor joined along dim 0 in rank order; a replicated tensor is in one file."""
    latest = json.loads((run / "state" / "latest.json").read_text())
    files = [
        load_file(str(f))
        for f in sorted((run / "state" / latest["checkpoint"]).glob("shard-*.safetensors"))
    ]
    pieces = {}
    for f in files:
        for k, v in f.items():
            pieces.setdefault(k, []).append(v)
    return latest["step"], {k: torch.cat(p) if p[0].dim() else p[0] for k, p in pieces.items()}


def adapters_of(run):
    """{module prefix: (lora_A, lora_B)} and the names AdamW holds moments for, from the kept state."""
    step, tensors = state_of(run)
    pairs = {
        k.removeprefix("model.").removesuffix("lora_A"): (
            tensors[k],
            tensors[k.replace("lora_A", "lora_B")],
        )
        for k in tensors
        if k.startswith("model.") and k.endswith(".lora_A")
    }
    moments = {
        k.removeprefix("optimizer.").removesuffix(".exp_avg")
        for k in tensors
        if k.endswith(".exp_avg")
    }
    return step, pairs, moments


def test_final_is_the_base_plus_scaled_b_a_and_nothing_else_trained(runs, tiny_model_dir):
    step, pairs, moments = adapters_of(runs / "one")
    final, start = weights(runs / "one"), load_file(str(tiny_model_dir / "model.safetensors"))
    # plain HF names: no lora_A / lora_B in final/
    assert step == 5 and final.keys() == start.keys()
    # AdamW holds the adapters only
    assert moments == {p + s for p in pairs for s in ("lora_A", "lora_B")}
    assert {p + "weight" for p in pairs} == {
        n for n in start if n.endswith(tuple(f"{t}.weight" for t in M.LORA_TARGETS))
    }
    for name in start:
        if name.removesuffix("weight") not in pairs:  # embeddings, norms: untouched, bitwise
            assert torch.equal(final[name], start[name]), name
            continue
        A, B = (t.double() for t in pairs[name.removesuffix("weight")])
        delta = ALPHA / R * B @ A  # (out, r) @ (r, in), by hand in float64
        assert delta.abs().max() > 1e-5, f"{name}: the adapter did not train"
        torch.testing.assert_close(
            final[name].double() - start[name].double(), delta, rtol=0, atol=1e-8
        )


def test_final_loads_in_transformers_with_the_adapted_models_logits(runs, tiny_model_dir):
    _, pairs, _ = adapters_of(runs / "one")
    ours = M.add_lora(M.load_pretrained(tiny_model_dir), R, ALPHA)
    with torch.no_grad():
        for prefix, (A, B) in pairs.items():
            ours.get_submodule(prefix.rstrip(".")).lora_A.copy_(A)
            ours.get_submodule(prefix.rstrip(".")).lora_B.copy_(B)
        hf = LlamaForCausalLM.from_pretrained(runs / "one" / "final").eval()
        ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
        ref, got = hf(ids).logits, ours(ids)
    assert (got - ref).abs().max() / ref.abs().max() <= 1e-5


def test_lora_resume_is_bitwise_equal_to_an_uninterrupted_run(runs):
    whole, parts = weights(runs / "one"), weights(runs / "parts")
    assert all(torch.equal(whole[n], parts[n]) for n in whole)


@pytest.mark.parametrize("run", ["ddp", "fsdp"])
def test_lora_on_two_ranks_trains_the_update_of_one_process(run, runs):
    """Compared on what trained, the update (alpha/r) B A from the adapters in float64: the frozen
    base would dilute the difference, and fp32 rounding of the merged W + update would dominate
    it."""
    one, two = adapters_of(runs / "one")[1], adapters_of(runs / run)[1]
    assert one.keys() == two.keys()
    for prefix in one:
        d1, d2 = (ALPHA / R * B.double() @ A.double() for A, B in (one[prefix], two[prefix]))
        assert ((d1 - d2).abs().max() / d1.abs().max()).item() <= 1e-5, prefix
    assert_same_steps(runs / "one", runs / run, grad_norm_rel=1e-6)


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--lora-rank", "-1"], "error: --lora-rank: expected >= 0 (0 = off), got -1"),
        (
            ["--lora-rank", "4", "--lora-alpha", "0"],
            "error: --lora-alpha: expected > 0 and finite, got 0.0",
        ),
    ],
)
def test_bad_lora_settings_get_one_line(
    flags, expected, tiny_model_dir, chat_data, tmp_path, capsys
):
    assert (
        one_line_error(capsys, *cli(model=tiny_model_dir, data=chat_data, out=tmp_path), *flags)
        == expected
    )
