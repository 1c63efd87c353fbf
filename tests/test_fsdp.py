"""Training at scale: FSDP2 equals DDP, resumes exactly, and the memory estimate matches what autograd keeps."""
import pytest
import torch
from safetensors.torch import load_file

import model as M
from scripts.memory_table import memory_per_gpu
from test_train import COMMON, run_train, weights


@pytest.fixture(scope="module")
def runs(tiny_model_dir, chat_data, tmp_path_factory):
    """The same SFTMix-free NTP run three ways on 2 gloo processes: DDP, FSDP2 (+ activation checkpointing),
    and FSDP2 stopped after step 2 then resumed."""
    out = tmp_path_factory.mktemp("fsdp")
    base = ["--model", tiny_model_dir, "--data", chat_data, *COMMON, "--epochs", "2", "--micro-batch", "2"]
    run_train(*base, "--out", out / "ddp", nproc=2)
    run_train(*base, "--out", out / "fsdp", "--shard", "fsdp", "--activation-checkpointing", nproc=2)
    run_train(*base, "--out", out / "parts", "--shard", "fsdp", "--activation-checkpointing", "--stop-at-step", "2",
              nproc=2)
    run_train(*base, "--out", out / "parts", "--shard", "fsdp", "--activation-checkpointing", "--resume", nproc=2)
    return out


def test_fsdp_training_equals_ddp_training(runs, tiny_model_dir):
    ddp, fsdp = weights(runs / "ddp"), weights(runs / "fsdp")
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert ddp.keys() == fsdp.keys() == start.keys()
    for name in ddp:
        assert not torch.equal(ddp[name], start[name]), f"{name} did not train"
        rel = ((ddp[name] - fsdp[name]).abs().max() / ddp[name].abs().max()).item()
        assert rel <= 1e-5, (name, rel)


def test_fsdp_resume_equals_an_uninterrupted_fsdp_run(runs):
    whole, parts = weights(runs / "fsdp"), weights(runs / "parts")
    assert all(torch.equal(whole[n], parts[n]) for n in whole)


@pytest.mark.parametrize("tied", [False, True])
def test_memory_estimate_counts_the_models_parameters(tied):
    args = M.ModelArgs(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                       num_key_value_heads=2, head_dim=24, vocab_size=300, tie_word_embeddings=tied)
    with torch.device("meta"):
        n = sum(p.numel() for p in M.Transformer(args).parameters())  # shared tied weight counted once
    est = memory_per_gpu(args, gpus=4, shard="fsdp", activation_checkpointing=False, tokens_per_gpu=1)
    assert est["parameters"] == n
    ddp = memory_per_gpu(args, gpus=4, shard="ddp", activation_checkpointing=False, tokens_per_gpu=1)
    assert ddp["optimizer"] == 8 * n and est["optimizer"] == 8 * n / 4  # AdamW's two fp32 moments, sharded by 4


def saved_activation_bytes(args, B, T, checkpoint):
    """Bytes of the per-example tensors autograd keeps for the backward of a bf16 forward (FSDP's compute dtype)."""
    torch.manual_seed(0)
    model = M.Transformer(args).to(torch.bfloat16)
    model.checkpoint_activations = checkpoint
    kept = {}

    def pack(t):
        if t.dim() and t.shape[0] == B:  # activations lead with the batch; weights do not
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randint(0, args.vocab_size, (B, T)))
    return sum(kept.values())


@pytest.mark.parametrize("checkpoint", [False, True])
def test_activation_estimate_per_block_matches_what_autograd_saves(checkpoint):
    dims = dict(hidden_size=128, intermediate_size=352, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
                vocab_size=500)
    B, T = 2, 64
    two, four = (M.ModelArgs(num_hidden_layers=L, **dims) for L in (2, 4))
    measured = saved_activation_bytes(four, B, T, checkpoint) - saved_activation_bytes(two, B, T, checkpoint)
    estimated = (memory_per_gpu(four, 1, "fsdp", checkpoint, B * T)["activations"]
                 - memory_per_gpu(two, 1, "fsdp", checkpoint, B * T)["activations"])
    assert estimated == pytest.approx(measured, rel=0.02)
