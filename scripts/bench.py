"""Benchmark: our model and SFTMix against peers measured in the same run; prints a Markdown table of ratios.

    python scripts/get_sharegpt.py --out .assets/sharegpt-bench --train 64 --heldout 0 --seed 0 --max-chars 1500
    python scripts/bench.py --model .assets/SmolLM2-135M-Instruct --data .assets/sharegpt-bench/train.jsonl

1. train step (forward + loss + backward + AdamW) tokens/s: model.py / transformers' LlamaForCausalLM (sdpa),
   use_cache=False; the same weights, batch (the B longest samples), loss (train.loss_sums), AdamW, dtype and
   threads; the two interleaved step by step.
2. SFTMix / NTP micro-batch (train.forward_backward: forward, train.loss_sums, backward, grad clip): step time,
   and peak bytes of tensors allocated during the step above those held before it (CUDA: the caching allocator's
   max_memory_allocated; CPU: the running sum of the allocations and frees torch.profiler records).
3. dynamics pass (sftmix.response_nll, one checkpoint) / one NTP epoch of train.py's loop over the same samples.
4. model FLOP/s of train step 1 / this machine's FLOP/s on one large matmul in the same dtype and threads.
On CUDA the models run under bf16 autocast with fp32 weights, as train.py does; on CPU in fp32.
"""
import argparse
import itertools
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import sftmix  # noqa: E402
import train  # noqa: E402
from model import load_pretrained  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=str(ROOT / ".assets/SmolLM2-135M-Instruct"), help="HF directory")
    p.add_argument("--data", default=str(ROOT / ".assets/sharegpt-bench/train.jsonl"),
                   help="ShareGPT JSONL from scripts/get_sharegpt.py")
    p.add_argument("--samples", type=int, default=32, help="first samples of --data used")
    p.add_argument("--max-len", type=int, default=256, help="tokens per sample (T of the step batches)")
    p.add_argument("--batch", type=int, default=4, help="B: micro-batch of the step benchmarks and the epoch")
    p.add_argument("--global-batch", type=int, default=32, help="examples per optimizer step in the epoch")
    p.add_argument("--eval-batch", type=int, default=16, help="examples per forward in the dynamics pass")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each variant")
    p.add_argument("--steps", type=int, default=5, help="timed steps of each variant (median reported)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument("--matmul-size", type=int, default=4096, help="n of the n x n @ n x n peak-FLOP/s matmul")
    p.add_argument("--seed", type=int, default=0, help="epoch order and SFTMix lambdas")
    return p.parse_args()


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def amp_dtype(device):
    return torch.bfloat16 if device.type == "cuda" else None  # train.py's --dtype auto


def amp(device):
    return torch.autocast(device.type, dtype=amp_dtype(device), enabled=device.type == "cuda")


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(steps: dict, device, warmup, n):
    """Median seconds of each step function, the variants interleaved (order reversed every round)."""
    times = {name: [] for name in steps}
    for i in range(warmup + n):
        for name in (list(steps) if i % 2 == 0 else list(reversed(steps))):
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    for name, t in times.items():
        log(f"  {name}: " + " ".join(f"{x:.3g}" for x in t) + " s")
    return {name: statistics.median(t) for name, t in times.items()}


def micro_step(model, targs, samples, batch, pad_id, device):
    """train.forward_backward on one global batch that is a single micro-batch, then drop the gradients."""
    train.forward_backward(targs, model, samples, batch, 0, pad_id, device, amp_dtype(device), 0, 1)
    model.zero_grad(set_to_none=True)


def train_step(model, optimizer, input_ids, labels, logits_of):
    """Forward + NTP loss + backward + AdamW step; logits_of(model, input_ids, trained) -> (N, V) at trained."""
    with amp(input_ids.device):
        logits = logits_of(model, input_ids, labels != data.IGNORE)
    ntp, _ = train.loss_sums(logits, labels)
    (ntp / (labels != data.IGNORE).sum()).backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def train_epoch(model, optimizer, targs, samples, pad_id, device):
    """One epoch of train.py's loop on one rank: forward_backward over each global batch, then AdamW."""
    for step, batch in enumerate(train.epoch_batches(targs, samples, None, 0)):
        train.forward_backward(targs, model, samples, batch, step, pad_id, device, amp_dtype(device), 0, 1)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    sync(device)


def peak_memory(step, device):
    """Bytes of tensors allocated at the peak of step() above those held just before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    return max(itertools.accumulate(nbytes for _, nbytes in events))  # + allocation, - free, in time order


def matmul_flops(n, dtype, device, reps=5):
    """Measured FLOP/s of an (n x n) @ (n x n) matmul: 2 n^3 / median time."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    return 2 * n**3 / race({"mm": lambda: a @ b}, device, 1, reps)["mm"]


def machine(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return f"{name.group(1) if name else platform.processor()}, {os.cpu_count()} cores"


def trainer_args(args, mode, global_batch):
    """train.py's flags (its defaults for alpha, mu, grad clip, ...) for a run on these samples."""
    return train.parse_args(["--model", args.model, "--data", args.data, "--out", "unused", "--mode", mode,
                             "--micro-batch", str(args.batch), "--global-batch", str(global_batch),
                             "--max-len", str(args.max_len), "--seed", str(args.seed)])


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = data.load_tokenizer(args.model)
    samples = data.load_dataset(args.data, tok, max_len=args.max_len, verbose=False)[0][: args.samples]
    # steps 1 and 2: the B longest samples; as an SFTMix micro-batch rows [0, B/2) pair with [B/2, B)
    longest = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))[: args.batch]
    b = data.collate([samples[i] for i in longest], tok.pad_id)
    input_ids, labels = b["input_ids"].to(device), b["labels"].to(device)  # (B, T) each
    B, T = input_ids.shape
    micro = {mode: trainer_args(args, mode, B) for mode in ("ntp", "sftmix")}
    ours = load_pretrained(args.model, device=device)

    from transformers import LlamaForCausalLM, __version__ as hf_version
    print(f"machine: {machine(device)}; torch {torch.__version__}, transformers {hf_version}, "
          f"{torch.get_num_threads()} threads, {'bf16 autocast' if device.type == 'cuda' else 'fp32'}; "
          f"{len(samples)} samples of {args.data}, max_len {args.max_len}")
    rows = []

    # 1. train step, ours vs transformers
    log(f"1/4 train step: ours vs transformers, {args.warmup} + {args.steps} steps each")
    peer = LlamaForCausalLM.from_pretrained(args.model, attn_implementation="sdpa", dtype=torch.float32).to(device)
    adamw = {m: torch.optim.AdamW(m.parameters(), lr=1e-6, fused=device.type == "cuda") for m in (ours, peer)}
    t = race({"ours": lambda: train_step(ours, adamw[ours], input_ids, labels, lambda m, x, at: m(x, logits_at=at)),
              "transformers": lambda: train_step(peer, adamw[peer], input_ids, labels,
                                                 lambda m, x, at: m(input_ids=x, use_cache=False).logits[at])},
             device, args.warmup, args.steps)
    del peer, adamw
    t_ours = t["ours"]
    rows.append((f"train step tokens/s, {B}x{T} (fwd + loss + bwd + AdamW): ours / transformers",
                 f"{B * T / t['ours']:.0f}", f"{B * T / t['transformers']:.0f}",
                 t["transformers"] / t["ours"], ">= 1.0 (aim 1.2)", lambda r: r >= 1.0))

    # 2. SFTMix vs NTP micro-batch: time, then peak memory
    log("2/4 micro-batch step: SFTMix vs NTP, time, then peak memory")
    steps = {mode: lambda mode=mode: micro_step(ours, micro[mode], samples, longest, tok.pad_id, device)
             for mode in ("ntp", "sftmix")}
    t = race(steps, device, args.warmup, args.steps)
    rows.append((f"micro-batch s, {B}x{T} (train.forward_backward): SFTMix / NTP",
                 f"{t['sftmix']:.2f}", f"{t['ntp']:.2f}", t["sftmix"] / t["ntp"], "<= 1.05", lambda r: r <= 1.05))
    mem = {mode: peak_memory(step, device) for mode, step in steps.items()}
    how = "max_memory_allocated" if device.type == "cuda" else "torch.profiler allocations"
    rows.append((f"micro-batch peak tensor MiB above pre-step ({how}): SFTMix / NTP",
                 f"{mem['sftmix'] / 2**20:.0f}", f"{mem['ntp'] / 2**20:.0f}", mem["sftmix"] / mem["ntp"],
                 "<= 1.10", lambda r: r <= 1.10))

    # 3. dynamics pass (one checkpoint) vs one training epoch
    log(f"3/4 NTP epoch, then dynamics pass, over {len(samples)} samples")
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-6, fused=device.type == "cuda")
    t0 = time.perf_counter()
    train_epoch(ours, optimizer, trainer_args(args, "ntp", args.global_batch), samples, tok.pad_id, device)
    t_epoch = time.perf_counter() - t0
    t0 = time.perf_counter()
    sftmix.response_nll(ours, samples, args.eval_batch, device, amp_dtype(device))
    sync(device)
    t_dyn = time.perf_counter() - t0
    rows.append((f"s over {len(samples)} samples: dynamics pass (forward, length-grouped batches of "
                 f"{args.eval_batch}) / NTP epoch (micro-batch {args.batch}, global {args.global_batch})",
                 f"{t_dyn:.1f}", f"{t_epoch:.1f}", t_dyn / t_epoch, "<= 0.4", lambda r: r <= 0.4))

    # 4. model FLOP/s vs matmul FLOP/s
    log(f"4/4 {args.matmul_size}^3 matmul")
    a = ours.args
    n_params = sum(p.numel() for p in ours.parameters())  # tied embedding counted once: it is the LM-head matmul
    step_flops = 6 * n_params * B * T + 12 * a.num_hidden_layers * a.num_attention_heads * a.head_dim * T * B * T
    peak = matmul_flops(args.matmul_size, torch.bfloat16 if device.type == "cuda" else torch.float32, device)
    rows.append((f"GFLOP/s: train step 1 (ours) / {args.matmul_size}^3 matmul", f"{step_flops / t_ours / 1e9:.1f}",
                 f"{peak / 1e9:.1f}", step_flops / t_ours / peak, "(utilisation)", None))

    print(f"\nmodel FLOPs per train step = 6 N B T + 12 L H hd B T^2 (PaLM, no causal discount) with N = "
          f"{n_params / 1e6:.1f}M parameters, L = {a.num_hidden_layers}, H = {a.num_attention_heads}, "
          f"hd = {a.head_dim}: {step_flops / 1e12:.2f} TFLOP\n")
    print("| measure | ours / SFTMix | peer | ratio | goal | met |\n|---|---:|---:|---:|---|---|")
    for name, value, peer_value, ratio, goal, met in rows:
        print(f"| {name} | {value} | {peer_value} | {ratio:.2f} | {goal} | "
              f"{'' if met is None else 'yes' if met(ratio) else 'no'} |")


if __name__ == "__main__":
    try:
        main()
    except data.InputError as e:
        sys.exit(f"error: {e}")
