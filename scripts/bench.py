"""Benchmark: our model, train.py and SFTMix against peers measured in the same run; prints a
Markdown table of ratios.

    pip install -r requirements-dev.txt   # the peers: transformers and TRL (torch stays the pinned torch==2.13.0)
    python scripts/get_sharegpt.py --out .assets/sharegpt-bench --train 64 --heldout 0 --seed 0 --max-chars 1500
    python scripts/bench.py --model .assets/SmolLM2-135M-Instruct --data .assets/sharegpt-bench/train.jsonl

1. one NTP epoch over all of --data, wall time (load the model, train, write the resumable state and
the final
   model): TRL's SFTTrainer, with its padded batches (default) and with padding_free=True /
   train.main in this process. Same token ids and trained tokens, micro-batch, global batch, lr,
   warm-up ratio, cosine decay, AdamW, grad clip, dtype and threads; TRL's gradient checkpointing
   (on by default) is turned off, as in train.py. The three runs are interleaved --repeats times
   (median reported).
2. padding share of the positions computed in that epoch (1 - real tokens / token ids entering the
embedding),
   ours and TRL's, and in the dynamics pass.
3. generation tokens/s, --gen-batch prompts (first user turns of --data), greedy, exactly
--new-tokens new
   tokens each (no stop token): model.generate / transformers' generate (KV cache, sdpa), eager; and
   compiled, model.generate(compile="inductor") / transformers' static cache, which its generate
   compiles; interleaved, the first run of each (the compilation) untimed.
4. train step (forward + loss + backward + AdamW) tokens/s: model.py / transformers'
LlamaForCausalLM (sdpa),
   use_cache=False; the same weights, batch (the B longest samples, padded), loss (the cross-entropy
   of the logits at the trained positions, one code for both), AdamW, dtype and threads; the two
   interleaved step by step.
4b. train step of train.py (train.forward_backward + AdamW, SFTMix, packed rows of B consecutive
samples, their
   lengths varying from step to step): --compile (each block torch.compile'd, inductor) / eager,
   measured in the same run, interleaved, the warm-up steps (at least 2: they hold the compilation)
   untimed; the compilation's seconds (the compiled warm-up's less the eager warm-up's) reported
   beside it. --no-compile skips it.
5. SFTMix / NTP micro-batch (train.forward_backward: packed forward, sftmix.head_losses, backward,
grad clip): step time,
   and peak bytes of tensors allocated during the step above those held before it (CUDA: the caching
   allocator's max_memory_allocated; CPU: the running sum of the allocations and frees
   torch.profiler records).
5c. resumable state save (train.Saver) / train step of the same model: the seconds the step
loop waits,
   synchronous (the whole write) and asynchronous (the copy to host memory; a thread writes), and
   the asynchronous write's whole time.
6. dynamics pass (sftmix.response_nll, one checkpoint) / the NTP epoch of train.py (1).
7. model FLOP/s of train step 4 / this machine's FLOP/s on one large matmul in the same dtype and threads.
On CUDA the models run under bf16 autocast with fp32 weights, as train.py does; on CPU in fp32.
"""

import argparse
import contextlib
import functools
import itertools
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import model as M  # noqa: E402
import sftmix  # noqa: E402
import train  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--model", default=str(ROOT / ".assets/SmolLM2-135M-Instruct"), help="HF directory"
    )
    p.add_argument(
        "--data",
        default=str(ROOT / ".assets/sharegpt-bench/train.jsonl"),
        help="ShareGPT JSONL from scripts/get_sharegpt.py; its sample count a multiple of --global-batch",
    )
    p.add_argument(
        "--max-len", type=int, default=256, help="tokens per sample (T of the step batches)"
    )
    p.add_argument(
        "--batch", type=int, default=4, help="B: micro-batch of the step benchmarks and the epoch"
    )
    p.add_argument(
        "--global-batch", type=int, default=32, help="examples per optimizer step in the epoch"
    )
    p.add_argument(
        "--eval-batch", type=int, default=16, help="examples per forward in the dynamics pass"
    )
    p.add_argument(
        "--repeats", type=int, default=3, help="interleaved runs of each epoch, pass and generation"
    )
    p.add_argument("--gen-batch", type=int, default=4, help="prompts generated together")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens generated for each prompt")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps of each step variant")
    p.add_argument(
        "--steps", type=int, default=5, help="timed steps of each step variant (median reported)"
    )
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    p.add_argument(
        "--matmul-size", type=int, default=4096, help="n of the n x n @ n x n peak-FLOP/s matmul"
    )
    p.add_argument("--seed", type=int, default=0, help="epoch order and SFTMix lambdas")
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip measure 4b, the train step eager vs --compile (its compilation takes a while); "
        "measured: %(default)s",
    )
    p.add_argument("--only-save", action="store_true", help="measure 5c alone (the state save)")
    return p.parse_args(argv)


