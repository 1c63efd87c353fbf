"""Training at scale: FSDP2 equals DDP and resumes exactly (its memory: tests/test_memory.py)."""
import pytest
import torch
from safetensors.torch import load_file

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
