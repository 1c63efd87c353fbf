"""Instruction tuning with next-token prediction (NTP) or SFTMix, one process or torchrun (DDP or FSDP2).

    python train.py --mode ntp --model BASE --data train.jsonl --out runs/ref --dynamics 4   # stage 1
    python sftmix.py split --dynamics runs/ref/dynamics.jsonl --out runs/split.json           # stage 2
    python train.py --mode sftmix --model BASE --data train.jsonl --split runs/split.json --out runs/sftmix
    torchrun --nproc_per_node=8 train.py ...                                                  # the same on 8 ranks
    torchrun --nproc_per_node=8 train.py --shard fsdp --activation-checkpointing ...         # 8B-14B models

Loss per global batch of G examples (NTP tokens counted over all micro-batches and ranks, not a mean of means):
    L_NTP   = sum over trained tokens of -log p(y_t | x, y_<t)  /  number of trained tokens
    L_Mixup = sum over mixed positions of the Mixup CE          /  number of mixed positions
    L       = L_NTP + mu * L_Mixup                                (sftmix; ntp has L = L_NTP; --mixup-only L_Mixup)
Writes OUT/metrics.jsonl, OUT/state/ (resumable, torch.distributed.checkpoint, one file per rank, made current
by an atomic rename of OUT/state/latest.json), OUT/final/ (HF checkpoint), and with --dynamics C,
OUT/dynamics.jsonl (per example: perplexity at C checkpoints, confidence, variability).
"""
import argparse
import json
import math
import os
import sys
import shutil
import time
import warnings
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import sftmix
from data import IGNORE, InputError
from model import load_pretrained, save_pretrained

# Flags that may change between a run and its resumption; every other flag must match the saved state.
RESUMABLE_FLAGS = {"resume", "stop_at_step", "save_every", "eval_batch", "keep_state"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=["ntp", "sftmix"], default="ntp", help="plain SFT, or SFTMix (needs --split)")
    p.add_argument("--model", required=True, help="base model: HF directory (config.json, safetensors, tokenizer)")
    p.add_argument("--data", required=True, help="training data (alpaca / sharegpt / messages; JSON or JSONL)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--split", help="split.json from `sftmix.py split` (sftmix mode)")
    p.add_argument("--mixup-only", action="store_true",
                   help="sftmix: L = L_Mixup, no NTP term and mu unused (the paper's 'Mixup only' ablation)")
    p.add_argument("--dynamics", type=int, default=0, metavar="C",
                   help="record every example's response perplexity at C evenly spaced checkpoints")
    p.add_argument("--heldout", help="held-out data: response perplexity after every epoch, in metrics.jsonl")
    p.add_argument("--alpha", type=float, default=0.5, help="lambda ~ Beta(alpha, alpha) [paper]")
    p.add_argument("--mu", type=float, default=0.2, help="weight of the Mixup loss [paper]")
    p.add_argument("--epochs", type=int, default=1, help="passes over the data [paper: 3 Alpaca, 1 UltraChat]")
    p.add_argument("--lr", type=float, default=2e-6, help="peak learning rate [paper]")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay [paper]")
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.999), help="AdamW betas [ours]")
    p.add_argument("--warmup-ratio", type=float, default=0.1, help="linear warm-up share of the steps [paper]")
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global grad norm, 0 = off [ours]")
    p.add_argument("--global-batch", type=int, default=32, help="examples per optimizer step, all ranks [paper]")
    p.add_argument("--micro-batch", type=int, default=4, help="examples per forward on one rank [ours]")
    p.add_argument("--max-len", type=int, default=data.MAX_LEN, help="tokens per example, cut on the right [ours]")
    p.add_argument("--format", choices=data.FORMATS, help="data format (detected from the keys if not given)")
    p.add_argument("--prompt-format", choices=data.PROMPT_FORMATS, help="(detected from the tokenizer if not given)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                   help="compute precision: auto = bf16 on CUDA, fp32 on CPU; weights and optimizer stay fp32")
    p.add_argument("--shard", choices=["ddp", "fsdp"], default="ddp",
                   help="ddp: every rank holds the whole model; fsdp: FSDP2, weights/grads/optimizer sharded")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="keep only each block's input, recompute the block in backward")
    p.add_argument("--seed", type=int, default=0, help="data order and lambda draws")
    p.add_argument("--eval-batch", type=int, default=16, help="examples per forward in the dynamics pass")
    p.add_argument("--save-every", type=int, default=100, help="steps between resumable states (and at the end)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state/ if it holds a state")
    p.add_argument("--keep-state", action="store_true",
                   help="keep OUT/state/ (weights + AdamW moments, ~4x the model) after final/ is written")
    p.add_argument("--stop-at-step", type=int, default=0,
                   help="save the state and exit after this step, to continue later with --resume (0 = run to the end)")
    return p.parse_args(argv)