def log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def amp_dtype(device, dtype="auto"):
    """train.py's autocast dtype for its --dtype (model.compute_dtype): bf16, or None for fp32."""
    return torch.bfloat16 if M.compute_dtype(dtype, device) == torch.bfloat16 else None


def amp(device):
    return torch.autocast(
        device.type, dtype=amp_dtype(device), enabled=amp_dtype(device) is not None
    )


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def race(steps: dict, device, warmup, n, warm=None):
    """Median seconds of each step function, the variants interleaved (order reversed every round);
    the seconds of each one's warm-up steps go to warm[name], if warm is a dict."""
    times = {name: [] for name in steps}
    warm = {} if warm is None else warm
    warm.update({name: [] for name in steps})
    for i in range(warmup + n):
        for name in list(steps) if i % 2 == 0 else list(reversed(steps)):
            sync(device)
            t0 = time.perf_counter()
            steps[name]()
            sync(device)
            (times if i >= warmup else warm)[name].append(time.perf_counter() - t0)
    for name, t in times.items():
        log(f"  {name}: " + " ".join(f"{x:.3g}" for x in t) + " s")
    return {name: statistics.median(t) for name, t in times.items()}


@contextlib.contextmanager
def count_positions(counter: list):
    """Add to counter[0] the token ids entering any nn.Embedding inside the block: the positions
    computed, however the trainer lays out its batches (padded rows, packed rows, one flattened
    row)."""

    def hook(module, inputs, output):
        if isinstance(module, torch.nn.Embedding):
            counter[0] += inputs[0].numel()

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        yield counter
    finally:
        handle.remove()


def counted(counter: list, step):
    """step, made to set counter[0] to the positions computed by its last run (fixed data and seeds:
    the same every run)."""

    def run():
        counter[0] = 0
        with count_positions(counter):
            step()

    return run


def padding_share(positions, real_tokens):
    """Share of the positions computed that hold no token of a sample: 1 - real tokens / positions."""
    return 1 - real_tokens / positions


def trl_example(sample):
    """The sample as TRL's pre-tokenized row: the token ids (input_ids plus the last trained target)
    with unshifted labels (-100 where not trained), so TRL trains exactly the tokens train.py
    trains."""
    ids = sample.input_ids + [x for x in sample.labels[-1:] if x != data.IGNORE]  # (L or L + 1,)
    return {"input_ids": ids, "labels": [data.IGNORE] + sample.labels[: len(ids) - 1]}


def trl_epoch(args, targs, samples, out, padding_free, device):
    """TRL's SFTTrainer: load the model, one epoch with train.py's settings, save its checkpoint and
    the model.
    """
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [trl_example(s) for s in samples]
    config = SFTConfig(
        output_dir=out,
        num_train_epochs=1,
        per_device_train_batch_size=targs.micro_batch,
        gradient_accumulation_steps=targs.global_batch // targs.micro_batch,
        learning_rate=targs.lr,
        lr_scheduler_type="cosine",
        warmup_steps=targs.warmup_ratio,
        weight_decay=targs.weight_decay,
        adam_beta1=targs.betas[0],
        adam_beta2=targs.betas[1],
        adam_epsilon=1e-8,
        max_grad_norm=targs.grad_clip,
        # the samples are cut to max_len already
        max_length=None if padding_free else args.max_len + 1,
        padding_free=padding_free,
        activation_checkpointing=False,
        bf16=device.type == "cuda",
        use_cpu=device.type == "cpu",
        seed=args.seed,
        report_to="none",
        save_strategy="epoch",
        logging_strategy="no",
        disable_tqdm=True,
    )
    peer = AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, attn_implementation="sdpa"
    )
    with contextlib.redirect_stdout(sys.stderr):  # its summary line; stdout carries the table
        trainer = SFTTrainer(
            model=peer,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(args.model),
        )
        trainer.train()
        trainer.save_model(str(Path(out) / "final"))
    sync(device)


