"""Training at scale: FSDP2 and HSDP equal DDP, a state resumes exactly on the same number of ranks
and within FSDP's tolerance on another, and the multi-node launch of docs/at-scale.md runs (its
memory: test_memory.py)."""

import shutil
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from test_train import COMMON, ROOT, assert_same_steps, cli, run_train, weights


def torchrun(*args, nproc):
    """train.py under torchrun on one node, even for one rank (FSDP2 shards over torchrun's process
    group).
    """
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(ROOT / "train.py"),
            *map(str, args),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-3000:]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, chat_data, tmp_path_factory):
    """The same NTP run on gloo processes: DDP and FSDP2 (+ activation checkpointing) on 2 ranks;
    FSDP2 stopped after step 2 and resumed on 2 ranks, on 1 rank (2 -> 1), and the reverse (1 ->
    2)."""
    out = tmp_path_factory.mktemp("fsdp")
    base = [
        *cli(model=tiny_model_dir, data=chat_data),
        *COMMON,
        *cli(epochs="2", micro_batch="2"),
    ]
    fsdp = ["--shard", "fsdp", "--activation-checkpointing"]
    run_train(*base, "--out", out / "ddp", "--shard", "ddp", nproc=2)
    run_train(*base, "--out", out / "fsdp", *fsdp, nproc=2)
    torchrun(*base, "--out", out / "parts", *fsdp, "--stop-at-step", "2", nproc=2)
    shutil.copytree(out / "parts", out / "2-1")  # one state saved on 2 ranks, resumed on 2 and 1
    torchrun(*base, "--out", out / "1-2", *fsdp, "--stop-at-step", "2", nproc=1)
    for name, ranks in (("parts", 2), ("2-1", 1), ("1-2", 2)):
        torchrun(*base, "--out", out / name, *fsdp, "--resume", nproc=ranks)
    return out


def relative_difference(a, b):
    return max(((a[n] - b[n]).abs().max() / a[n].abs().max()).item() for n in a)


def test_fsdp_training_equals_ddp_training(runs, tiny_model_dir):
    ddp, fsdp = weights(runs / "ddp"), weights(runs / "fsdp")
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert ddp.keys() == fsdp.keys() == start.keys()
    for name in ddp:
        assert not torch.equal(ddp[name], start[name]), f"{name} did not train"
    assert relative_difference(ddp, fsdp) <= 1e-5
    assert_same_steps(runs / "ddp", runs / "fsdp", grad_norm_rel=2e-4)


def test_fsdp_resume_equals_an_uninterrupted_fsdp_run(runs):
    whole, parts = weights(runs / "fsdp"), weights(runs / "parts")
    assert all(torch.equal(whole[n], parts[n]) for n in whole)


@pytest.mark.parametrize("change", ["2-1", "1-2"])
def test_a_state_saved_on_n_ranks_resumes_on_m(change, runs):
    """DCP reshards on load: 2 ranks -> 1 and 1 -> 2 end where the uninterrupted 2-rank run ends,
    within the tolerance of FSDP against DDP (the sums over micro-batches and ranks change order)"""
    assert relative_difference(weights(runs / "fsdp"), weights(runs / change)) <= 1e-5
    assert_same_steps(runs / "fsdp", runs / change, grad_norm_rel=2e-4)


def test_hsdp_on_two_nodes_of_two_ranks_equals_ddp(runs, tiny_model_dir, chat_data, tmp_path):
    """docs/at-scale.md's multi-node command at toy size: two torchrun processes on localhost,
    --nnodes 2, rendezvous c10d, 2 ranks each; --shard hsdp shards within a node (--shard-degree
    defaults to the 2 ranks of a node) and replicates across the two"""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *("--nnodes", "2", "--nproc_per_node", "2", "--node_rank", str(node)),
                *("--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}"),
                *("--rdzv_id", "toy"),
                str(ROOT / "train.py"),
                *cli(model=tiny_model_dir, data=chat_data),
                *COMMON,
                *cli(epochs="2", micro_batch="2", shard="hsdp", out=tmp_path / "hsdp"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for node in (0, 1)
    ]
    results = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode == 0 for node in nodes), [err[-2000:] for _, err in results]
    assert "on 4 rank(s) (hsdp)" in "".join(out for out, _ in results)
    assert relative_difference(weights(runs / "ddp"), weights(tmp_path / "hsdp")) <= 1e-5
    assert_same_steps(runs / "ddp", tmp_path / "hsdp", grad_norm_rel=2e-4)