def check_args(args, world):
    if args.mixup_only and args.mode != "sftmix":
        raise InputError("--mixup-only: expected --mode sftmix (the Mixup term needs pairs)")
    if args.mode == "sftmix" and not args.split:
        raise InputError("--mode sftmix needs --split FILE (from `python sftmix.py split`)")
    if args.alpha <= 0:
        raise InputError(f"--alpha: expected > 0 (Beta(alpha, alpha)), got {args.alpha}")
    if args.mu < 0:
        raise InputError(f"--mu: expected >= 0, got {args.mu}")
    if args.global_batch % (world * args.micro_batch):
        raise InputError(f"--global-batch {args.global_batch}: expected a multiple of ranks x --micro-batch "
                         f"= {world} x {args.micro_batch}")
    if args.mode == "sftmix" and args.micro_batch % 2:
        raise InputError(f"--micro-batch {args.micro_batch}: an SFTMix micro-batch holds confident/unconfident "
                         f"pairs, expected an even number")


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


def epoch_batches(args, samples, halves, epoch):
    """The global batches of one epoch, as sample indices (an incomplete last batch is dropped).

    ntp: a shuffled order cut into batches of G. sftmix: G/2 confident then G/2 unconfident
    examples, pair i = (batch[i], batch[G/2 + i]).
    """
    G = args.global_batch
    if args.mode == "sftmix":
        return sftmix.paired_batches(*halves, G, args.seed, epoch)
    order = data.shuffled_order(len(samples), args.seed, epoch)
    return [order[b * G:(b + 1) * G] for b in range(len(order) // G)]


def lr_at(step, total, args):
    """Linear warm-up over warmup_ratio * total steps to --lr, then cosine decay to 0."""
    warmup = math.ceil(args.warmup_ratio * total)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return args.lr * 0.5 * (1 + math.cos(math.pi * progress))


def dynamics_points(total, C):
    """The C optimizer steps after which perplexities are recorded: round(total * k / C), k = 1..C."""
    points = [round(total * k / C) for k in range(1, C + 1)]
    if len(set(points)) != C or points[0] == 0:
        raise InputError(f"--dynamics {C}: the run has only {total} steps; expected at least {C}")
    return points


def run_config(args):
    """The settings a resumed run must share, as they read back from JSON."""
    return json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE_FLAGS}))


def shard_model(model, args, device, world, bf16):
    """The module to call in training: the model itself, DDP around it, or the model sharded in place by
    FSDP2 (each transformer block one unit, the root holding embeddings, final norm and LM head)."""
    if args.shard == "fsdp":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
        for block in model.model.layers:
            fully_shard(block, mp_policy=mp)
        fully_shard(model, mp_policy=mp)
        return model
    if world > 1:
        return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, gradient_as_bucket_view=True)
    return model