def our_epoch(argv):
    """train.py's main in this process (same threads): load, one epoch, OUT/state and OUT/final
    written.
    """
    with contextlib.redirect_stdout(sys.stderr):
        train.main(argv)


def epoch_rows(args, tok, samples, device):
    """1 and 2: one NTP epoch, TRL (padded, padding-free) / train.py, and the padding share of each."""
    targs = trainer_args(args, "ntp", args.global_batch)
    positions = {name: [0] for name in ("trl", "trl_padding_free", "ours")}
    real = {
        "ours": sum(len(s.input_ids) for s in samples),
        "trl": sum(len(trl_example(s)["input_ids"]) for s in samples),
    }
    real["trl_padding_free"] = real["trl"]
    with tempfile.TemporaryDirectory() as tmp:
        out = (Path(tmp) / str(i) for i in itertools.count())  # a fresh run directory for every run
        t = race(
            {
                "trl": counted(
                    positions["trl"],
                    lambda: trl_epoch(args, targs, samples, next(out), False, device),
                ),
                "trl_padding_free": counted(
                    positions["trl_padding_free"],
                    lambda: trl_epoch(args, targs, samples, next(out), True, device),
                ),
                "ours": counted(
                    positions["ours"],
                    lambda: our_epoch(train_argv(args, "ntp", args.global_batch, next(out))),
                ),
            },
            device,
            0,
            args.repeats,
        )
    pad = {name: padding_share(positions[name][0], real[name]) for name in positions}
    what = f"{len(samples)} samples, micro-batch {args.batch}, global {args.global_batch}, max_len {args.max_len}"
    return t["ours"], [
        (
            f"one NTP epoch s ({what}; load, train, save): TRL SFTTrainer default (padded) / train.py",
            f"{t['ours']:.1f}",
            f"{t['trl']:.1f}",
            t["trl"] / t["ours"],
            ">= 2.0",
            t["trl"] / t["ours"] >= 2.0,
        ),
        (
            "one NTP epoch s: TRL SFTTrainer padding_free=True / train.py",
            f"{t['ours']:.1f}",
            f"{t['trl_padding_free']:.1f}",
            t["trl_padding_free"] / t["ours"],
            ">= 1.5",
            t["trl_padding_free"] / t["ours"] >= 1.5,
        ),
        (
            "padding share of the positions computed, the epoch: train.py / TRL default",
            f"{pad['ours']:.1%}",
            f"{pad['trl']:.1%}",
            None,
            "<= 5% (ours)",
            pad["ours"] <= 0.05,
        ),
        (
            "padding share of the positions computed, the epoch: train.py / TRL padding_free=True",
            f"{pad['ours']:.1%}",
            f"{pad['trl_padding_free']:.1%}",
            None,
            "<= 5% (ours)",
            pad["ours"] <= 0.05,
        ),
    ]


def prompts_of(path, tok, n):
    """Token ids of the first n conversations' first user turn (with a system turn before it, if
    any).
    """
    examples = data.read_examples(path)[:n]
    firsts = [e.messages[: [m["role"] for m in e.messages].index("user") + 1] for e in examples]
    return [data.encode_prompt(m, tok) for m in firsts]


