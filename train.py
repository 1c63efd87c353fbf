"""Instruction tuning with next-token prediction (NTP) or SFTMix, one process or torchrun (DDP or FSDP2).

    python train.py --mode ntp --model BASE --data train.jsonl --out runs/ref --dynamics 4   # stage 1
    python sftmix.py split --dynamics runs/ref/dynamics.jsonl --out runs/split.json           # stage 2
    python train.py --mode sftmix --model BASE --data train.jsonl --split runs/split.json --out runs/sftmix
    torchrun --nproc_per_node=8 train.py ...                                                  # the same on 8 ranks
    torchrun --nproc_per_node=8 train.py --shard fsdp --activation-checkpointing ...         # 8B-14B models
    python train.py ... --lora-rank 16 --lr 1e-4                                             # LoRA, merged into final/

Loss per global batch of G examples (NTP tokens counted over all micro-batches and ranks, not a mean of means):
    L_NTP   = sum over trained tokens of -log p(y_t | x, y_<t)  /  number of trained tokens
    L_Mixup = sum over mixed positions of the Mixup CE          /  number of mixed positions
    L       = L_NTP + mu * L_Mixup                                (sftmix; ntp has L = L_NTP; --mixup-only L_Mixup)
sftmix.micro_batches lays a global batch out over ranks and packed micro-batches; sftmix.head_losses computes
both terms from the final hidden states, the LM head in chunks. Writes OUT/metrics.jsonl, OUT/state/ (resumable:
safetensors and JSON, no pickle, made current by an atomic rename of OUT/state/latest.json; deleted at the end
unless --keep-state), OUT/final/ (HF checkpoint), and with --dynamics C, OUT/dynamics.jsonl (per example:
perplexity at C checkpoints, confidence, variability).
"""
import argparse
import hashlib
import json
import math
import os
import shutil
import time
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import sftmix
from data import InputError
from model import (LORA_TARGETS, ModelArgs, add_lora, compute_dtype, load_pretrained, merge_lora, model_dir,
                   save_pretrained)

# Flags that may change between a run and its resumption; every other flag, and what the inputs hold, must match
# the saved state. --lr and --grad-clip may change to rescue a run that diverged (the schedule is lr_at with the new
# --lr); --out, so that a run directory moved elsewhere resumes.
RESUMABLE_FLAGS = {"resume", "stop_at_step", "save_every", "eval_batch", "keep_state", "lr", "grad_clip", "out",
                   "compile", "deterministic", "save_dtype"}
# The inputs' paths may change too (moved with the run or not): what each holds must match instead, through a
# fingerprint in run_config (model: its config.json as ModelArgs reads it; data, heldout: token ids; split: halves).
FINGERPRINTS = {"model": "its config.json is not that of the run's model",
                "data": "the data changed since the run started",
                "heldout": "the held-out data changed since the run started",
                "split": "the split changed since the run started"}