def save_state(out, model, optimizer, step, dynamics, config):
    """Everything needed to continue bitwise: weights, AdamW moments, RNG (torch.distributed.checkpoint, each
    rank writing its own shard), then OUT/state/latest.json naming it, with the step (which fixes the
    schedule and the data position), the run's settings and the dynamics so far. latest.json is replaced
    atomically only once every rank has written, so a run killed at any moment resumes from a complete state."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    name = f"step-{step:07d}"
    dcp.save({"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
              "rng": torch.get_rng_state()}, checkpoint_id=str(out / "state" / name))
    if dist.is_initialized():
        dist.barrier()
    if rank == 0:
        data.write_json(out / "state" / "latest.json", {
            "step": step, "checkpoint": name, "config": config,
            "dynamics": {str(point): values for point, values in dynamics.items()}})
        for old in (out / "state").glob("step-*"):
            if old.name != name:
                shutil.rmtree(old)


def load_state(out, model, optimizer, config):
    latest = json.loads((out / "state" / "latest.json").read_text())
    changed = [f"--{k.replace('_', '-')}: saved {latest['config'].get(k)!r}, now {v!r}"
               for k, v in config.items() if latest["config"].get(k) != v]
    if changed:
        raise InputError(f"{out / 'state'}: was written by a run with other settings: {'; '.join(changed)}")
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
             "rng": torch.get_rng_state()}
    dcp.load(state, checkpoint_id=str(out / "state" / latest["checkpoint"]))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    torch.set_rng_state(state["rng"])
    return latest["step"], {int(point): values for point, values in latest["dynamics"].items()}


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


def main(argv=None):
    args = parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", 1))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")  # dcp in a single process
    try:
        train(args, rank, local_rank, world)
    except InputError as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def train(args, rank, local_rank, world):
    check_args(args, world)
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    bf16 = args.dtype == "bf16" or (args.dtype == "auto" and device.type == "cuda")
    amp_dtype = torch.bfloat16 if bf16 and args.shard == "ddp" else None  # FSDP2 casts through its policy
    out = Path(args.out)
    tok = data.load_tokenizer(args.model)
    samples, _ = data.load_dataset(args.data, tok, args.prompt_format, args.max_len, args.format, verbose=rank == 0)
    heldout = data.load_dataset(args.heldout, tok, args.prompt_format, args.max_len, verbose=rank == 0)[0] \
        if args.heldout else None
    halves = split_indices(args.split, samples) if args.mode == "sftmix" else None
    steps_per_epoch = len(epoch_batches(args, samples, halves, 0))
    total = steps_per_epoch * args.epochs
    if total == 0:
        raise InputError(f"{args.data}: {len(samples)} samples fill no global batch of {args.global_batch}")
    points = dynamics_points(total, args.dynamics) if args.dynamics else []

    torch.manual_seed(args.seed)
    model = load_pretrained(args.model, device=device)
    model.checkpoint_activations = args.activation_checkpointing
    wrapped = shard_model(model, args, device, world, bf16)  # what forward and backward go through
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=tuple(args.betas),
                                  weight_decay=args.weight_decay, fused=True)
    config, step, dynamics = run_config(args), 0, {}
    if args.resume and (out / "state" / "latest.json").exists():
        step, dynamics = load_state(out, model, optimizer, config)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        print(f"train: {args.mode}, {len(samples)} samples, {total} steps of {args.global_batch} examples "
              f"on {world} rank(s) ({args.shard}), {device.type}, {'bf16' if bf16 else 'fp32'}"
              f"{f', resuming after step {step}' if step else ''}")
        keep_metrics_until(out / "metrics.jsonl", step)

    batches, batches_epoch = None, None
    with tqdm(total=total, initial=step, desc=args.mode, disable=rank != 0) as progress:
        while step < total:
            epoch = step // steps_per_epoch
            if epoch != batches_epoch:
                batches, batches_epoch = epoch_batches(args, samples, halves, epoch), epoch
            batch = batches[step % steps_per_epoch]
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, args)
            t0 = time.perf_counter()
            loss, ntp_loss, mix_loss, grad_norm, n_input = forward_backward(args, wrapped, samples, batch, step,
                                                                            device, amp_dtype, rank, world)
            if not all(math.isfinite(x) for x in (ntp_loss, mix_loss, grad_norm)):
                save_state(out, model, optimizer, step, dynamics, config)  # weights are still the last good ones
                raise InputError(f"step {step + 1}: loss is not finite (ntp {ntp_loss}, mixup {mix_loss}, grad norm "
                                 f"{grad_norm}); stopped, the state after step {step} is in {out / 'state'}")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - t0
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", ntp=f"{ntp_loss:.4f}", mixup=f"{mix_loss:.4f}")
            if step in points:
                nll = sftmix.response_nll(wrapped, samples, args.eval_batch, device, amp_dtype,
                                          desc=f"dynamics {points.index(step) + 1}/{len(points)}")
                dynamics[step] = {k: sftmix.perplexity(*v) for k, v in nll.items()}
            record = {"step": step, "epoch": epoch, "lr": optimizer.param_groups[0]["lr"], "loss": loss,
                      "ntp_loss": ntp_loss, "mixup_loss": mix_loss, "grad_norm": grad_norm, "tokens_per_s": n_input / elapsed}
            if heldout and step % steps_per_epoch == 0:  # the end of an epoch
                nll = sftmix.response_nll(wrapped, heldout, args.eval_batch, device, amp_dtype, desc="held-out")
                nll_per_token = sum(v[0] for v in nll.values()) / sum(v[1] for v in nll.values())
                record.update(heldout_nll=nll_per_token, heldout_ppl=math.exp(nll_per_token))
            if rank == 0:
                with open(out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
            if step % args.save_every == 0 or step == total or step == args.stop_at_step:
                save_state(out, model, optimizer, step, dynamics, config)
            if step == args.stop_at_step and step < total:
                if rank == 0:
                    print(f"stopped after step {step}; continue with --resume")
                return
    # all ranks take part in gathering the full weights, one tensor at a time, onto rank 0's CPU
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        if points:
            write_dynamics(out / "dynamics.jsonl", samples, points, dynamics)
        save_pretrained(model, out / "final", tokenizer_dir=args.model, state_dict=full)
        if not args.keep_state:
            shutil.rmtree(out / "state")
        print(f"wrote {out / 'final'}" + (f" and {out / 'dynamics.jsonl'}" if points else ""))


def forward_backward(args, wrapped, samples, batch, step, device, amp_dtype, rank, world):
    """Accumulate the gradient of L over this rank's micro-batches of one global batch, then clip it.

    L = L_NTP + mu L_Mixup, or L_Mixup alone with --mixup-only; each term normalised over the whole global batch
    (sftmix.micro_batches gives the normalisers), so micro-batch and rank boundaries do not change the gradient.
    Returns (L, L_NTP, L_Mixup, grad norm before clipping, input tokens on all ranks) of the global batch.
    """
    lam = sftmix.sample_lambda(args.alpha, len(batch) // 2, args.seed, step) if args.mode == "sftmix" else None
    micro, n_tokens, n_mixed = sftmix.micro_batches(batch, samples, rank, world, args.micro_batch, lam)
    ntp_weight, mix_weight = (0.0, 1.0) if args.mixup_only else (1.0, args.mu)
    sums = torch.zeros(3, device=device)  # NTP NLL sum, Mixup CE sum, input tokens
    for j, mb in enumerate(micro):
        b = data.pack([samples[i] for i in mb.rows])
        input_ids, labels = b["input_ids"].to(device), b["labels"].to(device)  # (1, S) each
        trained = labels != IGNORE  # (1, S)
        head = partial(sftmix.head_losses, targets=labels[trained], mix_c=mb.mix_c.to(device),
                       mix_u=mb.mix_u.to(device), lam=mb.lam.to(device))
        last = j == len(micro) - 1  # gradients cross ranks after the last micro-batch only
        if args.shard == "fsdp":
            wrapped.set_requires_gradient_sync(last)
        with wrapped.no_sync() if isinstance(wrapped, DDP) and not last else nullcontext():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                nll, mix = wrapped(input_ids, seq_lens=b["seq_lens"], logits_at=trained, head=head)  # (N,), (M,)
            loss = ntp_weight * nll.sum() / n_tokens + mix_weight * mix.sum() / max(n_mixed, 1)
            (loss * world).backward()  # ranks average gradients; * world makes it the sum over the global batch
        sums += torch.stack([nll.detach().sum(), mix.detach().sum(), torch.tensor(float(input_ids.numel()), device=device)])
    if world > 1:
        dist.all_reduce(sums)
    grad_norm = torch.nn.utils.clip_grad_norm_(wrapped.parameters(), args.grad_clip or float("inf"))
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    ntp, mixup = sums[0].item() / n_tokens, sums[1].item() / max(n_mixed, 1)
    return ntp_weight * ntp + mix_weight * mixup, ntp, mixup, grad_norm.item(), sums[2].item()


if __name__ == "__main__":
    main()