def generation_rows(args, tok, device):
    """3: tokens/s of greedy generation, model.generate / transformers' generate, same prompts and
    lengths: eager (transformers' dynamic cache), and compiled (model.generate(compile="inductor")
    / transformers' static cache, cache_implementation="static", its forward compiled by its
    generate)."""
    from transformers import CompileConfig, GenerationConfig, LlamaForCausalLM

    prompts = prompts_of(args.data, tok, args.gen_batch)
    ours = M.load_pretrained(args.model, device=device)
    peer = LlamaForCausalLM.from_pretrained(
        args.model, attn_implementation="sdpa", dtype=torch.float32
    ).to(device)
    P = max(map(len, prompts))
    left = [[tok.pad_id] * (P - len(p)) + p for p in prompts]  # (B, P) left-padded
    input_ids = torch.tensor(left, device=device)
    attention_mask = torch.tensor(
        [[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device
    )
    # never stop early: both generate exactly --new-tokens
    peer.generation_config.eos_token_id = None
    greedy = dict(
        max_new_tokens=args.new_tokens, do_sample=False, eos_token_id=None, pad_token_id=tok.pad_id
    )
    compile_config = CompileConfig()  # its defaults (mode "reduce-overhead": CUDA graphs)
    compile_config._compile_all_devices = True  # else transformers compiles on accelerators only
    configs = {
        "transformers": GenerationConfig(**greedy),
        "transformers compiled": GenerationConfig(
            **greedy, cache_implementation="static", compile_config=compile_config
        ),
    }
    new = {}

    def ours_step(name, backend):
        def step():
            with amp(device):
                new[name] = M.generate(ours, prompts, args.new_tokens, compile=backend)

        return step

    def peer_step(name):
        def step():
            with amp(device), torch.no_grad():
                new[name] = peer.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    generation_config=configs[name],
                )[:, P:].tolist()

        return step

    t = race(
        {
            "ours": ours_step("ours", None),
            "transformers": peer_step("transformers"),
            "ours compiled": ours_step("ours compiled", "inductor"),
            "transformers compiled": peer_step("transformers compiled"),
        },
        device,
        1,
        args.repeats,
    )
    rate = {name: sum(map(len, new[name])) / t[name] for name in t}
    for name in new:
        same = agreeing(new[name], new["ours"])
        log(
            f"  greedy continuations: {name} agrees with ours (eager) on its first {same} of "
            f"{sum(map(len, new[name]))} tokens (summed over prompts)"
        )
    what = (
        f"generation tokens/s, {len(prompts)} prompts x {args.new_tokens} new tokens, greedy, "
        f"KV cache"
    )
    return [
        (
            f"{what}: model.generate / transformers generate",
            f"{rate['ours']:.1f}",
            f"{rate['transformers']:.1f}",
            rate["ours"] / rate["transformers"],
            ">= 1.0",
            rate["ours"] >= rate["transformers"],
        ),
        (
            f"{what}, compiled: model.generate(compile) / transformers generate, static cache",
            f"{rate['ours compiled']:.1f}",
            f"{rate['transformers compiled']:.1f}",
            rate["ours compiled"] / rate["transformers compiled"],
            ">= 1.0",
            rate["ours compiled"] >= rate["transformers compiled"],
        ),
    ]


def agreeing(tokens, reference) -> int:
    """How many tokens of each prompt's continuation agree with the reference's before they part,
    summed over the prompts."""
    pairs = zip(tokens, reference)
    return sum(
        len(list(itertools.takewhile(lambda ab: ab[0] == ab[1], zip(x, y)))) for x, y in pairs
    )


def micro_step(model, targs, samples, batch, device, optimizer=None):
    """train.forward_backward on one global batch that is a single micro-batch, then the optimizer's
    step if one is given, then drop the gradients."""
    lam = (
        sftmix.sample_lambda(targs.alpha, len(batch) // 2, targs.seed, 0)
        if targs.mode == "sftmix"
        else None
    )
    train.forward_backward(
        model,
        samples,
        batch,
        lam,
        targs.mu,
        targs.mixup_only,
        targs.micro_batch,
        targs.grad_clip,
        device,
        amp_dtype(device, targs.dtype),
        rank=0,
        world=1,
    )
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)


def head_step(model, samples, batch, lam, chunk, device):
    """Forward + backward of one SFTMix micro-batch (batch: len(lam) pairs) as
    train.forward_backward computes it, with sftmix.head_losses running the LM head on `chunk`
    positions at a time."""
    (mb,), _, _ = sftmix.micro_batches(batch, samples, 0, 1, len(batch), lam)
    b = data.to_device(data.pack([samples[i] for i in mb.rows]), device)
    pairs = data.to_device(
        {"mix_c": mb.mix_c, "mix_u": mb.mix_u, "lam": mb.lam, "rest": mb.rest}, device
    )
    with amp(device):
        nll, mix = model(
            b["input_ids"],
            seqs=b["seqs"],
            logits_at=b["trained"],
            head=functools.partial(sftmix.head_losses, targets=b["targets"], chunk=chunk, **pairs),
        )
    (nll.sum() + mix.sum()).backward()
    model.zero_grad(set_to_none=True)


def train_step(model, optimizer, input_ids, targets, trained, logits_of):
    """Forward + NTP loss + backward + AdamW step; logits_of(model, input_ids, trained) -> (N, V) at
    trained, (N,) indices into the flattened (B*T) positions, whose next tokens are targets (N,)."""
    with amp(input_ids.device):
        logits = logits_of(model, input_ids, trained)
    F.cross_entropy(logits.float(), targets).backward()  # the same loss code for both models
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def peak_memory(step, device):
    """Bytes of tensors allocated at the peak of step() above those held just before it."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        return torch.cuda.max_memory_allocated(device) - before
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
    ) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]"
    )
    # + allocation, - free, in time order
    return max(itertools.accumulate(nbytes for _, nbytes in events))


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


def train_argv(args, mode, global_batch, out="unused", *flags):
    """train.py's command line for a run on these samples (its defaults for alpha, mu, grad clip,
    dtype, ...).
    """
    return [
        "--model",
        args.model,
        "--data",
        args.data,
        "--out",
        str(out),
        "--mode",
        mode,
        "--micro-batch",
        str(args.batch),
        "--global-batch",
        str(global_batch),
        "--max-len",
        str(args.max_len),
        "--seed",
        str(args.seed),
        *flags,
    ]


def save_rows(model, targs, samples, batch, device, repeats):
    """The resumable state's save (train.Saver: DCP, safetensors, weights + AdamW moments)
    against one train step of the same model (train.forward_backward + AdamW on `batch`): the
    seconds the step loop waits for a save, synchronous (the whole write) and asynchronous (the copy
    to host memory; a thread writes the rest), interleaved, median of `repeats`; and the
    asynchronous write's whole time."""

    optimizer = train.adamw(model, 1e-6, 0.1)
    step = functools.partial(micro_step, model, targs, samples, batch, device, optimizer)
    step()  # AdamW's moments exist: the state has its full size
    t_step = race({"step": step}, device, 0, repeats)["step"]
    waits, whole = {"sync": [], "async": []}, []
    with tempfile.TemporaryDirectory() as out:
        for k in range(repeats):
            for mode in ("sync", "async"):
                saver = train.Saver(Path(out) / mode, 0, asynchronous=mode == "async")
                t0 = time.perf_counter()
                saver.save(model, optimizer, k + 1, {}, {})
                waits[mode].append(time.perf_counter() - t0)
                saver.wait()
                whole += [time.perf_counter() - t0] * (mode == "async")
        size = sum(f.stat().st_size for f in (Path(out) / "sync").rglob("*.safetensors"))
    t = {mode: statistics.median(w) for mode, w in waits.items()}
    log(
        f"  state {size / 2**20:.0f} MiB; waits sync {waits['sync']}, async {waits['async']}; async whole {whole}"
    )
    return [
        (
            f"state save s the step loop waits ({size / 2**20:.0f} MiB: weights + AdamW), synchronous / train "
            f"step s",
            f"{t['sync']:.3g}",
            f"{t_step:.3g}",
            t["sync"] / t_step,
            "(its cost in steps)",
            None,
        ),
        (
            "state save s the step loop waits, asynchronous (copy to host memory) / synchronous",
            f"{t['async']:.3g}",
            f"{t['sync']:.3g}",
            t["async"] / t["sync"],
            "< 1.0",
            t["async"] < t["sync"],
        ),
        (
            "state save s, asynchronous, until written / train step s",
            f"{statistics.median(whole):.3g}",
            f"{t_step:.3g}",
            statistics.median(whole) / t_step,
            "(a save every K >= this steps: one in flight)",
            None,
        ),
    ]