def main(argv=None):
    with data.reported():  # bad input: one line and exit 2; a bug of ours keeps its traceback
        args = parse_args(argv)
        world = int(os.environ.get("WORLD_SIZE", 1))
        if world > 1:
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        try:
            train(args, rank, local_rank, world)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def train(args, rank, local_rank, world):
    # every flag and input checked before anything is written: the device, the data, the split, the schedule
    check_args(args, world)
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if args.deterministic:  # cuBLAS needs this before its first call to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    bf16 = compute_dtype(args.dtype, device) == torch.bfloat16
    amp_dtype = torch.bfloat16 if bf16 and args.shard == "ddp" else None  # FSDP2 casts through its policy
    out = Path(args.out)
    base = model_dir(args.model)  # an HF directory, or a run directory's final/
    model_args = ModelArgs.from_model_dir(base)  # a config.json we cannot run exactly fails here, not after loading
    tok = data.load_tokenizer(base)
    samples, stats = data.load_dataset(args.data, tok, args.prompt_format, args.max_len, args.format, verbose=False)
    heldout, heldout_stats = data.load_dataset(args.heldout, tok, args.prompt_format, args.max_len, verbose=False) \
        if args.heldout else (None, None)
    halves = split_indices(args.split, samples) if args.mode == "sftmix" else None
    batches_of = partial(epoch_batches, len(samples), halves, G=args.global_batch, seed=args.seed, alpha=args.alpha)
    steps_per_epoch = len(batches_of(0))
    total = steps_per_epoch * args.epochs
    if total == 0 and halves:
        raise InputError(f"{args.split}: {len(halves[0])} confident and {len(halves[1])} unconfident examples make "
                         f"{min(map(len, halves))} pairs, fewer than the {args.global_batch // 2} of one global batch")
    if total == 0:
        raise InputError(f"{args.data}: {len(samples)} samples fill no global batch of {args.global_batch}")
    points = dynamics_points(total, args.dynamics) if args.dynamics else []
    config = run_config(args, model_args, samples, heldout, halves)
    if args.resume and (out / "state" / "latest.json").exists():
        check_settings(out, config)
    if rank == 0:  # every input checked: now the run directory, then what was read
        writable_dir(out)
        print("\n".join(data.summary(s) for s in (stats, heldout_stats) if s))

    # the model: built on meta, prepared (LoRA, compile, FSDP2 units), then filled; the optimizer; the state
    torch.manual_seed(args.seed)  # LoRA's initial A
    model = load_pretrained(base, device=device, prepare=partial(prepare_model, args=args, bf16=bf16))
    wrapped = model  # what forward and backward go through: the model itself, FSDP2's in place, or DDP around it
    if args.shard == "ddp" and world > 1:
        wrapped = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      gradient_as_bucket_view=True)
    optimizer = adamw(model, args.lr, args.weight_decay, args.betas)
    step, dynamics = 0, {}
    if args.resume and (out / "state" / "latest.json").exists():
        step, dynamics = load_state(out, model, optimizer, rank, world)
    saved = step  # the step of the last complete state on disk
    if rank == 0:
        print(f"train: {args.mode}, {len(samples)} samples, {total} steps of {args.global_batch} examples "
              f"on {world} rank(s) ({args.shard}), {device.type}, {'bf16' if bf16 else 'fp32'}"
              f"{f', resuming after step {step}' if step else ''}")
        keep_metrics_until(out / "metrics.jsonl", step)

    batches, batches_epoch = None, None
    with tqdm(total=total, initial=step, desc=args.mode, disable=rank != 0) as progress:
        while step < total:
            # this step's global batch (and lambdas), and its learning rate: both fixed by the step alone
            epoch = step // steps_per_epoch
            if epoch != batches_epoch:
                batches, batches_epoch = batches_of(epoch), epoch
            batch, lam = batches[step % steps_per_epoch]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, args.lr, args.warmup_ratio)

            # forward and backward over this rank's micro-batches, then the update
            t0 = time.perf_counter()
            stats, n_input = forward_backward(args, wrapped, samples, batch, lam, device, amp_dtype, rank, world)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            # the step's one read from the device: the losses, the grad norm, and whether the weights are finite;
            # a divergence stops the run and writes nothing
            read = torch.cat([stats, weights_finite(model, world)])  # (5,)
            loss, ntp_loss, mix_loss, grad_norm, finite = read.tolist()
            if not all(math.isfinite(x) for x in (ntp_loss, mix_loss, grad_norm)):
                raise InputError(f"step {step + 1}: loss is not finite (ntp {ntp_loss}, mixup {mix_loss}, grad norm "
                                 f"{grad_norm}); stopped. {last_state(out, saved)}")
            if not finite:
                raise InputError(f"step {step + 1}: the update made weights inf or NaN "
                                 f"(lr {lr_at(step, total, args.lr, args.warmup_ratio):.3g})"
                                 f"; stopped. {last_state(out, saved)}")
            step += 1
            elapsed = time.perf_counter() - t0
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", ntp=f"{ntp_loss:.4f}", mixup=f"{mix_loss:.4f}")

            # training dynamics (stage 1): every example's response perplexity at this checkpoint
            if step in points:
                nll = sftmix.response_nll(wrapped, samples, args.eval_batch, device, amp_dtype,
                                          desc=f"dynamics {points.index(step) + 1}/{len(points)}")
                dynamics[step] = {k: sftmix.perplexity(*v) for k, v in nll.items()}
                if not all(map(math.isfinite, dynamics[step].values())):
                    worst = max(nll, key=lambda k: nll[k][0] / nll[k][1])
                    raise InputError(f"step {step}: example {worst}: mean response NLL "
                                     f"{nll[worst][0] / nll[worst][1]:.1f} "
                                     f"nats, its perplexity overflows a float: the model has diverged (lower --lr)")
            # metrics (held-out perplexity at the end of each epoch), then the resumable state
            record = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "loss": loss,
                      "ntp_loss": ntp_loss, "mixup_loss": mix_loss, "grad_norm": grad_norm,
                      "tokens_per_s": n_input / elapsed}
            if heldout and step % steps_per_epoch == 0:  # the end of an epoch
                nll = sftmix.response_nll(wrapped, heldout, args.eval_batch, device, amp_dtype, desc="held-out")
                weighted = sftmix.token_weighted(nll, list(nll))
                record.update(heldout_nll=weighted["nll_per_token"], heldout_ppl=weighted["ppl"])
            if rank == 0:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if step % args.save_every == 0 or step == total or step == args.stop_at_step:
                save_state(out, model, optimizer, step, dynamics, config, rank)
                saved = step
            if step == args.stop_at_step and step < total:
                if rank == 0:
                    print(f"stopped after step {step}; continue with --resume")
                return
    # final/: all ranks take part in gathering the full weights, one tensor at a time, onto rank 0's CPU
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if args.lora_rank:  # final/ is plain HF weights: W + (alpha / r) B A, no adapter keys
        full = merge_lora(full, args.lora_alpha / args.lora_rank)
    if rank == 0:
        if points:
            write_dynamics(out / "dynamics.jsonl", samples, points, dynamics)
        base_config = json.loads((base / "config.json").read_text())
        named = base_config.get("dtype") or base_config.get("torch_dtype")  # transformers 5 writes "dtype"
        save_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}.get(args.save_dtype) or {
            "bfloat16": torch.bfloat16, "float16": torch.float16}.get(named, torch.float32)
        for name in full:  # cast one tensor at a time, each fp32 tensor freed as its cast replaces it
            full[name] = full[name].to(save_dtype)
        save_pretrained(model, out / "final", tokenizer_dir=base, state_dict=full)
        if not args.keep_state:
            shutil.rmtree(out / "state")
        print(f"wrote {out / 'final'}" + (f" and {out / 'dynamics.jsonl'}" if points else ""))


