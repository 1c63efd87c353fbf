"""Throughput on one GPU: tokens/s and MFU of train.py's bf16 step, eager and --compile, against
transformers + TRL's padding-free collator on the same packed rows, eager and as TRL advises
(FlashAttention 2, compiled); and tokens/s of eval.py generate's decoding against transformers'
generate. Prints Markdown tables.

    python scripts/get_sharegpt.py --out .assets/sharegpt-gpu --train 256 --heldout 0 --seed 0
    --max-chars 8000 python scripts/bench_gpu.py --tokenizer .assets/SmolLM2-135M-Instruct --data
    .assets/sharegpt-gpu/train.jsonl

The model has --shape's dimensions (SmolLM2-1.7B's by default, a Llama: 24 blocks, D 2048, 32 heads,
vocabulary 49152) and random weights, the same in every variant (transformers' initialisation,
copied into model.py's Transformer: the parameter names are HF's). A train step is one global batch
of --batch consecutive samples, one packed row, forward + loss + backward + grad clip 1.0 + fused
AdamW, fp32 weights under bf16 autocast:
  train.py            train.forward_backward, NTP (and SFTMix, --compile): attention over the row's
                      sequences right-padded (model.unpack), the LM head at the trained positions
  transformers + TRL  LlamaForCausalLM on trl's DataCollatorForLanguageModeling(padding_free=True)
                      batch, the row flattened with position_ids restarting at each sequence, as
                      SFTTrainer feeds it; its loss over every position (logits (S, V)). Eager with
                      sdpa; and as TRL's documentation advises for padding-free batches:
                      flash_attention_2 (when flash-attn imports; else sdpa, and stderr says so),
                      eager, and compiled as SFTConfig(torch_compile=True) compiles it
                      (torch.compile(model): inductor, default mode); one model and AdamW.
Each variant runs --warmup steps (they hold the compilation) and --steps more, untimed, then after
every variant has, the --steps again, timed, back to back (run_steps). tokens/s = the timed steps'
tokens / their seconds; step memory = the most the step allocates above what is held before it.
MFU = model FLOPs / seconds / the GPU's dense bf16 peak, the FLOPs being those the step needs, the
same for every variant: 6 x (block parameters) per token, 6 V D per trained position (the LM head
where a loss is), and causal attention, 6 H hd n^2 per sequence of n tokens and block (forward
2 H hd n^2, backward twice that).

Generation, at each --gen-prompts: the same weights in bf16, greedy, exactly --new-tokens new tokens
a prompt (first user turns of --data, no stop token): model.generate as eval.py generate runs it,
eager and --compile, against transformers' generate with its static cache
(cache_implementation="static"), which its generate compiles (CompileConfig's defaults; on the CPU
told to, as it compiles on accelerators only). The first run of each holds its compilation,
untimed; tokens/s: the median of the next --gen-repeats. With --gen-out, the weights it generates
with (model/, an HF directory) and generation.json, each variant's new tokens of each prompt, are
written there.
"""

import argparse
import json
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench import (  # noqa: E402 (scripts/ on the path first)
    agreeing,
    log,
    machine,
    matmul_flops,
    micro_step,
    prompts_of,
    race,
    sync,  # noqa: E402
    trl_example,
)

import data  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402

SHAPES = {  # config.json fields of published Llama-shaped models
    "smollm2-1.7b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=49152,
        rope_theta=130000,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "llama-3.2-1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=49152,  # its vocabulary: the tokenizer's
        rope_theta=500000,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        max_position_embeddings=8192,
    ),
    "tiny": dict(  # a CPU check of this script
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=49152,
        tie_word_embeddings=True,
    ),
}
# dense bf16 FLOP/s, SXM, from the data sheets
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument(
        "--tokenizer",
        default=str(ROOT / ".assets/SmolLM2-135M-Instruct"),
        help="HF directory with the tokenizer and its chat template",
    )
    p.add_argument(
        "--data", default=str(ROOT / ".assets/sharegpt-gpu/train.jsonl"), help="ShareGPT JSONL"
    )
    p.add_argument(
        "--shape", choices=SHAPES, default="smollm2-1.7b", help="model dimensions (random weights)"
    )
    p.add_argument("--max-len", type=int, default=2048, help="tokens per sample")
    p.add_argument(
        "--batch", type=int, nargs="+", default=[8], help="samples per step (one packed row); each"
    )
    p.add_argument("--warmup", type=int, default=3, help="untimed steps of each variant")
    p.add_argument(
        "--steps",
        type=int,
        default=10,
        help="timed steps of each variant (tokens/s: their tokens over their seconds)",
    )
    p.add_argument(
        "--gen-prompts",
        type=int,
        nargs="*",
        default=[8, 32],
        help="prompts generated together, each a generation row (none: no generation)",
    )
    p.add_argument("--new-tokens", type=int, default=256, help="new tokens for each prompt")
    p.add_argument(
        "--gen-repeats", type=int, default=3, help="timed generations of each variant (median)"
    )
    p.add_argument(
        "--gen-out",
        type=Path,
        help="directory for the generation weights (model/, an HF directory) and generation.json: "
        "for each --gen-prompts, its prompts and each variant's new tokens of each",
    )
    p.add_argument(
        "--no-train", dest="train", action="store_false", help="skip the train-step table"
    )
    return p.parse_args(argv)


