"""train.memory_per_gpu's formula against what train.py holds: the peak of live tensor bytes of a
bf16 FSDP2 step measured on the CPU, the tensors autograd keeps, and the model's parameter count."""

import multiprocessing as mp
from functools import partial

import pytest
import torch
import torch.distributed as dist
from conftest import step_values
from test_train import cli
from torch._C._profiler import _EventType
from torch.distributed.device_mesh import init_device_mesh
from torch.profiler import ProfilerActivity, profile

import data
import model as M
import train as T
from train import memory_per_gpu

SMALL = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    vocab_size=2048,
)


def peak_bytes(run) -> int:
    """The most bytes of CPU tensors alive at once while run() runs, of those it allocates.

    From the profiler's allocation events: c10's CPU allocator reports every allocation and free to
    it with the running total, so every tensor counts, Python's and those held in C++ alone (what
    autograd saves, FSDP2's gathered weights and reduce-scatter buffers, storages it resizes in
    place); tracemalloc sees none of them. The running total is the allocator's since the process
    first profiled, and a free outside a profiled region is never subtracted, so the peak is counted
    from the total just before run()'s first allocation; in a process that profiled before, what it
    allocated then and run() frees counts against."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    nodes, allocations = prof.profiler.kineto_results.experimental_event_tree(), []
    while nodes:
        node = nodes.pop()
        nodes += node.children
        if node.tag == _EventType.Allocation:
            allocations.append(node)
    first = min(allocations, key=lambda node: node.start_time_ns).extra_fields
    return max(node.extra_fields.total_allocated for node in allocations) - (
        first.total_allocated - first.alloc_size
    )


def fsdp_step_peak(base, out, mode, checkpoint, tokens):
    """peak_bytes of loading `base` and running train.py's step twice (the second holds AdamW's
    moments) on one gloo rank under FSDP2 in bf16; one micro-batch of 4 random examples of tokens /
    4 tokens each."""
    dist.init_process_group("gloo", init_method=f"file://{out}/store", rank=0, world_size=1)
    V, g = M.ModelArgs.from_model_dir(base).vocab_size, torch.Generator().manual_seed(0)
    samples = [
        data.Sample(str(i), *torch.randint(0, V, (2, tokens // 4), generator=g).tolist())
        for i in range(4)
    ]
    lam = torch.full((2,), 0.3) if mode == "sftmix" else None

    def two_steps():
        model = M.load_pretrained(
            base,
            prepare=partial(
                T.prepare_model,
                lora=(0, 0, ()),
                activation_checkpointing=checkpoint,
                compile=False,
                mesh=init_device_mesh("cpu", (1,)),
                bf16=True,
            ),
        )
        optimizer = T.adamw(model, 1e-3, 0.1)
        for _ in range(2):
            T.forward_backward(
                model,
                samples,
                [0, 1, 2, 3],
                lam,
                **step_values(micro_batch=4),
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    try:
        return peak_bytes(two_steps)
    finally:
        dist.destroy_process_group()


def test_peak_bytes_counts_the_tensors_alive_at_once():
    def run():
        a = torch.ones(1000, 1000)  # 4 MB
        b = a * 2  # 8 MB
        del a, b
        torch.ones(500, 1000)  # 2 MB

    assert peak_bytes(run) == pytest.approx(8_000_000, abs=100)  # and a few scalars


@pytest.mark.parametrize(
    "mode, checkpoint, tokens, dims, phase",
    [
        ("sftmix", False, 1100, {}, "head"),  # 1,024 positions x 2,048 fp32 logits a chunk
        ("ntp", False, 1100, dict(tie_word_embeddings=True), "head"),
        # the activations of 8 blocks
        ("ntp", False, 256, dict(num_hidden_layers=8, vocab_size=64), "top"),
        (
            "ntp",
            True,
            256,
            dict(
                hidden_size=256,
                intermediate_size=768,
                num_hidden_layers=4,
                head_dim=64,
                vocab_size=256,
            ),
            "bottom",
        ),  # large blocks, their gradients
        ("ntp", True, 64, dict(vocab_size=8192), "last unit"),
    ],
)  # a large embedding, its gradient
def test_formula_is_the_measured_peak_of_a_bf16_fsdp_step(
    mode, checkpoint, tokens, dims, phase, tmp_path
):
    """Each case peaks at another moment of the step. The formula leaves out a few small tensors
    (RoPE's cos and sin, token ids) and takes some of FSDP2's buffers at their largest: measured,
    within 0.5%."""
    m = M.ModelArgs(**SMALL | dims)
    torch.manual_seed(0)
    M.save_pretrained(M.Transformer(m), tmp_path / "base")
    # a fresh process: the allocator's count starts at 0
    with mp.get_context("spawn").Pool(1) as pool:
        measured = pool.apply(
            fsdp_step_peak, (tmp_path / "base", tmp_path, mode, checkpoint, tokens)
        )
    estimated = memory_per_gpu(m, 1, "fsdp", checkpoint, tokens, mixup=mode == "sftmix")
    assert estimated["at"] == phase
    assert estimated["total"] == pytest.approx(measured, rel=0.005)


@pytest.mark.parametrize("tied", [False, True])
def test_formula_counts_the_models_parameters(tied):
    args = M.ModelArgs(**SMALL, tie_word_embeddings=tied)
    with torch.device("meta"):
        # shared tied weight counted once
        n = sum(p.numel() for p in M.Transformer(args).parameters())
    fsdp = memory_per_gpu(
        args, gpus=4, shard="fsdp", activation_checkpointing=False, tokens_per_gpu=1
    )
    ddp = memory_per_gpu(
        args, gpus=4, shard="ddp", activation_checkpointing=False, tokens_per_gpu=1
    )
    assert fsdp["parameters"] == ddp["parameters"] == n
    # AdamW's two fp32 moments, sharded by 4
    assert ddp["optimizer"] == 8 * n and fsdp["optimizer"] == 8 * n / 4


def saved_bytes(args, T, checkpoint):
    """Bytes of the tensors autograd keeps for the backward of a bf16 forward of one packed row of T
    tokens (two sequences, attended as padded sequences, as in training), the weights aside."""
    torch.manual_seed(0)
    model = M.Transformer(args).to(torch.bfloat16)
    model.checkpoint_activations = checkpoint
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            kept[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    positions = torch.cat([torch.arange(T // 2)] * 2)[None]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = model(
            torch.randint(0, args.vocab_size, (1, T)),
            positions=positions,
            seqs=data.packing([T // 2] * 2),
        )
    del logits
    return sum(kept.values())


@pytest.mark.parametrize("checkpoint", [False, True])
def test_activations_per_block_are_what_autograd_keeps(checkpoint):
    T = 128
    two, four = (M.ModelArgs(**SMALL | dict(num_hidden_layers=L)) for L in (2, 4))
    measured = saved_bytes(four, T, checkpoint) - saved_bytes(two, T, checkpoint)
    estimated = (
        memory_per_gpu(four, 1, "fsdp", checkpoint, T)["activations"]
        - memory_per_gpu(two, 1, "fsdp", checkpoint, T)["activations"]
    )
    assert estimated == pytest.approx(measured, rel=0.02)


@pytest.mark.parametrize(
    "limit,advice",
    [
        ("small", "nothing does on this many GPUs: more GPUs, or a smaller model"),
        ("between", "--activation-checkpointing would fit"),
    ],
)
def test_a_run_whose_estimate_exceeds_the_device_is_refused_before_any_weight_loads(
    limit, advice, tiny_model_dir, chat_data, tmp_path, monkeypatch, capsys
):
    """SFTMIX_DEVICE_MEMORY_GB stands for the device's memory: below the estimate, one line and exit
    2 before load_pretrained runs or the run directory exists, naming the settings that fit
    (activation checkpointing when the limit lies between the estimates with and without it)"""
    from test_train import COMMON, one_line_error

    import data as D

    m = M.ModelArgs.from_model_dir(tiny_model_dir)
    samples, _ = D.load_dataset(chat_data, D.load_tokenizer(tiny_model_dir), verbose=False)
    # the 4 longest: the largest micro-batch
    tokens = sum(sorted(len(s.input_ids) for s in samples)[-4:])
    with_ac, without = (
        memory_per_gpu(m, 1, "ddp", ac, tokens, mixup=False)["total"] for ac in (True, False)
    )
    assert with_ac < without
    least = memory_per_gpu(m, 1, "ddp", True, max(len(s.input_ids) for s in samples), mixup=False)[
        "total"
    ]
    # least: 1 example, checkpointing
    gb = {"small": least / 2, "between": (with_ac + without) / 2}[limit] / 1e9
    monkeypatch.setenv("SFTMIX_DEVICE_MEMORY_GB", str(gb))
    monkeypatch.setattr(T, "load_pretrained", lambda *a, **k: pytest.fail("a weight was loaded"))
    line = one_line_error(
        capsys,
        *cli(model=tiny_model_dir, data=chat_data),
        *COMMON,
        *cli(micro_batch="4", out=tmp_path / "run"),
    )
    assert (
        line.startswith(f"error: --shard ddp: an estimated {without / 1e9:.1f} GB a GPU")
        and advice in line
    )
    assert not (tmp_path / "run").exists()


FINAL_PEAK = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
import torch
import model as M
import train as T
out, shard_gb = Path(sys.argv[1]), float(sys.argv[2])
args = M.ModelArgs(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                   num_key_value_heads=4, head_dim=64, vocab_size=4096, tie_word_embeddings=True)
model = M.Transformer(args)
M.save_pretrained(model, out / "base")
open("/proc/self/clear_refs", "w").write("5")  # the resident high-water mark (VmHWM) starts again here
status = lambda key: next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))
before = status("VmRSS")
T.write_final(out, model, out / "base", "bf16", None, shard_gb, 0)
print(status("VmHWM") - before)
"""


def test_final_is_written_holding_about_one_shard_of_host_memory(tmp_path):
    """train.write_final of a 52 MiB (bf16) model: rank 0's peak resident memory above what it held
    before is about its largest shard file (4.5 MiB shards: 12 files) and the next tensor (the
    embedding, 4 MiB), and the whole model when final/ is one file. Measured: 9.4 MiB against 52.9
    MiB."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    peak, largest = {}, {}
    for name, gb in (("shards", 0.0045), ("one file", 1.0)):
        r = subprocess.run(
            [sys.executable, "-c", FINAL_PEAK, str(tmp_path / name), str(gb), str(root)],
            capture_output=True,
            text=True,
            check=True,
            env={"OMP_NUM_THREADS": "1"},
        )
        peak[name] = int(r.stdout.split()[-1])
        largest[name] = max(
            f.stat().st_size for f in (tmp_path / name / "final").glob("*.safetensors")
        )
    assert len(list((tmp_path / "shards" / "final").glob("*.safetensors"))) >= 10
    assert peak["one file"] >= largest["one file"]  # the measure sees the shard it holds
    assert peak["shards"] <= 3 * largest["shards"] and peak["shards"] <= peak["one file"] / 4


@pytest.mark.parametrize(
    "flags,line",
    [
        (["--gpus", "0"], "error: --gpus: expected >= 1, got 0"),
        (["--tokens", "0"], "error: --tokens: expected >= 1, got 0"),
        (["--tokens", "-5"], "error: --tokens: expected >= 1, got -5"),
    ],
)
def test_memory_table_refuses_a_count_below_one_in_one_line(flags, line):
    import subprocess
    import sys
    from pathlib import Path

    table = Path(__file__).resolve().parent.parent / "scripts" / "memory_table.py"
    r = subprocess.run([sys.executable, str(table), *flags], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr == line + "\n" and r.stdout == ""