def forward_backward(args, wrapped, samples, batch, lam, device, amp_dtype, rank, world):
    """Accumulate the gradient of L over this rank's micro-batches of one global batch, then clip it.

    L = L_NTP + mu L_Mixup, or L_Mixup alone with --mixup-only; each term normalised over the whole global batch
    (sftmix.micro_batches gives the normalisers), so micro-batch and rank boundaries do not change the gradient.
    batch holds G sample indices, and lam (G/2,) makes it G/2 pairs (epoch_batches), or is None (plain NTP).
    Nothing here waits for the device: every index is laid out on the host (data.pack, sftmix.micro_batches)
    and copied asynchronously, and the sums stay on the device. Returns (stats, input tokens of the global
    batch): stats (4,) on the device = (L, L_NTP, L_Mixup, grad norm before clipping), for the caller to read.
    """
    micro, n_tokens, n_mixed = sftmix.micro_batches(batch, samples, rank, world, args.micro_batch, lam)
    ntp_weight, mix_weight = (0.0, 1.0) if args.mixup_only else (1.0, args.mu)
    sums = torch.zeros(2, device=device)  # NTP NLL sum, Mixup CE sum
    for j, mb in enumerate(micro):
        b = data.to_device(data.pack([samples[i] for i in mb.rows]), device)
        pairs = data.to_device({"mix_c": mb.mix_c, "mix_u": mb.mix_u, "lam": mb.lam, "rest": mb.rest}, device)
        head = partial(sftmix.head_losses, targets=b["targets"], **pairs)
        # DDP all-reduces gradients after the last micro-batch only; FSDP2 reduce-scatters after every one, so
        # no rank holds an unsharded gradient between micro-batches (4 bytes a parameter at fp32 reduction)
        last = j == len(micro) - 1
        with wrapped.no_sync() if isinstance(wrapped, DDP) and not last else nullcontext():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                nll, mix = wrapped(b["input_ids"], seqs=b["seqs"], logits_at=b["trained"], head=head)
            loss = ntp_weight * nll.sum() / n_tokens + mix_weight * mix.sum() / max(n_mixed, 1)  # (N,), (M,) summed
            (loss * world).backward()  # ranks average gradients; * world makes it the sum over the global batch
        sums += torch.stack([nll.detach().sum(), mix.detach().sum()])
    if world > 1:
        dist.all_reduce(sums)
    grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), args.grad_clip or float("inf"))
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    ntp, mixup = sums[0] / n_tokens, sums[1] / max(n_mixed, 1)
    stats = torch.stack([ntp_weight * ntp + mix_weight * mixup, ntp, mixup, grad_norm.to(ntp.dtype)])
    return stats, sum(len(samples[i].input_ids) for i in batch)