def step_flops(margs, rows):
    """Model FLOPs of one step on each row (lists of samples): this module's docstring."""
    D, L, V, H, hd = (
        margs.hidden_size,
        margs.num_hidden_layers,
        margs.vocab_size,
        margs.num_attention_heads,
        margs.head_dim,
    )
    K, I = margs.num_key_value_heads, margs.intermediate_size
    block = D * (H + 2 * K) * hd + H * hd * D + 3 * D * I
    flops = []
    for row in rows:
        n = [len(s.input_ids) for s in row]
        trained = sum(t != data.IGNORE for s in row for t in s.labels)
        flops.append(
            6 * L * block * sum(n) + 6 * V * D * trained + 6 * L * H * hd * sum(k * k for k in n)
        )
    return flops


def trl_batch(collate, row, device) -> dict:
    """The samples of a row as TRL's padding-free collator lays them out for SFTTrainer: one
    flattened row with position_ids restarting at each sample, labels -100 at each sample's first
    position; tensors on device."""
    return {
        k: v.to(device) if torch.is_tensor(v) else v
        for k, v in collate([trl_example(s) for s in row]).items()
    }


def peer_step(peer, optimizer, batch, forward=None, attention="sdpa"):
    """transformers + TRL: the collated padding-free batch through LlamaForCausalLM (forward: peer,
    or its torch.compile'd self) with the attention implementation `attention`, its loss, clip,
    AdamW."""
    if peer.config._attn_implementation != attention:
        peer.set_attn_implementation(attention)
    with torch.autocast("cuda" if batch["input_ids"].is_cuda else "cpu", dtype=torch.bfloat16):
        loss = (peer if forward is None else forward)(**batch).loss
    loss.backward()
    nn.utils.clip_grad_norm_(peer.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def advised_attention(device) -> str:
    """The attention TRL's documentation advises for padding-free batches: flash_attention_2 when
    flash-attn imports on this machine (CUDA), else sdpa, said on stderr."""
    if device.type == "cuda":
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError as e:
            log(f"flash-attn does not import ({e}): the TRL-advised peer runs sdpa")
    else:
        log("no CUDA: the TRL-advised peer runs sdpa (FlashAttention 2 is CUDA-only)")
    return "sdpa"


def run_steps(steps: dict, warmup, timed, device):
    """Seconds of each variant's timed steps (step(k) on row k for k in timed) and the most bytes
    its steps hold above what was allocated before them (activations, gradients: the step's working
    memory; CUDA only).

    Two passes. In the first, each variant runs --warmup steps and the timed rows, untimed: its
    compilation, the caching allocator's blocks and the GPU's clocks reach their steady state. In
    the second, in the opposite order, each runs the timed rows back to back, as in training,
    timed."""
    seconds, memory = {}, {}
    for name in steps:
        for k in [*range(warmup), *timed]:
            steps[name](k)
    for name in reversed(steps):
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        times = []
        for k in timed:
            t0 = time.perf_counter()
            steps[name](k)
            sync(device)
            times.append(time.perf_counter() - t0)
        seconds[name] = sum(times)
        memory[name] = (
            torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else 0
        )
        log(f"  {name}: " + " ".join(f"{t:.3g}" for t in times) + " s")
        if device.type == "cuda":
            log(
                f"  {name}: host-device syncs in one more step: {cuda_syncs(lambda: steps[name](timed[0]))}"
            )
    return seconds, memory


def cuda_syncs(step) -> int:
    """Host-device synchronisations while step() runs, as CUDA's sync debug mode reports them (one
    warning each).
    """
    torch.cuda.set_sync_debug_mode("warn")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step()
    torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = data.load_tokenizer(args.tokenizer)
    samples = data.load_dataset(args.data, tok, max_len=args.max_len, verbose=False)[0]
    config = LlamaConfig(**SHAPES[args.shape], pad_token_id=0)
    with torch.device(device):
        peer = LlamaForCausalLM._from_config(
            config, attn_implementation="sdpa", dtype=torch.float32
        )
    margs = M.ModelArgs.from_hf_config(config.to_dict())
    print(
        f"\n{machine(device)}, torch {torch.__version__}, shape {args.shape} "
        f"({sum(p.numel() for p in peer.parameters()) / 1e9:.2f}B parameters)"
    )
    if args.train:
        train_table(args, samples, peer, margs, device)
    if args.gen_prompts:
        generation_table(args, tok, peer, margs, device)


def train_table(args, samples, peer, margs, device):
    """The train-step table: train.py's variants, transformers + TRL's (module docstring)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    flags = [
        "--model",
        args.tokenizer,
        "--data",
        "-",
        "--out",
        "unused",
        "--split",
        "-",
        "--dtype",
        "bf16",
    ]
    variants = {}  # name: model, prepared as train.py prepares it
    for name, extra in (("train.py", []), ("train.py --compile", ["--compile"])):
        with torch.device(device):
            ours = M.Transformer(margs)
        ours.load_state_dict(peer.state_dict())
        train.prepare_model(
            ours,
            lora=(0, 0, ()),
            activation_checkpointing=False,
            compile=bool(extra),
            mesh=None,
            bf16=True,
        )
        variants[name] = ours
    optimizers = {name: train.adamw(m, 1e-5, 0.1) for name, m in variants.items()}
    optimizers["peer"] = train.adamw(peer, 1e-5, 0.1)
    collate = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    # the same loss, both ways
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
        b = data.to_device(data.pack(samples[:4]), device)
        ours = variants["train.py"](b["input_ids"], seqs=b["seqs"], logits_at=b["trained"])
        ours = nn.functional.cross_entropy(ours.float(), b["targets"])
        theirs = peer(**trl_batch(collate, samples[:4], device)).loss
    log(
        f"NTP loss of the first 4 samples: train.py's model {ours.item():.4f}, transformers + TRL {theirs.item():.4f}"
    )
    attention = advised_attention(device)
    compiled_peer = torch.compile(peer)  # as SFTConfig(torch_compile=True): inductor, default mode
    trl = "transformers + TRL padding_free"
    peers = {
        f"{trl}, sdpa, NTP": (None, "sdpa"),
        f"{trl}, {attention}, NTP": (None, attention),
        f"{trl}, {attention}, torch_compile, NTP": (compiled_peer, attention),
    }
    eager_peer, advised_peer = list(peers)[0], list(peers)[-1]  # the first two: one if sdpa
    peak = next((v for k, v in PEAK_BF16.items() if k in machine(device)), None)
    n = 8192 if device.type == "cuda" else 512
    mm = matmul_flops(n, torch.bfloat16, device)
    log(
        f"{machine(device)}: bf16 {n}^3 matmul {mm / 1e12:.0f} TFLOP/s; data-sheet peak "
        f"{peak / 1e12 if peak else float('nan'):.0f}"
    )
    table = []
    for B in args.batch:
        rows = [samples[i : i + B] for i in range(0, len(samples) - B + 1, B)]
        # the rows of the timed steps
        timed = [(args.warmup + i) % len(rows) for i in range(args.steps)]
        flops = sum(step_flops(margs, [rows[k] for k in timed]))
        tokens = sum(len(s.input_ids) for k in timed for s in rows[k])
        peer_batches = [trl_batch(collate, row, device) for row in rows]
        steps = {}  # name: step(k) on row k
        for name, mode in (
            ("train.py", "ntp"),
            ("train.py --compile", "ntp"),
            ("train.py --compile", "sftmix"),
        ):
            targs = train.parse_args(
                flags + ["--mode", mode, "--micro-batch", str(B), "--global-batch", str(B)]
            )
            steps[f"{name}, {'NTP' if mode == 'ntp' else 'SFTMix'}"] = (
                lambda k, model=variants[name], opt=optimizers[name], targs=targs: micro_step(
                    model, targs, rows[k], list(range(B)), device, opt
                )
            )
        for name, (forward, attn) in peers.items():
            steps[name] = lambda k, forward=forward, attn=attn: peer_step(
                peer, optimizers["peer"], peer_batches[k], forward, attn
            )
        seconds, memory = run_steps(steps, args.warmup, timed, device)
        for name in steps:
            t = seconds[name]
            mfu = flops / t / peak if peak else float("nan")
            table.append(
                (
                    B,
                    round(tokens / len(timed)),
                    name,
                    t / len(timed),
                    tokens / t,
                    mfu,
                    memory[name] / 2**30,
                    seconds[eager_peer] / t,
                    seconds[advised_peer] / t,
                )
            )
    print(
        f"\nTrain step, bf16 autocast, fp32 weights; speed-up against {trl} eager sdpa and as "
        f"TRL advises ({attention}, torch_compile)\n"
    )
    print(
        "| samples per step | tokens per step (mean) | variant | step s (mean) | tokens/s | MFU "
        "| step memory GiB | speed-up vs TRL eager sdpa | speed-up vs TRL as advised |"
    )
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    for B, T, name, s, tps, mfu, gib, eager, advised in table:
        print(
            f"| {B} | {T} | {name} | {s:.4f} | {tps:,.0f} | {mfu:.1%} | {gib:.1f} | {eager:.2f} "
            f"| {advised:.2f} |"
        )


def generation_table(args, tok, peer, margs, device):
    """Generation tokens/s (module docstring): model.generate eager and compiled, transformers'
    generate with its static cache compiled, at each --gen-prompts; the weights of peer, in bf16."""
    from transformers import CompileConfig, GenerationConfig, LlamaForCausalLM

    dtype = torch.bfloat16
    with torch.device(device):
        theirs = LlamaForCausalLM._from_config(peer.config, attn_implementation="sdpa", dtype=dtype)
        theirs.eval()
        ours = M.Transformer(margs).to(dtype).eval()
    theirs.load_state_dict(peer.state_dict())
    ours.load_state_dict(peer.state_dict())
    if args.gen_out:
        theirs.save_pretrained(args.gen_out / "model")
    written = {}
    compile_config = CompileConfig()  # its defaults: inductor, mode "reduce-overhead" (CUDA graphs)
    compile_config._compile_all_devices = device.type != "cuda"  # else on accelerators only
    table = []
    for n in args.gen_prompts:
        prompts = prompts_of(args.data, tok, n)
        assert len(prompts) == n, f"{args.data}: {len(prompts)} conversations, --gen-prompts {n}"
        P = max(map(len, prompts))
        left = [[tok.pad_id] * (P - len(p)) + p for p in prompts]  # (n, P): left-padded
        input_ids = torch.tensor(left, device=device)
        attention_mask = torch.tensor(
            [[0] * (P - len(p)) + [1] * len(p) for p in prompts], device=device
        )
        config = GenerationConfig(
            max_new_tokens=args.new_tokens,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tok.pad_id,
            cache_implementation="static",
            compile_config=compile_config,
        )
        new = {}

        def ours_step(name, backend):
            def step():
                new[name] = M.generate(ours, prompts, args.new_tokens, compile=backend)

            return step

        def peer_step():
            with torch.no_grad():
                new["theirs"] = theirs.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config
                )[:, P:].tolist()

        names = {
            "ours": "eval.py generate",
            "ours compiled": "eval.py generate --compile",
            "theirs": "transformers generate, static cache, compiled",
        }
        t = race(
            {
                "ours": ours_step("ours", None),
                "ours compiled": ours_step("ours compiled", "inductor"),
                "theirs": peer_step,
            },
            device,
            1,
            args.gen_repeats,
        )
        for name in t:
            count = sum(map(len, new[name]))
            if name != "theirs":
                same = agreeing(new[name], new["theirs"])
                log(
                    f"  {names[name]}: its greedy tokens agree with transformers generate's on "
                    f"the first {same} of {count}"
                )
            rate, peer_rate = count / t[name], sum(map(len, new["theirs"])) / t["theirs"]
            table.append((n, names[name], rate, rate / peer_rate))
        written[n] = {"prompts": prompts, "new tokens": {names[k]: v for k, v in new.items()}}
    if args.gen_out:
        (args.gen_out / "generation.json").write_text(json.dumps(written))
    print(
        f"\nGeneration, bf16 weights, greedy, {args.new_tokens} new tokens a prompt, median of "
        f"{args.gen_repeats} after a first untimed run\n"
    )
    print("| prompts | variant | tokens/s | vs transformers static cache compiled |")
    print("|---:|---|---:|---:|")
    for n, name, rate, ratio in table:
        print(f"| {n} | {name} | {rate:,.0f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