def trainer_args(args, mode, global_batch, *flags):
    """train.py's flags, as train.parse_args reads train_argv."""
    return train.parse_args(train_argv(args, mode, global_batch, "unused", *flags))


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tok = data.load_tokenizer(args.model)
    samples = data.load_dataset(args.data, tok, max_len=args.max_len, verbose=False)[0]
    if args.only_save:  # 5c alone: no peer to import
        longest = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))[
            : args.batch
        ]
        print(
            f"machine: {machine(device)}; torch {torch.__version__}, {torch.get_num_threads()} threads"
        )
        print("| measure | ours | peer | ratio | goal | met |\n|---|---:|---:|---:|---|---|")
        for name, value, peer_value, ratio, goal, met in save_rows(
            M.load_pretrained(args.model, device=device),
            trainer_args(args, "ntp", args.batch),
            samples,
            longest,
            device,
            args.steps,
        ):
            print(
                f"| {name} | {value} | {peer_value} | {ratio:.2f} | {goal} | {'' if met is None else met} |"
            )
        return
    if len(samples) % args.global_batch:
        raise data.InputError(
            f"{args.data}: {len(samples)} samples; expected a multiple of --global-batch "
            f"{args.global_batch}, so that train.py and TRL train on the same examples"
        )
    import transformers
    import trl

    print(
        f"machine: {machine(device)}; torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, {torch.get_num_threads()} threads, "
        f"{'bf16 autocast' if device.type == 'cuda' else 'fp32'}; {len(samples)} samples of {args.data}, "
        f"max_len {args.max_len}"
    )
    rows = []

    log(
        f"1-2/7 one NTP epoch: TRL default, TRL padding_free, train.py; {args.repeats} interleaved runs each"
    )
    t_epoch, epoch = epoch_rows(args, tok, samples, device)
    rows += epoch
    log(f"3/7 generation: model.generate vs transformers, 1 + {args.repeats} runs each")
    rows += generation_rows(args, tok, device)

    # 4. train step, ours vs transformers: the B longest samples; as an SFTMix micro-batch (5) rows
    # [0, B/2) pair with [B/2, B)
    longest = sorted(range(len(samples)), key=lambda i: -len(samples[i].input_ids))[: args.batch]
    b = data.collate([samples[i] for i in longest], tok.pad_id)
    input_ids, labels = b["input_ids"].to(device), b["labels"].flatten()  # (B, T), (B*T,)
    B, T = input_ids.shape
    trained = (labels != data.IGNORE).nonzero().squeeze(1)  # (N,) on the host, before any timing
    trained, targets = trained.to(device), labels[trained].to(device)
    ours = M.load_pretrained(args.model, device=device)
    log(f"4/7 train step: ours vs transformers, {args.warmup} + {args.steps} steps each")
    peer = transformers.LlamaForCausalLM.from_pretrained(
        args.model, attn_implementation="sdpa", dtype=torch.float32
    ).to(device)
    adamw = {m: train.adamw(m, 1e-6, 0.01) for m in (ours, peer)}  # train.py's AdamW for both
    t = race(
        {
            "ours": lambda: train_step(
                ours, adamw[ours], input_ids, targets, trained, lambda m, x, at: m(x, logits_at=at)
            ),
            "transformers": lambda: train_step(
                peer,
                adamw[peer],
                input_ids,
                targets,
                trained,
                lambda m, x, at: m(input_ids=x, use_cache=False).logits.flatten(0, 1)[at],
            ),
        },
        device,
        args.warmup,
        args.steps,
    )
    peer = adamw = None  # freed before the next measure
    t_ours = t["ours"]
    rows.append(
        (
            f"train step tokens/s, {B}x{T} (fwd + loss + bwd + AdamW): ours / transformers",
            f"{B * T / t['ours']:.0f}",
            f"{B * T / t['transformers']:.0f}",
            t["transformers"] / t["ours"],
            ">= 1.0 (aim 1.2)",
            t["transformers"] / t["ours"] >= 1.0,
        )
    )

    # 4b. the train step of train.py (forward_backward + AdamW), eager vs --compile (prepare_model
    # compiles each block), on SFTMix global batches of B consecutive samples, one micro-batch each:
    # packed rows of different lengths, so the warm-up (at least 2 steps: one graph for the first
    # length, one dynamic for the next) holds the compilation, reported as the compiled warm-up's
    # seconds less the eager warm-up's
    if args.compile:
        log(f"4b/7 train step: eager vs --compile, {max(args.warmup, 2)} + {args.steps} steps each")
        batches = [list(range(k, k + B)) for k in range(0, len(samples) - B + 1, B)]
        variants = {
            name: trainer_args(args, "sftmix", B, *flags)
            for name, flags in (("eager", ()), ("compiled", ("--compile",)))
        }
        steps = {}
        for name, a in variants.items():
            bf16 = amp_dtype(device, a.dtype) is not None
            prepare = functools.partial(
                train.prepare_model,
                lora=(0, 0, ()),
                activation_checkpointing=False,
                compile=a.compile,
                mesh=None,
                bf16=bf16,
            )
            m = M.load_pretrained(args.model, device=device, prepare=prepare)
            optimizer, order = (
                train.adamw(m, a.lr, a.weight_decay, a.betas),
                itertools.cycle(batches),
            )
            steps[name] = lambda a=a, m=m, o=optimizer, order=order: micro_step(
                m, a, samples, next(order), device, o
            )
        warm = {}
        t = race(steps, device, max(args.warmup, 2), args.steps, warm)
        compile_s = sum(warm["compiled"]) - sum(warm["eager"])
        del steps
        rows.append(
            (
                f"train step s, SFTMix, {B} samples packed (train.forward_backward + AdamW): "
                f"train.py --compile / eager",
                f"{t['compiled']:.3g}",
                f"{t['eager']:.3g}",
                t["compiled"] / t["eager"],
                "< 1.0",
                t["compiled"] < t["eager"],
            )
        )
        rows.append(
            (
                f"compile s (the {len(warm['compiled'])} warm-up steps of --compile less eager's) / "
                f"eager train step s",
                f"{compile_s:.3g}",
                f"{t['eager']:.3g}",
                compile_s / t["eager"],
                "(its cost in eager steps)",
                None,
            )
        )

    # 5. SFTMix vs NTP micro-batch: time, then peak memory
    log("5/7 micro-batch step: SFTMix vs NTP, time, then peak memory")
    micro = {mode: trainer_args(args, mode, B) for mode in ("ntp", "sftmix")}
    steps = {
        mode: lambda mode=mode: micro_step(ours, micro[mode], samples, longest, device)
        for mode in ("ntp", "sftmix")
    }
    t = race(steps, device, args.warmup, args.steps)
    rows.append(
        (
            f"micro-batch s, {B}x{T} (train.forward_backward): SFTMix / NTP",
            f"{t['sftmix']:.2f}",
            f"{t['ntp']:.2f}",
            t["sftmix"] / t["ntp"],
            "<= 1.05",
            t["sftmix"] / t["ntp"] <= 1.05,
        )
    )
    mem = {mode: peak_memory(step, device) for mode, step in steps.items()}
    how = "max_memory_allocated" if device.type == "cuda" else "torch.profiler allocations"
    rows.append(
        (
            f"micro-batch peak tensor MiB above pre-step ({how}): SFTMix / NTP",
            f"{mem['sftmix'] / 2**20:.0f}",
            f"{mem['ntp'] / 2**20:.0f}",
            mem["sftmix"] / mem["ntp"],
            "<= 1.10",
            mem["sftmix"] / mem["ntp"] <= 1.10,
        )
    )

    # the same SFTMix micro-batch at a 128K vocabulary (Llama 3's), where the LM head's logits
    # dominate memory: sftmix.head_losses in chunks of sftmix.CHUNK positions (its default), against
    # one chunk of all positions
    log("5b/7 SFTMix micro-batch at a 128K vocabulary: peak memory, chunked vs unchunked LM head")
    big = M.Transformer(
        M.ModelArgs(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            vocab_size=128256,
        )
    ).to(device)
    g = torch.Generator().manual_seed(0)
    # tokens per example: the 4 examples' trained positions make several chunks
    L = 4 * args.max_len
    long = [
        data.Sample(
            str(i),
            torch.randint(0, 128256, (L,), generator=g).tolist(),
            [data.IGNORE] * 24 + torch.randint(0, 128256, (L - 24,), generator=g).tolist(),
        )
        for i in range(4)
    ]
    targs = trainer_args(args, "sftmix", 4)
    lam = sftmix.sample_lambda(targs.alpha, 2, targs.seed, 0)
    mem = {
        name: peak_memory(
            lambda chunk=chunk: head_step(big, long, [0, 1, 2, 3], lam, chunk, device), device
        )
        for name, chunk in (("chunked", sftmix.CHUNK), ("unchunked", 10**9))
    }
    rows.append(
        (
            f"SFTMix micro-batch peak tensor MiB, 2 pairs x {L - 24} trained tokens, vocabulary 128256: LM head in "
            f"chunks of {sftmix.CHUNK} / unchunked",
            f"{mem['chunked'] / 2**20:.0f}",
            f"{mem['unchunked'] / 2**20:.0f}",
            mem["chunked"] / mem["unchunked"],
            "<= 0.5",
            mem["chunked"] / mem["unchunked"] <= 0.5,
        )
    )
    big = None  # freed before the next measure

    # 6. dynamics pass (one checkpoint) vs the NTP epoch of 1, and its padding share
    log(f"6/7 dynamics pass over {len(samples)} samples, {args.repeats} runs")
    counter = [0]
    t_dyn = race(
        {
            "dynamics": counted(
                counter,
                lambda: sftmix.response_nll(
                    ours, samples, args.eval_batch, device, amp_dtype(device)
                ),
            )
        },
        device,
        0,
        args.repeats,
    )["dynamics"]
    pad = padding_share(counter[0], sum(len(s.input_ids) for s in samples))
    rows.append(
        (
            f"s over {len(samples)} samples: dynamics pass (forward, batches of {args.eval_batch}) / "
            f"NTP epoch of train.py (1)",
            f"{t_dyn:.3g}",
            f"{t_epoch:.3g}",
            t_dyn / t_epoch,
            "<= 0.4",
            t_dyn / t_epoch <= 0.4,
        )
    )
    rows.append(
        (
            "padding share of the positions computed, the dynamics pass (ours)",
            f"{pad:.1%}",
            "",
            None,
            "<= 5%",
            pad <= 0.05,
        )
    )

    # 7. model FLOP/s vs matmul FLOP/s
    log(f"7/7 {args.matmul_size}^3 matmul")
    log("5c/7 resumable state save vs train step: synchronous, asynchronous")
    rows += save_rows(ours, micro["ntp"], samples, longest, device, args.steps)

    a = ours.args
    # tied embedding counted once: it is the LM-head matmul
    n_params = sum(p.numel() for p in ours.parameters())
    step_flops = (
        6 * n_params * B * T
        + 12 * a.num_hidden_layers * a.num_attention_heads * a.head_dim * T * B * T
    )
    peak = matmul_flops(
        args.matmul_size, torch.bfloat16 if device.type == "cuda" else torch.float32, device
    )
    rows.append(
        (
            f"GFLOP/s: train step 4 (ours) / {args.matmul_size}^3 matmul",
            f"{step_flops / t_ours / 1e9:.1f}",
            f"{peak / 1e9:.1f}",
            step_flops / t_ours / peak,
            "(utilisation)",
            None,
        )
    )

    print(
        f"\nmodel FLOPs per train step = 6 N B T + 12 L H hd B T^2 (PaLM, no causal discount) with N = "
        f"{n_params / 1e6:.1f}M parameters, L = {a.num_hidden_layers}, H = {a.num_attention_heads}, "
        f"hd = {a.head_dim}: {step_flops / 1e12:.2f} TFLOP\n"
    )
    print("| measure | ours / SFTMix | peer | ratio | goal | met |\n|---|---:|---:|---:|---|---|")
    for name, value, peer_value, ratio, goal, met in rows:
        print(
            f"| {name} | {value} | {peer_value} | {'—' if ratio is None else f'{ratio:.2f}'} | {goal} | "
            f"{'' if met is None else 'yes' if met else 'no'} |"
        )


if __name__ == "__main__":
    try:
        main()
    except data.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