# ----------------------------------------------------------------------------- flags

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.Help)
    p.add_argument("--mode", choices=["ntp", "sftmix"], default="ntp", help="plain SFT, or SFTMix (needs --split)")
    p.add_argument("--model", required=True,
                   help="base model: HF directory (config.json, safetensors, tokenizer), or a run directory "
                        "(its final/)")
    p.add_argument("--data", required=True, help="training data (alpaca / sharegpt / messages; JSON or JSONL)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--split", help="split.json from `sftmix.py split` (sftmix mode)")
    p.add_argument("--mixup-only", action="store_true",
                   help="sftmix: L = L_Mixup, no NTP term and mu unused (the paper's 'Mixup only' ablation)")
    p.add_argument("--dynamics", type=data.number("--dynamics", int, ">= 0 (0 = off)"), default=0,
                   metavar="C",
                   help="record every example's response perplexity at C evenly spaced checkpoints")
    p.add_argument("--heldout", help="held-out data: response perplexity after every epoch, in metrics.jsonl")
    p.add_argument("--alpha", type=data.number("--alpha", float, "> 0 (Beta(alpha, alpha))"),
                   default=0.5, help="lambda ~ Beta(alpha, alpha) [paper]")
    p.add_argument("--mu", type=data.number("--mu", float, ">= 0"),
                   default=0.2, help="weight of the Mixup loss [paper]")
    p.add_argument("--epochs", type=data.number("--epochs", int, ">= 1"),
                   default=1, help="passes over the data [paper: 3 Alpaca, 1 UltraChat]")
    p.add_argument("--lr", type=data.number("--lr", float, "> 0 and finite"),
                   default=2e-6, help="peak learning rate [paper]")
    p.add_argument("--weight-decay", type=data.number("--weight-decay", float, ">= 0 and finite"),
                   default=0.1,
                   help="AdamW weight decay of the weight matrices; norms and biases are not decayed [paper: 0.1]")
    p.add_argument("--betas", type=data.number("--betas", float, "in [0, 1)"), nargs=2,
                   default=(0.9, 0.999), help="AdamW betas [ours]")
    p.add_argument("--warmup-ratio", type=data.number("--warmup-ratio", float, "in [0, 1)"),
                   default=0.1,
                   help="linear warm-up share W of the steps; step k runs at lr (k+1)/W (HF: lr k/W) [paper: 0.1]")
    p.add_argument("--grad-clip", type=data.number("--grad-clip", float,
                                                   ">= 0 and finite (0 = off)"),
                   default=1.0, help="max global grad norm, 0 = off [ours]")
    p.add_argument("--global-batch", type=data.number("--global-batch", int, ">= 1"),
                   default=32, help="examples per optimizer step, all ranks [paper]")
    p.add_argument("--micro-batch", type=data.number("--micro-batch", int, ">= 1"),
                   default=4, help="examples per forward on one rank [ours]")
    p.add_argument("--max-len", type=data.number("--max-len", int, ">= 2"),
                   default=data.MAX_LEN, help="tokens per example, cut on the right [ours]")
    p.add_argument("--format", choices=data.FORMATS, help="data format (detected from the keys if not given)")
    p.add_argument("--prompt-format", choices=data.PROMPT_FORMATS, help="(detected from the tokenizer if not given)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="compute precision: auto = bf16 on CUDA, fp32 on CPU; weights and optimizer stay fp32")
    p.add_argument("--save-dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="dtype of the weights in final/: auto = the base checkpoint's (its config.json's torch_dtype "
                        "or dtype; fp32 when it names none): bf16 for the paper's models, fp32 for the demo's")
    p.add_argument("--shard", choices=["ddp", "fsdp"], default="ddp",
                   help="ddp: every rank holds the whole model; fsdp: FSDP2, weights/grads/optimizer sharded")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each block's input, recompute the block in backward")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile each transformer block (whole graph, lengths dynamic after the first)")
    p.add_argument("--deterministic", action="store_true",
                   help="deterministic kernels on CUDA (slower), so a resumed run repeats bitwise there too; on the "
                        "CPU every run is deterministic already")
    p.add_argument("--seed", type=data.number("--seed", int, ">= 0"),
                   default=0, help="data order and lambda draws")
    p.add_argument("--eval-batch", type=data.number("--eval-batch", int, ">= 1"),
                   default=16, help="examples per forward in the dynamics pass")
    p.add_argument("--save-every", type=data.number("--save-every", int, ">= 1"),
                   default=100, help="steps between resumable states (and at the end)")
    p.add_argument("--resume", action="store_true",
                   help="continue from OUT/state/ if it holds a state; the data and every flag must be the same, but "
                        "--lr, --grad-clip, --stop-at-step, --save-every, --eval-batch and --keep-state may change")
    p.add_argument("--keep-state", action="store_true",
                   help="keep OUT/state/ (weights + AdamW moments, ~4x the model) after final/ is written")
    p.add_argument("--stop-at-step", type=data.number("--stop-at-step", int, ">= 0 (0 = off)"),
                   default=0,
                   help="save the state and exit after this step, to continue later with --resume (0 = run to the end)")
    p.add_argument("--lora-rank", type=data.number("--lora-rank", int, ">= 0 (0 = off)"), default=0,
                   metavar="R",
                   help="train rank-R LoRA adapters only, the base frozen; final/ holds the merged weights "
                        "W + (alpha/R) B A (0 = off: all weights train). Adapters usually want a larger --lr (~1e-4)")
    p.add_argument("--lora-alpha", type=data.number("--lora-alpha", float, "> 0 and finite"),
                   default=16.0, help="LoRA scale alpha/R [ours; peft: 8]")
    p.add_argument("--lora-targets", nargs="+", choices=LORA_TARGETS, default=list(LORA_TARGETS), metavar="NAME",
                   help="projections (HF names) that get adapters [ours: all seven, as QLoRA; peft: q_proj v_proj]")
    return p.parse_args(argv)


def check_args(args, world):
    """Every flag checked before anything loads: one line naming the flag and what was expected."""
    for flag, ok, expected in [
            ("global_batch", args.global_batch >= 1, ">= 1"), ("micro_batch", args.micro_batch >= 1, ">= 1"),
            ("epochs", args.epochs >= 1, ">= 1"), ("eval_batch", args.eval_batch >= 1, ">= 1"),
            ("save_every", args.save_every >= 1, ">= 1"), ("dynamics", args.dynamics >= 0, ">= 0 (0 = off)"),
            ("max_len", args.max_len >= 2, ">= 2"), ("stop_at_step", args.stop_at_step >= 0, ">= 0 (0 = off)"),
            ("lr", 0 < args.lr < math.inf, "> 0 and finite"), ("warmup_ratio", 0 <= args.warmup_ratio < 1, "in [0, 1)"),
            ("weight_decay", 0 <= args.weight_decay < math.inf, ">= 0 and finite"),
            ("grad_clip", 0 <= args.grad_clip < math.inf, ">= 0 and finite (0 = off)"),
            ("betas", all(0 <= b < 1 for b in args.betas), "two numbers in [0, 1)"),
            ("lora_rank", args.lora_rank >= 0, ">= 0 (0 = off)"),
            ("lora_alpha", 0 < args.lora_alpha < math.inf, "> 0 and finite"), ("seed", args.seed >= 0, ">= 0")]:
        if not ok:
            raise InputError(f"--{flag.replace('_', '-')}: expected {expected}, got {getattr(args, flag)}")
    if args.mixup_only and args.mode != "sftmix":
        raise InputError("--mixup-only: expected --mode sftmix (the Mixup term needs pairs)")
    if args.mode == "sftmix" and not args.split:
        raise InputError("--mode sftmix needs --split FILE (from `python sftmix.py split`)")
    if not 0 < args.alpha < math.inf:
        raise InputError(f"--alpha: expected > 0 (Beta(alpha, alpha)), got {args.alpha}")
    if not 0 <= args.mu < math.inf:
        raise InputError(f"--mu: expected >= 0, got {args.mu}")
    if args.global_batch % (world * args.micro_batch):
        raise InputError(f"--global-batch {args.global_batch}: expected a multiple of ranks x --micro-batch "
                         f"= {world} x {args.micro_batch}")
    if args.mode == "sftmix" and args.micro_batch % 2:
        raise InputError(f"--micro-batch {args.micro_batch}: an SFTMix micro-batch holds confident/unconfident "
                         f"pairs, expected an even number")


# ----------------------------------------------------------------------------- data, schedule, optimizer

def split_indices(path, samples):
    """split.json -> (confident, unconfident) sample indices; every id of the data in exactly one half."""
    halves = sftmix.read_split(path)
    halves = [halves["confident"], halves["unconfident"]]
    index = {s.id: i for i, s in enumerate(samples)}
    in_split = set(halves[0]) | set(halves[1])
    unknown = [i for i in halves[0] + halves[1] if i not in index]
    missing = [i for i in index if i not in in_split]
    if unknown or missing or set(halves[0]) & set(halves[1]):
        raise InputError(f"{path}: ids must match the data: {len(unknown)} not in the data {unknown[:3]}, "
                         f"{len(missing)} of the data not in the split {missing[:3]}, "
                         f"{len(set(halves[0]) & set(halves[1]))} in both halves")
    return [index[i] for i in halves[0]], [index[i] for i in halves[1]]


def epoch_batches(n, halves, epoch, G, seed, alpha):
    """The global batches of one epoch as (sample indices, lambdas); an incomplete last batch is dropped.

    halves None (ntp): a shuffled order of the n samples cut into batches of G, no lambdas. halves =
    (confident, unconfident) sample indices (sftmix): G/2 confident then G/2 unconfident examples, pair
    i = (batch[i], batch[G/2 + i]) with lambda lam[i] ~ Beta(alpha, alpha), drawn from (seed, step).
    """
    if halves is not None:
        batches = sftmix.paired_batches(*halves, G, seed, epoch)
        return [(b, sftmix.sample_lambda(alpha, G // 2, seed, epoch * len(batches) + i))
                for i, b in enumerate(batches)]
    order = data.shuffled_order(n, seed, epoch)
    return [(order[b * G:(b + 1) * G], None) for b in range(len(order) // G)]


def lr_at(step, total, lr, warmup_ratio):
    """Linear warm-up over W = ceil(warmup_ratio * total) steps to --lr, then cosine decay to 0.

    Step k (0-based) of the warm-up runs at lr (k + 1) / W, so the first step already learns (HF's linear
    warm-up runs its first step at lr 0)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(model, lr, weight_decay, betas=(0.9, 0.999)):
    """AdamW with weight decay on the matrices only: RMSNorm weights and biases (1-D) are not decayed, as in
    nanoGPT and HF's Trainer (decaying a norm weight pulls it towards 0, not towards the identity). Frozen
    parameters (the base under LoRA) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)


def dynamics_points(total, C):
    """The C optimizer steps after which perplexities are recorded: round(total * k / C), k = 1..C."""
    points = [round(total * k / C) for k in range(1, C + 1)]
    if len(set(points)) != C or points[0] == 0:
        raise InputError(f"--dynamics {C}: the run has only {total} steps; expected at least {C}")
    return points


# ----------------------------------------------------------------------------- model, state and outputs

def prepare_model(model, args, bf16):
    """What train.py does to the model on the meta device, before any weight has memory: LoRA adapters,
    activation checkpointing, `torch.compile` of each block, and FSDP2's units, as torchtitan lays them out:
    each block, the embedding, and the final norm with the LM head (kept gathered after forward: backward
    needs them first). A tied LM head is the embedding's weight, so both stay in the root unit then.
    FSDP2 computes in bf16 under bf16 (its policy casts the gathered weights), reducing gradients in fp32."""
    if args.lora_rank:
        add_lora(model, args.lora_rank, args.lora_alpha, args.lora_targets)
    model.checkpoint_activations = args.activation_checkpointing
    for block in model.model.layers if args.compile else []:
        block.compile(fullgraph=True)  # lengths vary: the second length makes the graph dynamic, no more
    if args.shard == "fsdp":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else \
            MixedPrecisionPolicy()
        for block in model.model.layers:
            fully_shard(block, mp_policy=mp)
        if not model.args.tie_word_embeddings:
            fully_shard(model.model.embed_tokens, mp_policy=mp)
            fully_shard([model.model.norm, model.lm_head], mp_policy=mp, reshard_after_forward=False)
        fully_shard(model, mp_policy=mp)


def _local(t):
    """The part of a tensor this rank holds: its shard under FSDP (a DTensor), else the tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def weights_finite(model, world):
    """(1,) 1.0 on every rank when no weight is inf or NaN, else 0.0, left on the device (no host sync): one
    fused max-abs over all of this rank's tensors, then the minimum over ranks."""
    max_abs = torch._foreach_norm([_local(p).detach() for p in model.parameters()], ord=math.inf)
    finite = torch.stack(max_abs).isfinite().all().float()[None]
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite


def run_config(args, model_args, samples, heldout, halves):
    """The settings a resumed run must share, as they read back from JSON: every flag but RESUMABLE_FLAGS, and
    INPUT_sha256, a fingerprint of what each input of FINGERPRINTS holds (None when not given). Their paths are
    kept to name an input in a message, and what_changed does not compare them."""
    held = heldout and [(s.id, s.input_ids, s.labels) for s in heldout]
    content = {"model": vars(model_args), "data": [(s.id, s.input_ids, s.labels) for s in samples],
               "heldout": held, "split": halves and [[samples[i].id for i in half] for half in halves]}
    config = {k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE_FLAGS}
    config |= {f"{k}_sha256": v and hashlib.sha256(json.dumps(v).encode()).hexdigest() for k, v in content.items()}
    return json.loads(json.dumps(config))


def what_changed(saved, config):
    """Each setting of config (run_config) that differs from the saved run's, in words; a path alone never does."""
    changed = []
    for k, v in config.items():
        flag = k.removesuffix("_sha256")
        if k in FINGERPRINTS or saved.get(k) == v:
            continue
        if flag in FINGERPRINTS and v and saved.get(k):
            changed.append(f"{config[flag]}: {FINGERPRINTS[flag]}")
        else:  # a flag, or an input given now and not then (or the reverse)
            changed.append(f"--{flag.replace('_', '-')}: saved {saved.get(flag)!r}, now {config[flag]!r}")
    return changed


def check_settings(out, config):
    """Before the model loads: the state in OUT/state/ was written with the settings of config (run_config), or
    one line names each that differs (what_changed)."""
    path = out / "state" / "latest.json"
    try:
        saved = json.loads(path.read_text())["config"]
        if not isinstance(saved, dict):
            raise TypeError(f"config is {type(saved).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: unreadable ({e}); expected the latest.json of a run's state") from None
    changed = what_changed(saved, config)
    if changed:
        raise InputError(f"{out / 'state'}: was written by a run with other settings: {'; '.join(changed)}")


def writable_dir(out):
    """Create the run directory (and its parents) and check it takes files, before any work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with data.atomic_path(out / ".write-test") as probe:
            probe.write_text("")
        (out / ".write-test").unlink()
    except OSError as e:
        raise InputError(f"--out {out}: cannot write there ({e.strerror}); expected a directory that can be created "
                         f"and written") from None


def save_state(out, model, optimizer, step, dynamics, config, rank):
    """Everything needed to continue bitwise, with no pickle anywhere: OUT/state/step-N/rank-R.safetensors holds
    the weights, AdamW moments and RNG state (one file per rank under FSDP, whose ranks hold different shards;
    rank 0's alone under DDP), and OUT/state/latest.json names it, with the step (which fixes the schedule and
    the data position), the number of ranks, the run's settings and the dynamics so far. A step is written
    beside the last one, never over it, and latest.json is replaced atomically once every rank has written,
    so a run killed at any moment resumes from a complete state."""
    name, sharded = f"step-{step:07d}", any(isinstance(p, DTensor) for p in model.parameters())
    folder = out / "state" / name
    latest = out / "state" / "latest.json"
    if latest.exists() and json.loads(latest.read_text())["checkpoint"] == name:
        return  # this very state is already complete on disk
    if rank == 0 or sharded:
        tensors = {"rng": torch.get_rng_state()}
        for n, p in model.named_parameters():
            tensors[f"model.{n}"] = _local(p.detach())
            tensors.update({f"optimizer.{n}.{k}": _local(v) for k, v in optimizer.state.get(p, {}).items()})
        folder.mkdir(parents=True, exist_ok=True)
        with data.atomic_path(folder / f"rank-{rank:05d}.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        data.write_json(latest, {"step": step, "checkpoint": name, "ranks": dist.get_world_size() if sharded else 1,
                                 "config": config, "dynamics": {str(k): v for k, v in dynamics.items()}})
        for old in (out / "state").glob("step-*"):
            if old.name != name:
                shutil.rmtree(old)


def load_state(out, model, optimizer, rank, world):
    """Restore what save_state wrote (its settings already checked: check_settings); any unreadable or
    mismatching file is one line naming it."""
    path = out / "state" / "latest.json"
    try:
        latest = json.loads(path.read_text())
        step, name, ranks = int(latest["step"]), str(latest["checkpoint"]), int(latest["ranks"])
        dynamics = {int(k): {str(i): float(x) for i, x in v.items()} for k, v in latest["dynamics"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(f"{path}: unreadable ({e}); expected the latest.json of a run's state") from None
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if sharded and ranks != world:
        raise InputError(f"{path}: written by {ranks} FSDP ranks, resumed on {world}: each rank holds its own shards, "
                         f"so resume on {ranks} ranks")
    file = out / "state" / name / f"rank-{rank if sharded else 0:05d}.safetensors"
    try:  # one tensor at a time, straight into its place (this rank's shard under FSDP)
        with safe_open(str(file), framework="pt", device="cpu") as f, torch.no_grad():
            stored = set(f.keys())
            for n, p in model.named_parameters():
                keys = {"param": f"model.{n}", "exp_avg": f"optimizer.{n}.exp_avg",
                        "exp_avg_sq": f"optimizer.{n}.exp_avg_sq",
                        "step": f"optimizer.{n}.step"} if p.requires_grad else {"param": f"model.{n}"}
                shape = f.get_slice(keys["param"]).get_shape() if keys["param"] in stored else None
                if not set(keys.values()) <= stored or shape != list(_local(p).shape):
                    raise InputError(f"{file}: {n}: missing or of another shape than the model's; expected the state "
                                     f"of this run's model")
                _local(p).copy_(f.get_tensor(keys["param"]))
                if not p.requires_grad:  # a frozen weight (the base under LoRA) has no AdamW moments
                    continue
                state = {"step": f.get_tensor(keys["step"]).to(_local(p).device),
                         "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                _local(state["exp_avg"]).copy_(f.get_tensor(keys["exp_avg"]))
                _local(state["exp_avg_sq"]).copy_(f.get_tensor(keys["exp_avg_sq"]))
                optimizer.state[p] = state
            torch.set_rng_state(f.get_tensor("rng"))
    except (OSError, SafetensorError) as e:
        raise InputError(f"{file}: unreadable ({e}); expected a state written by train.py") from None
    return step, dynamics


def last_state(out, saved):
    """What a run stopped by divergence leaves: the last state saved on schedule (the weights in memory, though
    finite, are those that diverged, so nothing is written), and how to go on."""
    if saved == 0:
        return "No state was saved yet: start again with a lower --lr"
    return f"The state after step {saved} is in {out / 'state'}: continue with --resume and a lower --lr"


def write_dynamics(path, samples, points, dynamics):
    """dynamics.jsonl: {"id", "perplexities": [Perp at each point], "confidence", "variability"} per example."""
    perps = [[dynamics[s][sample.id] for s in points] for sample in samples]
    conf, var = sftmix.confidence(perps), sftmix.variability(perps)
    data.write_json(path, [
        {"id": s.id, "perplexities": p, "confidence": float(c), "variability": float(v)}
        for s, p, c, v in zip(samples, perps, conf, var)], lines=True)


def keep_metrics_until(path, step):
    """Drop metric lines after `step` (and a half-written last line), left by a run that died after its last state."""
    if path.exists():
        lines = [l for l in path.read_text().splitlines(keepends=True)
                 if l.endswith("\n") and json.loads(l)["step"] <= step]
        with data.atomic_path(path) as tmp:
            tmp.write_text("".join(lines))


if __name__ == "__main__":
    main()
