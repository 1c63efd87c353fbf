"""scripts/bench.py end to end at toy size, with its peers (transformers, TRL) installed: every row
is printed, with finite positive ratios. A smoke test of the script, not of the timings, which it
does not check."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from conftest import TINY, step_values
from test_train import cli

ROOT = Path(__file__).resolve().parent.parent

ROWS = [  # the start of each row's measure, in the order bench.py prints them
    "one NTP epoch s",
    "one NTP epoch s: TRL SFTTrainer padding_free=True / train.py",
    "padding share of the positions computed, the epoch: train.py / TRL default",
    "padding share of the positions computed, the epoch: train.py / TRL padding_free=True",
    "generation tokens/s",
    "generation tokens/s",
    "train step tokens/s",
    "train step s, SFTMix",
    "compile s",
    "micro-batch s",
    "micro-batch peak tensor MiB",
    "SFTMix micro-batch peak tensor MiB",
    "s over 8 samples: dynamics pass",
    "padding share of the positions computed, the dynamics pass",
    "state save s the step loop waits (",
    "state save s the step loop waits, asynchronous",
    "state save s, asynchronous, until written",
    "GFLOP/s",
]


def bench(model_dir, data_path):
    return subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench.py"),
            *cli(
                model=model_dir,
                data=data_path,
                max_len="64",
                batch="2",
                global_batch="4",
                eval_batch="4",
                repeats="1",
                warmup="0",
                steps="1",
                new_tokens="8",
                matmul_size="64",
                threads="1",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )


def table(stdout):
    """{measure: (ours, peer, ratio)} of the Markdown table's body rows."""
    lines = [l for l in stdout.splitlines() if l.startswith("| ") and not l.startswith("| measure")]
    return {
        cells[0]: tuple(cells[1:4])
        for cells in ([c.strip() for c in l.strip("|").split("|")] for l in lines)
    }


def test_bench_prints_every_row_with_finite_positive_ratios(tiny_model_dir, chat_data, tmp_path):
    data_path = tmp_path / "train.jsonl"
    # 2 global batches of 4
    data_path.write_text("".join(chat_data.read_text().splitlines(keepends=True)[:8]))
    run = bench(tiny_model_dir, data_path)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = table(run.stdout)
    assert len(rows) == len(ROWS), list(rows)
    for (measure, (ours, peer, ratio)), start in zip(rows.items(), ROWS):
        assert measure.startswith(start), (measure, start)
        if measure.startswith("padding share"):  # shares of the positions computed: no ratio
            assert ratio == "—"
            for share in (ours, peer) if peer else (ours,):
                assert share.endswith("%") and 0 <= float(share[:-1]) < 100, (measure, share)
        else:
            assert math.isfinite(float(ratio)) and float(ratio) > 0, (measure, ratio)
            assert float(ours) > 0 and float(peer) > 0, (measure, ours, peer)
    # TRL's padding_free flattens each micro-batch into one row: it computes no padding position
    assert (
        rows[
            "padding share of the positions computed, the epoch: train.py / TRL padding_free=True"
        ][1]
        == "0.0%"
    )


def test_bench_data_not_filling_global_batches_is_one_line_and_exit_2(
    tiny_model_dir, chat_data, tmp_path
):
    data_path = tmp_path / "train.jsonl"
    # 6 samples, batches of 4
    data_path.write_text("".join(chat_data.read_text().splitlines(keepends=True)[:6]))
    run = bench(tiny_model_dir, data_path)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines() == [
        f"error: {data_path}: 6 samples; expected a multiple of --global-batch 4, so that train.py and TRL train "
        f"on the same examples"
    ]
    assert run.stdout == ""


def test_bench_gpu_model_flops_are_what_torchs_flop_counter_counts():
    """scripts/bench_gpu.py's MFU numerator against torch.utils.flop_counter over train.py's NTP
    micro-batch, forward and backward: the blocks' and the LM head's matmuls exactly; attention,
    which the counter takes as the full (n, n) square whatever the causal mask, at twice the causal
    half the formula counts"""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_gpu
    import torch

    import data
    import model as M
    import train as T

    args = M.ModelArgs(**TINY, vocab_size=50)
    g = torch.Generator().manual_seed(0)
    samples = [
        data.Sample(
            str(i),
            torch.randint(0, 50, (12,), generator=g).tolist(),
            [data.IGNORE] * 5 + torch.randint(0, 50, (7,), generator=g).tolist(),
        )
        for i in range(3)
    ]
    # attention as matmuls
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        T.forward_backward(
            M.Transformer(args),
            samples,
            [0, 1, 2],
            None,
            **step_values(micro_batch=3),
        )
    causal_half = (
        6 * args.num_hidden_layers * args.num_attention_heads * args.head_dim * 3 * 12 * 12
    )
    assert counter.get_total_flops() == bench_gpu.step_flops(args, [samples])[0] + causal_half


def test_bench_gpu_runs_every_variant_at_toy_size_on_the_cpu(tiny_model_dir, chat_data, tmp_path):
    """scripts/bench_gpu.py end to end on the CPU (a tiny shape, 2 steps of 2 samples, generation of
    2 prompts): its train-step variants, the TRL-advised peer falling back to sdpa with no CUDA (and
    saying so), and its generation rows, each with a positive tokens/s and greedy tokens equal to
    transformers' eager greedy generate of each prompt alone on the weights it writes (the GPU
    figures need a GPU; this checks that the script runs)."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    data_path = tmp_path / "train.jsonl"
    data_path.write_text("".join(chat_data.read_text().splitlines(keepends=True)[:8]))
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "bench_gpu.py"),
            *cli(
                shape="tiny",
                tokenizer=tiny_model_dir,
                data=data_path,
                max_len="48",
                batch="2",
                warmup="1",
                steps="1",
                gen_prompts="2",
                new_tokens="4",
                gen_repeats="1",
                gen_out=tmp_path / "gen",
            ),
        ],
        capture_output=True,
        text=True,
        timeout=900,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = [
        [c.strip() for c in l.strip("|").split("|")]
        for l in run.stdout.splitlines()
        if l.startswith("| 2 |")
    ]
    train, generation = [r for r in rows if len(r) == 9], [r for r in rows if len(r) == 4]
    peer = "transformers + TRL padding_free"
    assert [r[2] for r in train] == [
        "train.py, NTP",
        "train.py --compile, NTP",
        "train.py --compile, SFTMix",
        f"{peer}, sdpa, NTP",
        f"{peer}, sdpa, torch_compile, NTP",
    ]
    assert all(float(r[4].replace(",", "")) > 0 for r in train)
    assert "the TRL-advised peer runs sdpa" in run.stderr
    variants = [
        "eval.py generate",
        "eval.py generate --compile",
        "transformers generate, static cache, compiled",
    ]
    assert [r[1] for r in generation] == variants
    assert all(float(r[2].replace(",", "")) > 0 for r in generation)
    written = json.loads((tmp_path / "gen" / "generation.json").read_text())["2"]
    reference = LlamaForCausalLM.from_pretrained(tmp_path / "gen" / "model", dtype=torch.bfloat16)
    config = GenerationConfig(max_new_tokens=4, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = [
        reference.generate(torch.tensor([p]), generation_config=config)[0, len(p) :].tolist()
        for p in written["prompts"]
    ]
    assert len(expected) == 2 and all(len(e) == 4 for e in expected)
    assert written["new tokens"] == {v: expected for v in variants}
