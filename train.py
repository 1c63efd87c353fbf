"""Instruction tuning with next-token prediction (NTP) or SFTMix, one process or torchrun (DDP or
FSDP2).

    python train.py --mode ntp --model BASE --data train.jsonl --out runs/ref --dynamics 4   # stage 1
    python sftmix.py split --dynamics runs/ref/dynamics.jsonl --out runs/split.json           # stage 2
    python train.py --mode sftmix --model BASE --data train.jsonl --split runs/split.json --out runs/sftmix
    torchrun --nproc_per_node=8 train.py ...                                                  # the same on 8 ranks
    torchrun --nproc_per_node=8 train.py --shard fsdp --activation-checkpointing ...         # 8B-14B models
    python train.py ... --lora-rank 16 --lr 1e-4                                             # LoRA, merged into final/

Loss per global batch of G examples (NTP tokens counted over all micro-batches and ranks, not a mean
of means):
    L_NTP   = sum over trained tokens of -log p(y_t | x, y_<t)  /  number of trained tokens
    L_Mixup = sum over mixed positions of the Mixup CE          /  number of mixed positions
    L       = L_NTP + mu * L_Mixup                                (sftmix; ntp has L = L_NTP; --mixup-only L_Mixup)
sftmix.micro_batches lays a global batch out over ranks and packed micro-batches; sftmix.head_losses
computes both terms from the final hidden states, the LM head in chunks. Writes OUT/metrics.jsonl,
OUT/state/ (resumable: safetensors and JSON, no pickle, made current by an atomic rename of
OUT/state/latest.json; deleted at the end unless --keep-state), OUT/final/ (HF checkpoint), and with
--dynamics C, OUT/dynamics.jsonl (per example: perplexity at C checkpoints, confidence,
variability).
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import timedelta
from functools import lru_cache, partial
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import sftmix
from data import InputError
from model import (
    LORA_TARGETS,
    ModelArgs,
    add_lora,
    compute_dtype,
    load_pretrained,
    model_dir,
    save_pretrained,
)
from sftmix import CHUNK

# Flags that may change between a run and its resumption; every other flag, and what the inputs hold, must match
# the saved state. --lr and --grad-clip may change to rescue a run that diverged (the schedule is lr_at with the new
# --lr); --out, so that a run directory moved elsewhere resumes.
RESUMABLE_FLAGS = (
    "lr grad_clip out stop_at_step save_every save_every_minutes eval_batch heldout_every keep_state "
    "save_dtype final_shard_gb compile deterministic timeout_minutes shard_degree resume".split()
)
# The inputs' paths may change too (moved with the run or not): what each holds must match instead,
# through a fingerprint in run_config (model: its config.json as ModelArgs reads it; data, heldout:
# token ids; split: halves).
FINGERPRINTS = {
    "model": "its config.json is not that of the run's model",
    "data": "the data changed since the run started",
    "heldout": "the held-out data changed since the run started",
    "split": "the split changed since the run started",
}


def main(argv=None):
    with data.reported():  # bad input: one line and exit 2; a bug of ours keeps its traceback
        args = parse_args(argv)
        world = int(os.environ.get("WORLD_SIZE", 1))
        rank, local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        try:
            check_args(args, world)
            if args.shard != "ddp" and "RANK" not in os.environ:
                raise InputError(
                    f"--shard {args.shard}: expected a launch by torchrun (FSDP2 shards over "
                    f"its process group): torchrun --nproc_per_node=N train.py ..."
                )
            # under torchrun, even on one rank (FSDP2 shards over a process group)
            if "RANK" in os.environ:
                dist.init_process_group(
                    "nccl" if torch.cuda.is_available() else "gloo",
                    timeout=timedelta(minutes=args.timeout_minutes),
                )
            train(args, rank, local_rank, world)
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()


def train(args, rank, local_rank, world):
    """Every input checked before anything is written or loaded (read_inputs); then the model and
    its state (build); then the steps: step, record (dynamics, held-out passes, metrics), save,
    stop; then final/."""
    device = pick_device(local_rank, args.deterministic)
    bf16 = compute_dtype(args.dtype, device) == torch.bfloat16
    amp_dtype = torch.bfloat16 if bf16 and args.shard == "ddp" else None  # FSDP2: its policy casts
    run = read_inputs(args, local_rank, world, device)
    if rank == 0:  # every input checked: now the run directory
        prepare_out(run.out, run.latest)
    model, wrapped, optimizer, saver, step, dynamics = build(args, run, device, world, bf16, rank)
    if rank == 0:  # every check passed, the state loaded: what was read, and what runs
        print("\n".join(data.summary(s) for s in run.stats if s))
        print(
            f"train: {args.mode}, {len(run.samples)} samples, {run.total} steps of "
            f"{args.global_batch} examples on {world} rank(s) ({args.shard}), {device.type}, "
            f"{'bf16' if bf16 else 'fp32'}{f', resuming after step {step}' if step else ''}"
        )
        for path, lines in run.kept.items():  # dropped: the lines after the state resumed from
            with data.atomic_path(path) as tmp:
                tmp.write_text(lines)

    lr = partial(lr_at, total=run.total, lr=args.lr, warmup_ratio=args.warmup_ratio)
    where = dict(device=device, amp_dtype=amp_dtype)
    loss = dict(mu=args.mu, mixup_only=args.mixup_only, micro_batch=args.micro_batch)
    # forward_backward's values but the model, the data, the batch and lambda
    values = dict(loss, grad_clip=args.grad_clip, **where, rank=rank, world=world)
    step_fn = partial(train_step, wrapped, model, optimizer, run.samples, lr=lr, **values)
    evaluate = partial(sftmix.response_nll, wrapped, batch_size=args.eval_batch, **where)
    due = SaveSchedule(args, run.total, saver.clock)
    with tqdm(total=run.total, initial=step, desc=args.mode, disable=rank != 0) as progress:
        while step < run.total:
            epoch = step // run.steps_per_epoch
            try:
                record = step_fn(step, *run.batches_of(epoch)[step % run.steps_per_epoch])
            except InputError as e:  # diverged: the state in flight completes, the message names it
                saver.wait()
                raise InputError(f"{e}; stopped. {last_state(run.out, saver.committed)}") from None
            step += 1
            progress.update(1)
            progress.set_postfix({k: f"{record[k + '_loss']:.4f}" for k in ("ntp", "mixup")})
            record.update(step=step, epoch=epoch)
            record_step(record, run, evaluate, dynamics, args.heldout_every, rank)
            if due(step):
                saver.save(model, optimizer, step, dynamics, run.config)
            if step == args.stop_at_step and step < run.total:
                saver.wait()
                if rank == 0:
                    print(f"stopped after step {step}; continue with --resume")
                return
    saver.wait()
    lora_scale = args.lora_alpha / args.lora_rank if args.lora_rank else None
    write_final(run.out, model, run.base, run.save_dtype, lora_scale, args.final_shard_gb, rank)
    if rank == 0:
        finish(run.out, run.samples, run.points, dynamics, args.keep_state)


@dataclass
class Run:
    """What a run reads before anything is written: its paths, data, batches, schedule and settings."""

    out: Path
    base: Path  # the model directory (an HF directory, or a run directory's final/)
    samples: list
    heldout: list | None
    stats: tuple  # the data's and the held-out data's summaries (data.summary)
    batches_of: object  # epoch -> that epoch's [(batch, lambdas)], kept while the epoch lasts
    steps_per_epoch: int
    total: int
    points: list  # the steps after which the dynamics are recorded
    config: dict  # run_config: what a resumed run must share
    latest: dict | None  # OUT/state/latest.json of the state resumed from (read_latest); None: none
    kept: dict  # {OUT/metrics.jsonl, OUT/heldout.jsonl: the lines of it the run keeps (check_out)}
    save_dtype: str  # final/'s: fp32, bf16 or fp16 (final_dtype)


def read_inputs(args, local_rank, world, device):
    """Every input read and checked, nothing written: the model's config and checkpoint headers, the
    data (tokenized once a node: read_data), the split, the schedule, a resumed state's settings, and
    the memory estimate."""
    out, base = Path(args.out), model_dir(args.model)
    if base.resolve() in (out.resolve(), (out / "final").resolve()):
        raise InputError(
            f"--out {out}: expected a directory other than the model's (--model {args.model}): "
            f"the run's final/ would take its place"
        )
    model_args = ModelArgs.from_model_dir(base)  # checked against the checkpoint; nothing loaded
    encode = dict(
        tok=data.load_tokenizer(base), prompt_format=args.prompt_format, max_len=args.max_len
    )
    read = partial(read_data, **encode, out=out, local_rank=local_rank)
    samples, stats = read(args.data, fmt=args.format)
    heldout, heldout_stats = read(args.heldout, fmt=None) if args.heldout else (None, None)
    halves = split_indices(args.split, samples) if args.mode == "sftmix" else None
    batches = partial(epoch_batches, G=args.global_batch, seed=args.seed, alpha=args.alpha)
    batches_of = lru_cache(maxsize=1)(partial(batches, len(samples), halves))
    steps_per_epoch = len(batches_of(0))
    check_batches(args, samples, halves, steps_per_epoch)
    total = steps_per_epoch * args.epochs
    points = dynamics_points(total, args.dynamics) if args.dynamics else []
    config = run_config(args, model_args, samples, heldout, halves)
    latest = None
    if args.resume and (out / "state" / "latest.json").exists():
        latest = read_latest(out)
        check_settings(out, latest, config, total, points, [s.id for s in samples])
    kept = check_out(out, args.dynamics, latest["step"] if latest else 0)
    save_dtype = final_dtype(args.save_dtype, base)
    check_memory(model_args, args, samples, world, device)
    return Run(
        out,
        base,
        samples,
        heldout,
        (stats, heldout_stats),
        batches_of,
        steps_per_epoch,
        total,
        points,
        config,
        latest,
        kept,
        save_dtype,
    )


def build(args, run, device, world, bf16, rank):
    """The model built on the meta device, prepared (LoRA, compile, FSDP2 units), then filled; what
    forward and backward go through (the model itself, FSDP2's in place, or DDP around it); AdamW;
    the resumed state; the saver. Returns (model, wrapped, optimizer, saver, step, dynamics)."""
    torch.manual_seed(args.seed)  # LoRA's initial A
    prepare = partial(
        prepare_model,
        lora=(args.lora_rank, args.lora_alpha, args.lora_targets),
        activation_checkpointing=args.activation_checkpointing,
        compile=args.compile,
        mesh=shard_mesh(args.shard, args.shard_degree, world, device),
        bf16=bf16,
    )
    model = load_pretrained(run.base, device=device, prepare=prepare)
    wrapped = model
    if args.shard == "ddp" and world > 1:
        ids = [device.index] if device.type == "cuda" else None
        wrapped = DDP(model, device_ids=ids, gradient_as_bucket_view=True)
    optimizer = adamw(model, args.lr, args.weight_decay, args.betas)
    step, dynamics = load_state(run.out, run.latest, model, optimizer) if run.latest else (0, {})
    saver = Saver(run.out, rank)
    saver.committed = step
    return model, wrapped, optimizer, saver, step, dynamics


# ----------------------------------------------------------------------------- the phases of a step


def train_step(wrapped, model, optimizer, samples, step, batch, lam, lr, **values):
    """One optimizer step on global batch `batch` (lam: its lambdas, or None) at the learning rate
    lr(step), the gradient from forward_backward(..., **values); returns its metrics record. The
    step's one read from the device: the losses, the grad norm, and whether the weights are
    finite; a divergence is an InputError (the caller writes nothing of it)."""
    for group in optimizer.param_groups:
        group["lr"] = lr(step)
    t0 = time.perf_counter()
    stats, n_input = forward_backward(wrapped, samples, batch, lam, **values)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    read = torch.cat([stats, weights_finite(model, values["world"])])  # (5,)
    total_loss, ntp_loss, mix_loss, grad_norm, finite = read.tolist()
    if not all(math.isfinite(x) for x in (ntp_loss, mix_loss, grad_norm)):
        raise InputError(
            f"step {step + 1}: loss is not finite (ntp {ntp_loss}, mixup {mix_loss}, grad norm "
            f"{grad_norm})"
        )
    if not finite:
        raise InputError(f"step {step + 1}: the update made weights inf or NaN (lr {lr(step):.3g})")
    return {
        "lr": optimizer.param_groups[0]["lr"],
        "loss": total_loss,
        "ntp_loss": ntp_loss,
        "mixup_loss": mix_loss,
        "grad_norm": grad_norm,
        "tokens_per_s": n_input / (time.perf_counter() - t0),
    }


def record_step(record, run, evaluate, dynamics, heldout_every, rank):
    """After step record["step"]: the training dynamics (stage 1: every example's response
    perplexity at this checkpoint), a held-out pass at the end of each epoch and every heldout_every
    steps (its per-example NLL appended to OUT/heldout.jsonl), and the metrics line of
    OUT/metrics.jsonl."""
    step, points = record["step"], run.points
    epoch_end = step % run.steps_per_epoch == 0
    if step in points:
        nll = evaluate(run.samples, desc=f"dynamics {points.index(step) + 1}/{len(points)}")
        dynamics[step] = {k: sftmix.perplexity(*v) for k, v in nll.items()}
        if not all(map(math.isfinite, dynamics[step].values())):
            worst = max(nll, key=lambda k: nll[k][0] / nll[k][1])
            raise InputError(
                f"step {step}: example {worst}: mean response NLL {nll[worst][0] / nll[worst][1]:.1f} "
                f"nats, its perplexity overflows a float: the model has diverged (lower --lr)"
            )
    if run.heldout and (epoch_end or (heldout_every and step % heldout_every == 0)):
        nll = evaluate(run.heldout, desc="held-out")
        weighted = sftmix.token_weighted(nll, list(nll))
        record.update(heldout_nll=weighted["nll_per_token"], heldout_ppl=weighted["ppl"])
        if rank == 0:
            per_example = {k: [float(s), int(n)] for k, (s, n) in nll.items()}
            line = {"step": step, "epoch": step / run.steps_per_epoch, "nll": per_example}
            append_line(run.out / "heldout.jsonl", line)
    if rank == 0:
        append_line(run.out / "metrics.jsonl", record)


class SaveSchedule:
    """When a state is written: every --save-every steps and every --save-every-minutes (0 = off),
    and at --stop-at-step; never at the last step unless --keep-state (final/ follows, and a run
    killed while writing it resumes from the state before). Ranks follow rank 0's clock (one
    broadcast a step on the CPU group `clock`), so they all save at the same step."""

    def __init__(self, args, total, clock):
        self.steps, self.seconds = args.save_every, args.save_every_minutes * 60
        self.keep_state, self.stop_at_step = args.keep_state, args.stop_at_step
        self.total, self.clock = total, clock
        self.since = time.monotonic()

    def __call__(self, step):
        if step == self.total:
            return self.keep_state
        due = step == self.stop_at_step or (self.steps and step % self.steps == 0)
        if self.seconds:
            late = torch.tensor([time.monotonic() - self.since >= self.seconds])
            if self.clock is not None:
                dist.broadcast(late, 0, group=self.clock)
            due = due or bool(late)
        if due:
            self.since = time.monotonic()
        return due


def write_final(out, model, base, save_dtype, lora_scale, shard_gb, rank):
    """OUT/final/: the weights in save_dtype (fp32, bf16 or fp16: final_dtype's) as HF sharded
    safetensors, tensor by tensor (rank 0's host holds one shard file's worth), written as
    OUT/final.tmp/ and renamed, so final/ is whole or absent."""
    tensors = final_tensors(model, SAVE_DTYPES[save_dtype], lora_scale)
    if rank != 0:
        for _ in tensors:  # every rank takes part in gathering each tensor
            pass
        return
    tmp = out / "final.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(
        model, tmp, tokenizer_dir=base, state_dict=tensors, max_shard_bytes=int(shard_gb * 2**30)
    )
    # a complete final/ of this same state, from a killed rerun
    shutil.rmtree(out / "final", ignore_errors=True)
    os.replace(tmp, out / "final")


def prepare_out(out, latest):
    """Create the run directory and clear what a killed run left: the state folders `latest` (the
    latest.json resumed from) does not name and final.tmp/, or (latest None: starting again) an
    earlier run's whole state."""
    writable_dir(out)
    if latest:
        remove_stale(out, keep=latest["checkpoint"])
    else:
        shutil.rmtree(out / "state", ignore_errors=True)
        shutil.rmtree(out / "final.tmp", ignore_errors=True)


def finish(out, samples, points, dynamics, keep_state):
    """After final/ (rank 0): dynamics.jsonl, and the state removed unless --keep-state."""
    if points:
        write_dynamics(out / "dynamics.jsonl", samples, points, dynamics)
    if not keep_state:
        shutil.rmtree(out / "state", ignore_errors=True)
    print(f"wrote {out / 'final'}" + (f" and {out / 'dynamics.jsonl'}" if points else ""))


SAVE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def final_dtype(flag, base) -> str:
    """--save-dtype resolved before anything is written (a key of SAVE_DTYPES); auto: the base's
    (config.json's dtype or torch_dtype: bfloat16, float16; fp32 for any other or none)."""
    if flag != "auto":
        return flag
    path = base / "config.json"
    config = data.read_json(path)
    for key in ("dtype", "torch_dtype"):  # transformers 5 writes "dtype"
        if key in config:
            expected = 'a dtype name (a string such as "bfloat16") or null'
            data.json_field(config, key, path, lambda v: v is None or isinstance(v, str), expected)
    named = config.get("dtype") or config.get("torch_dtype")
    return {"bfloat16": "bf16", "float16": "fp16"}.get(named, "fp32")


def forward_backward(
    model,
    samples,
    batch,
    lam,
    mu,
    mixup_only,
    micro_batch,
    grad_clip,
    device,
    amp_dtype,
    rank,
    world,
):
    """Accumulate the gradient of L over this rank's micro-batches of one global batch; clip it.

    L = L_NTP + mu L_Mixup, or L_Mixup alone with mixup_only; each term normalised over the whole
    global batch (sftmix.micro_batches gives the normalisers), so micro-batch and rank boundaries do
    not change the gradient. batch holds G sample indices, and lam (G/2,) makes it G/2 pairs
    (epoch_batches), or is None (plain NTP). Both terms come from sftmix.head_losses, which the
    model's LM head calls on the final hidden states (so that FSDP2 gathers the head's weight).
    Nothing here waits for the device: every index is laid out on the host (data.pack,
    sftmix.micro_batches) and copied asynchronously, and the sums stay on the device. Returns
    (stats, input tokens of the global batch): stats (4,) on the device = (L, L_NTP, L_Mixup, grad
    norm before clipping), for the caller to read."""
    micro, n_tokens, n_mixed = sftmix.micro_batches(batch, samples, rank, world, micro_batch, lam)
    ntp_weight, mix_weight = (0.0, 1.0) if mixup_only else (1.0, mu)
    sums = torch.zeros(2, device=device)  # NTP NLL sum, Mixup CE sum
    for j, mb in enumerate(micro):
        b = data.to_device(data.pack([samples[i] for i in mb.rows]), device)
        pairs = data.to_device(
            {"mix_c": mb.mix_c, "mix_u": mb.mix_u, "lam": mb.lam, "rest": mb.rest}, device
        )
        head = partial(sftmix.head_losses, targets=b["targets"], **pairs)
        # DDP all-reduces gradients after the last micro-batch only; FSDP2 reduce-scatters after
        # every one, so no rank holds an unsharded gradient between micro-batches (4 bytes a
        # parameter at fp32 reduction)
        last = j == len(micro) - 1
        with model.no_sync() if isinstance(model, DDP) and not last else nullcontext():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                # (N,), (M,)
                nll, mix = model(b["input_ids"], seqs=b["seqs"], logits_at=b["trained"], head=head)
            L_ntp, L_mixup = nll.sum() / n_tokens, mix.sum() / max(n_mixed, 1)
            L = ntp_weight * L_ntp + mix_weight * L_mixup  # L = L_NTP + mu L_Mixup
            # ranks average gradients; * world makes it the sum over the global batch
            (L * world).backward()
        sums += torch.stack([nll.detach().sum(), mix.detach().sum()])
    if world > 1:
        dist.all_reduce(sums)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float("inf"))
    if isinstance(grad_norm, DTensor):
        grad_norm = grad_norm.full_tensor()
    ntp, mixup = sums[0] / n_tokens, sums[1] / max(n_mixed, 1)
    stats = torch.stack(
        [ntp_weight * ntp + mix_weight * mixup, ntp, mixup, grad_norm.to(ntp.dtype)]
    )
    return stats, sum(len(samples[i].input_ids) for i in batch)


# ----------------------------------------------------------------------------- flags


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.Help)

    number = partial(data.add_number, p)  # a numeric flag: its range is its type

    def flag(name, help, **kw):
        p.add_argument(name, action="store_true", help=help, **kw)

    p.add_argument(
        "--mode",
        choices=["ntp", "sftmix"],
        default="ntp",
        help="plain SFT, or SFTMix (needs --split)",
    )
    p.add_argument(
        "--model",
        required=True,
        help="base model: HF directory (config.json, safetensors, tokenizer), or a run directory "
        "(its final/)",
    )
    p.add_argument(
        "--data",
        required=True,
        help="training data (alpaca / sharegpt / messages; JSON, JSON lines or parquet)",
    )
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--split", help="split.json from `sftmix.py split` (sftmix mode)")
    flag(
        "--mixup-only",
        "sftmix: L = L_Mixup, no NTP term and mu unused (the paper's 'Mixup only' ablation)",
    )
    number(
        "--dynamics",
        int,
        ">= 0 (0 = off)",
        0,
        "record every example's response perplexity at C evenly spaced checkpoints",
        metavar="C",
    )
    p.add_argument(
        "--heldout", help="held-out data: response perplexity after every epoch, in metrics.jsonl"
    )
    number(
        "--heldout-every",
        int,
        ">= 0 (0 = at epoch ends only)",
        0,
        "a held-out pass every K optimizer steps too (0 = at epoch ends only); each pass appends "
        "its per-example NLL to OUT/heldout.jsonl",
        metavar="K",
    )
    number("--alpha", float, "> 0 (Beta(alpha, alpha))", 0.5, "lambda ~ Beta(alpha, alpha) [paper]")
    number("--mu", float, ">= 0", 0.2, "weight of the Mixup loss [paper]")
    number("--epochs", int, ">= 1", 1, "passes over the data [paper: 3 Alpaca, 1 UltraChat]")
    number("--lr", float, "> 0 and finite", 2e-6, "peak learning rate [paper]")
    number(
        "--weight-decay",
        float,
        ">= 0 and finite",
        0.1,
        "AdamW weight decay of the weight matrices; norms and biases are not decayed [paper: 0.1]",
    )
    number("--betas", float, "in [0, 1)", (0.9, 0.999), "AdamW betas [ours]", nargs=2)
    number(
        "--warmup-ratio",
        float,
        "in [0, 1)",
        0.1,
        "linear warm-up share W of the steps; step k runs at lr (k+1)/W (HF: lr k/W) [paper: 0.1]",
    )
    number(
        "--grad-clip",
        float,
        ">= 0 and finite (0 = off)",
        1.0,
        "max global grad norm, 0 = off [ours]",
    )
    number("--global-batch", int, ">= 1", 32, "examples per optimizer step, all ranks [paper]")
    number("--micro-batch", int, ">= 1", 4, "examples per forward on one rank [ours]")
    number("--max-len", int, ">= 2", data.MAX_LEN, "tokens per example, cut on the right [ours]")
    p.add_argument(
        "--format", choices=data.FORMATS, help="data format (detected from the keys if not given)"
    )
    p.add_argument(
        "--prompt-format",
        choices=data.PROMPT_FORMATS,
        help="(detected from the tokenizer if not given)",
    )
    p.add_argument(
        "--dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="compute precision: auto = bf16 on CUDA, fp32 on CPU; weights and optimizer stay fp32",
    )
    p.add_argument(
        "--save-dtype",
        choices=["auto", "fp32", "bf16"],
        default="auto",
        help="dtype of the weights in final/: auto = the base checkpoint's (its config.json's torch_dtype "
        "or dtype; fp32 when it names none): bf16 for the paper's models, fp32 for the demo's",
    )
    p.add_argument(
        "--shard",
        choices=["ddp", "fsdp", "hsdp"],
        help="ddp: every rank holds the whole model; fsdp: FSDP2, weights/grads/optimizer sharded over "
        "all ranks; hsdp: sharded within groups of --shard-degree ranks (a node), replicated across "
        "them. Default: fsdp under torchrun with more than one rank, else ddp. A run whose "
        "estimated peak exceeds the GPU's memory ($SFTMIX_DEVICE_MEMORY_GB when set) is "
        "refused before loading, naming what would fit",
    )
    number(
        "--shard-degree",
        int,
        ">= 1",
        int(os.environ.get("LOCAL_WORLD_SIZE", 1)),
        "hsdp: ranks that shard the model among them (default: the ranks of a node, torchrun's "
        "LOCAL_WORLD_SIZE); the world is replicated over world / degree groups",
    )
    flag(
        "--activation-checkpointing",
        "keep only each block's input, recompute the block in backward",
    )
    flag(
        "--compile",
        "torch.compile each transformer block (whole graph, lengths dynamic after the first)",
    )
    flag(
        "--deterministic",
        "deterministic kernels on CUDA (slower), so a resumed run repeats bitwise there too; on the "
        "CPU every run is deterministic already",
    )
    number("--seed", int, ">= 0", 0, "data order and lambda draws")
    number("--eval-batch", int, ">= 1", 16, "examples per forward in the dynamics pass")
    number(
        "--save-every",
        int,
        ">= 1",
        500,
        "steps between resumable states (written in the background while training goes on; "
        "none at the last step, unless --keep-state)",
    )
    number(
        "--save-every-minutes",
        float,
        ">= 0 (0 = off)",
        30.0,
        "minutes between resumable states as well (0 = by steps only)",
    )
    number(
        "--timeout-minutes",
        float,
        "> 0",
        30.0,
        "how long a collective (a barrier after a save on a slow file system) may wait before "
        "the process group gives up [torch: 10]",
    )
    number(
        "--final-shard-gb",
        float,
        "> 0",
        5.0,
        "largest safetensors file of final/ (more files, with an index, above it) [HF: 5]",
    )
    flag(
        "--resume",
        "continue from OUT/state/ if it holds a state; what the inputs hold and every flag must be "
        "the same, but the number of ranks and these may change: "
        + ", ".join("--" + f.replace("_", "-") for f in RESUMABLE_FLAGS[:-1]),
    )
    flag(
        "--keep-state",
        "keep OUT/state/ (fp32 weights + AdamW moments: 12 bytes a parameter) after final/ is written",
    )
    number(
        "--stop-at-step",
        int,
        ">= 0 (0 = off)",
        0,
        "save the state and exit after this step, to continue later with --resume (0 = run to the end)",
    )
    number(
        "--lora-rank",
        int,
        ">= 0 (0 = off)",
        0,
        "train rank-R LoRA adapters only, the base frozen; final/ holds the merged weights "
        "W + (alpha/R) B A (0 = off: all weights train). Adapters usually want a larger --lr (~1e-4)",
        metavar="R",
    )
    number("--lora-alpha", float, "> 0 and finite", 16.0, "LoRA scale alpha/R [ours; peft: 8]")
    p.add_argument(
        "--lora-targets",
        nargs="+",
        choices=LORA_TARGETS,
        default=list(LORA_TARGETS),
        metavar="NAME",
        help="projections (HF names) that get adapters [ours: all seven, as QLoRA; peft: q_proj v_proj]",
    )
    return p.parse_args(argv)


def check_args(args, world):
    """The flags checked together before anything loads (each number's own range is its type,
    data.number): one line naming the flag and what was expected. Resolves --shard's default."""
    if not args.out:
        raise InputError("--out: expected a run directory, got an empty path")
    if args.mixup_only and args.mode != "sftmix":
        raise InputError("--mixup-only: expected --mode sftmix (the Mixup term needs pairs)")
    if args.split and args.mode != "sftmix":
        raise InputError("--split: expected --mode sftmix (ntp trains on no split)")
    if args.mode == "sftmix" and not args.split:
        raise InputError("--mode sftmix needs --split FILE (from `python sftmix.py split`)")
    if args.global_batch % (world * args.micro_batch):
        raise InputError(
            f"--global-batch {args.global_batch}: expected a multiple of ranks x --micro-batch "
            f"= {world} x {args.micro_batch}"
        )
    args.shard = args.shard or ("fsdp" if world > 1 else "ddp")
    degree = args.shard_degree
    if args.shard == "hsdp" and not (1 <= degree <= world and world % degree == 0):
        raise InputError(f"--shard-degree {degree}: expected a divisor of the {world} ranks")
    if args.mode == "sftmix" and args.micro_batch % 2:
        raise InputError(
            f"--micro-batch {args.micro_batch}: an SFTMix micro-batch holds confident/unconfident "
            f"pairs, expected an even number"
        )


# ------------------------------------------------------------------------ data, schedule, optimizer


def split_indices(path, samples):
    """split.json -> (confident, unconfident) sample indices; each id of the data in one half."""
    halves = sftmix.read_split(path)
    halves = [halves["confident"], halves["unconfident"]]
    index = {s.id: i for i, s in enumerate(samples)}
    in_split = set(halves[0]) | set(halves[1])
    unknown = [i for i in halves[0] + halves[1] if i not in index]
    missing = [i for i in index if i not in in_split]
    repeated = [i for half in halves for i, n in Counter(half).items() if n > 1]
    if unknown or missing or set(halves[0]) & set(halves[1]) or repeated:
        raise InputError(
            f"{path}: ids must match the data: {len(unknown)} not in the data {unknown[:3]}, "
            f"{len(missing)} of the data not in the split {missing[:3]}, "
            f"{len(set(halves[0]) & set(halves[1]))} in both halves, "
            f"{len(repeated)} repeated in a half {repeated[:3]}"
        )
    return [index[i] for i in halves[0]], [index[i] for i in halves[1]]


def epoch_batches(n, halves, epoch, G, seed, alpha):
    """The global batches of one epoch as (sample indices, lambdas); an incomplete last batch is
    dropped.

    halves None (ntp): a shuffled order of the n samples cut into batches of G, no lambdas. halves =
    (confident, unconfident) sample indices (sftmix): G/2 confident then G/2 unconfident examples,
    pair i = (batch[i], batch[G/2 + i]) with lambda lam[i] ~ Beta(alpha, alpha), drawn from
    (seed, step)."""
    if halves is not None:
        batches = sftmix.paired_batches(*halves, G, seed, epoch)
        return [
            (b, sftmix.sample_lambda(alpha, G // 2, seed, epoch * len(batches) + i))
            for i, b in enumerate(batches)
        ]
    order = data.shuffled_order(n, seed, epoch)
    return [(order[b * G : (b + 1) * G], None) for b in range(len(order) // G)]


def lr_at(step, total, lr, warmup_ratio):
    """Linear warm-up over W = ceil(warmup_ratio * total) steps to --lr, then cosine decay to 0.

    Step k (0-based) of the warm-up runs at lr (k + 1) / W, so the first step already learns (HF's
    linear warm-up runs its first step at lr 0)."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * progress))


def adamw(model, lr, weight_decay, betas=(0.9, 0.999)):
    """AdamW with weight decay on the matrices only: RMSNorm weights and biases (1-D) are not
    decayed, as in nanoGPT and HF's Trainer (decaying a norm weight pulls it towards 0, not towards
    the identity). Frozen parameters (the base under LoRA) are left out."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=True)


def dynamics_points(total, C):
    """The C optimizer steps after which perplexities are recorded: round(total * k / C), k = 1..C."""
    points = [round(total * k / C) for k in range(1, C + 1)]
    if len(set(points)) != C or points[0] == 0:
        raise InputError(f"--dynamics {C}: the run has only {total} steps; expected at least {C}")
    return points


# ------------------------------------------------------------------------------- model and outputs


def prepare_model(model, lora, activation_checkpointing, compile, mesh, bf16):
    """What train.py does to the model on the meta device, before any weight has memory: LoRA
    adapters (lora = (rank, alpha, targets), rank 0 = none), activation checkpointing,
    `torch.compile` of each block, and FSDP2's units over `mesh` (None: no sharding; 1-D: FSDP; 2-D
    (replicate, shard): HSDP), as torchtitan lays them out: each block, the embedding, and the final
    norm with the LM head (kept gathered after forward: backward needs them first). A tied LM head
    is the embedding's weight, so both stay in the root unit then. FSDP2 computes in bf16 under bf16
    (its policy casts the gathered weights), reducing gradients in fp32."""
    if lora[0]:
        add_lora(model, *lora)
    model.checkpoint_activations = activation_checkpointing
    for block in model.model.layers if compile else []:
        # lengths vary: the second length makes the graph dynamic, no more
        block.compile(fullgraph=True)
    if mesh is not None:
        mp = (
            MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            if bf16
            else MixedPrecisionPolicy()
        )
        shard = partial(fully_shard, mesh=mesh, mp_policy=mp)
        for block in model.model.layers:
            shard(block)
        if not model.args.tie_word_embeddings:
            shard(model.model.embed_tokens)
            shard([model.model.norm, model.lm_head], reshard_after_forward=False)
        shard(model)


def shard_mesh(shard, degree, world, device):
    """The device mesh FSDP2 shards over: all ranks (fsdp), (world / degree replicas, degree shards)
    (hsdp: each node holds one copy, sharded among its ranks; gradients are reduce-scattered within
    a node and all-reduced across nodes), or None (ddp)."""
    if shard == "fsdp":
        return init_device_mesh(device.type, (world,))
    if shard == "hsdp":
        return init_device_mesh(
            device.type, (world // degree, degree), mesh_dim_names=("replicate", "shard")
        )
    return None


def pick_device(local_rank, deterministic):
    """This rank's GPU (cuda:LOCAL_RANK), else the CPU; deterministic kernels if asked."""
    device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if deterministic:  # cuBLAS needs this before its first call to be deterministic
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return device


def _local(t):
    """The part of a tensor this rank holds: its shard under FSDP (a DTensor), else all of it."""
    return t.to_local() if isinstance(t, DTensor) else t


def weights_finite(model, world):
    """(1,) 1.0 on every rank when no weight is inf or NaN, else 0.0, left on the device (no host
    sync): one fused max-abs over all of this rank's tensors, then the minimum over ranks."""
    max_abs = torch._foreach_norm([_local(p).detach() for p in model.parameters()], ord=math.inf)
    finite = torch.stack(max_abs).isfinite().all().float()[None]
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return finite


def writable_dir(out):
    """Create the run directory (and its parents) and check it takes files, before any work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with data.atomic_path(out / ".write-test") as probe:
            probe.write_text("")
        (out / ".write-test").unlink()
    except OSError as e:
        raise InputError(
            f"--out {out}: cannot write there ({e.strerror}); expected a directory that can be created "
            f"and written"
        ) from None


def write_dynamics(path, samples, points, dynamics):
    """dynamics.jsonl, a line per example: {"id", "perplexities": [Perp at each point],
    "confidence", "variability"}."""
    perps = [[dynamics[s][sample.id] for s in points] for sample in samples]
    conf, var = sftmix.confidence(perps), sftmix.variability(perps)
    data.write_json(
        path,
        [
            {"id": s.id, "perplexities": p, "confidence": float(c), "variability": float(v)}
            for s, p, c, v in zip(samples, perps, conf, var)
        ],
        lines=True,
    )


def lines_until(path, step) -> str:
    """The complete lines of a run's metrics.jsonl or heldout.jsonl up to `step` (none at step 0,
    nothing read): each a JSON object with an integer "step", else one line naming it."""
    if step == 0 or not path.exists():
        return ""
    text, kept = path.read_bytes().decode(errors="replace"), []
    for n, line in enumerate(text.split("\n")[:-1], 1):  # the last: "" or half-written
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            record = None
        if not (isinstance(record, dict) and type(record.get("step")) is int):
            raise InputError(
                f'{path}:{n}: expected a JSON object with an integer "step", got {line[:60]!r}'
            )
        kept += [line + "\n"] if record["step"] <= step else []
    return "".join(kept)


def check_out(out, dynamics, step):
    """What the run directory holds already, checked before anything is written: its files not
    directories, the lines up to `step` of its metrics.jsonl and heldout.jsonl readable
    (lines_until), state/, final/ and final.tmp/ directories or absent. Returns {path: those lines}
    of the two that exist (a run died after its state: what follows it is dropped)."""
    if not out.is_dir():
        return {}  # prepare_out makes it, or refuses
    for name in ["metrics.jsonl", "heldout.jsonl"] + ["dynamics.jsonl"] * bool(dynamics):
        data.check_output(out / name)
    paths = [out / "metrics.jsonl", out / "heldout.jsonl"]
    kept = {path: lines_until(path, step) for path in paths if path.exists()}
    for name in ("state", "final", "final.tmp"):
        if (out / name).is_file():
            raise InputError(f"--out {out}: {name}: expected a directory or none, got a file")
    return kept


def append_line(path, record):
    """Append one JSON line to path (rank 0)."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_data(path, tok, prompt_format, max_len, fmt, out, local_rank):
    """(samples, stats) of a data file, the samples' tokens in flat int32 arrays
    (data.token_arrays). Under torchrun each node's local rank 0 tokenizes it into OUT/cache/ and
    the node's other ranks memory-map that (data.cached_dataset); alone, the process tokenizes it
    and writes nothing."""
    if not dist.is_initialized():
        samples, stats = data.load_dataset(path, tok, prompt_format, max_len, fmt, verbose=False)
        return data.array_samples([s.id for s in samples], data.token_arrays(samples)), stats
    host = dist.new_group(backend="gloo")  # the flag goes over the CPU whatever the backend

    def barrier(failed):
        flag = torch.tensor([float(failed)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=host)
        return bool(flag)

    return data.cached_dataset(
        path, tok, prompt_format, max_len, fmt, out / "cache", local_rank == 0, barrier
    )


def token_fingerprint(samples):
    """sha256 of each sample's id, token ids and labels (as int32), however they are stored."""
    h = hashlib.sha256()
    for s in samples:
        ids, labels = (np.asarray(x, np.int32).tobytes() for x in (s.input_ids, s.labels))
        h.update(s.id.encode() + b"\0" + ids + labels)
    return h.hexdigest()


def check_batches(args, samples, halves, steps_per_epoch):
    """One line when the data (or the split's pairs) fill no global batch."""
    if steps_per_epoch == 0 and halves:
        raise InputError(
            f"{args.split}: {len(halves[0])} confident and {len(halves[1])} unconfident examples make "
            f"{min(map(len, halves))} pairs, fewer than the {args.global_batch // 2} of one global batch"
        )
    if steps_per_epoch == 0:
        raise InputError(
            f"{args.data}: {len(samples)} samples fill no global batch of {args.global_batch}"
        )


# ----------------------------------------------------------------------------- the resumable state and final/
# The resumable state through torch.distributed.checkpoint (DCP), the settings a resumed run must
# share with it, and final/. OUT/state/step-N/ holds each rank's shards as safetensors (written
# asynchronously, read by HuggingFaceStorageReader: no pickle; resharded on load, so N ranks resume
# on M); OUT/state/latest.json, replaced atomically once every rank's write is complete, is the
# commit point. docs/at-scale.md#the-resumable-state has the layout and what is tested.

# what latest.json's "layout" names; any other state is an older layout
LAYOUT = "dcp-safetensors-1"


def run_config(args, model_args, samples, heldout, halves):
    """The settings a resumed run must share, as they read back from JSON: every flag but
    RESUMABLE_FLAGS, and INPUT_sha256, a fingerprint of what each input of FINGERPRINTS holds (None
    when not given). Their paths are kept to name an input in a message, and what_changed does not
    compare them."""
    content = {
        "model": vars(model_args),
        "split": halves and [[samples[i].id for i in half] for half in halves],
    }
    digest = {
        k: v and hashlib.sha256(json.dumps(v).encode()).hexdigest() for k, v in content.items()
    }
    config = {k: v for k, v in sorted(vars(args).items()) if k not in RESUMABLE_FLAGS}
    config |= {
        "model_sha256": digest["model"],
        "data_sha256": token_fingerprint(samples),
        "heldout_sha256": heldout and token_fingerprint(heldout),
        "split_sha256": digest["split"],
    }
    return json.loads(json.dumps(config))


def what_changed(saved, config):
    """Each setting of config (run_config) that differs from the saved run's, in words; a path
    alone never does."""
    changed = []
    for k, v in config.items():
        flag = k.removesuffix("_sha256")
        if k in FINGERPRINTS or saved.get(k) == v:
            continue
        if flag in FINGERPRINTS and v and saved.get(k):
            changed.append(f"{config[flag]}: {FINGERPRINTS[flag]}")
        else:  # a flag, or an input given now and not then (or the reverse)
            changed.append(
                f"--{flag.replace('_', '-')}: saved {saved.get(flag)!r}, now {config[flag]!r}"
            )
    return changed


def check_settings(out, latest, config, total, points, ids):
    """Before the model loads: the state in OUT/state/ (latest: its latest.json, read_latest) was
    written with the settings of config (run_config), or one line names each that differs
    (what_changed); then its step is one of the run's `total`, its checkpoint that step's folder
    (nothing is removed before: prepare_out), and its dynamics hold a perplexity of each example
    (ids, in data order) at each of the points up to it."""
    path = out / "state" / "latest.json"
    changed = "; ".join(what_changed(latest["config"], config))
    if changed:
        raise InputError(f"{out / 'state'}: was written by a run with other settings: {changed}")
    step, dynamics = latest["step"], latest["dynamics"]
    if step > total:
        raise InputError(f"{path}: step: expected an integer in [1, {total}], got {step}")
    folder = path.parent / f"step-{step:07d}"  # Saver's name
    data.json_field(latest, "checkpoint", path, lambda v: v == folder.name, json.dumps(folder.name))
    if not folder.is_dir():
        raise InputError(f"{folder}: not found; expected the state folder {path.name} names")
    due = [p for p in points if p <= step]
    if sorted(dynamics) != due:
        raise InputError(f"{path}: dynamics: expected the steps {due}, got {sorted(dynamics)}")
    for p, ppl in dynamics.items():
        bad = next((i for i in ids if not 0 < ppl.get(i, math.nan) < math.inf), None)
        if bad is not None:
            raise InputError(
                f"{path}: dynamics: step {p}: expected a perplexity > 0 of each example, got "
                f"{ppl.get(bad, 'none')} for {json.dumps(bad)}"
            )


def state_tensors(model, optimizer) -> dict:
    """name -> tensor of everything a run continues from: model.NAME, optimizer.NAME.{step, exp_avg,
    exp_avg_sq} (DTensors under FSDP2, as the parameters), and rng. AdamW's state is created empty
    where the optimizer has none yet (before a load), so that DCP has a tensor to load into."""
    tensors = {"rng": torch.get_rng_state()}
    for n, p in model.named_parameters():
        tensors[f"model.{n}"] = p.detach()
        if not p.requires_grad:  # a frozen weight (the base under LoRA) has no AdamW moments
            continue
        if p not in optimizer.state:
            optimizer.state[p] = {
                "step": torch.tensor(0.0),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
        tensors.update({f"optimizer.{n}.{k}": v for k, v in optimizer.state[p].items()})
    return tensors


def read_latest(out) -> dict:
    """OUT/state/latest.json: one line when it is unreadable, of an older layout, or its "step" is
    not an integer >= 1 or its "dynamics" not {step: {example id: perplexity}}; check_settings
    checks the rest against the run."""
    path = Path(out) / "state" / "latest.json"
    latest = data.read_json(path)
    data.json_field(latest, "config", path, lambda v: isinstance(v, dict), "an object")
    if latest.get("layout") != LAYOUT:
        raise InputError(
            f"{path}: an older state layout "
            f"({latest.get('layout') or 'a safetensors file per rank'})"
            f", expected {LAYOUT}: resume it with the train.py that wrote it, or start again"
        )
    data.json_field(latest, "step", path, lambda v: type(v) is int and v >= 1, "an integer >= 1")
    expected = "an object {step: {example id: perplexity}}"
    dynamics = data.json_field(latest, "dynamics", path, lambda v: isinstance(v, dict), expected)
    try:
        latest["dynamics"] = {
            int(k): {str(i): float(x) for i, x in v.items()} for k, v in dynamics.items()
        }
    except (ValueError, TypeError, AttributeError, OverflowError):
        raise InputError(
            f"{path}: dynamics: expected {expected}, got {json.dumps(dynamics)[:60]}"
        ) from None
    return latest


def remove_stale(out, keep=None):
    """Remove every OUT/state/step-* folder but `keep`, and OUT/final.tmp: what a run killed while
    writing left. Rank 0 alone calls it, before any rank writes."""
    for old in (Path(out) / "state").glob("step-*"):
        if old.name != keep:
            shutil.rmtree(old)
    shutil.rmtree(Path(out) / "final.tmp", ignore_errors=True)


class Saver:
    """Writes states with at most one write in flight. save() waits for the previous write, makes it
    current, then starts the next; wait() finishes the one in flight (before exit). Rank 0 writes
    latest.json."""

    def __init__(self, out, rank, asynchronous=True):
        self.out, self.rank, self.asynchronous = Path(out), rank, asynchronous
        # groups of their own, so that the writer thread's collectives never interleave with
        # training's, nor with SaveSchedule's clock
        self.group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.clock = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.pending = None  # (future, latest.json's content) of the write in flight
        self.committed = 0  # the step of the last complete state on disk

    def save(self, model, optimizer, step, dynamics, config):
        self.wait()
        if step == self.committed:
            return  # this very state is already complete on disk
        name = f"step-{step:07d}"
        writer = dcp.HuggingFaceStorageWriter(str(self.out / "state" / name), save_distributed=True)
        tensors = state_tensors(model, optimizer)
        warnings.filterwarnings("ignore", "torch.distributed is disabled")  # one process: we know
        where = dict(storage_writer=writer, process_group=self.group, no_dist=self.group is None)
        future = None
        if self.asynchronous:  # copies to host memory now, writes in a thread
            future = dcp.async_save(tensors, **where)
        else:
            dcp.save(tensors, **where)
        ranks = dist.get_world_size() if dist.is_initialized() else 1
        latest = dict(layout=LAYOUT, step=step, checkpoint=name, ranks=ranks, config=config)
        self.pending = future, latest | {"dynamics": {str(k): v for k, v in dynamics.items()}}
        if future is None:
            self.wait()

    def wait(self):
        """Finish the write in flight, if any, and make it the current state (latest.json,
        atomically)."""
        if self.pending is None:
            return
        future, latest = self.pending
        self.pending = None
        if future is not None:
            future.result()  # on rank 0, after every rank's files are written
        if self.rank == 0:
            data.write_json(self.out / "state" / "latest.json", latest)
            remove_stale(self.out, keep=latest["checkpoint"])
        self.committed = latest["step"]


def load_state(out, latest, model, optimizer):
    """Restore the state `latest` (its latest.json, read_latest; its settings already checked) names
    into the model and optimizer, on any number of ranks; returns (step, dynamics). An unreadable
    state is one line naming its folder."""
    step, folder = latest["step"], Path(out) / "state" / latest["checkpoint"]
    tensors = state_tensors(model, optimizer)
    warnings.filterwarnings("ignore", "torch.distributed is disabled")
    try:
        if not any(folder.glob("*.safetensors")):
            raise FileNotFoundError("no safetensors file")
        reader = dcp.HuggingFaceStorageReader(str(folder))  # safetensors headers, no pickle
        dcp.load(tensors, storage_reader=reader, no_dist=not dist.is_initialized())
    # what DCP's load raises on a damaged state, or on one of another model (KeyError: a tensor
    # it lacks)
    except (
        OSError,
        SafetensorError,
        CheckpointException,
        RuntimeError,
        AssertionError,
        KeyError,
    ) as e:
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise InputError(
            f"{folder}: unreadable or not this run's model ({reason}); expected a "
            f"state written by train.py"
        ) from None
    torch.set_rng_state(tensors["rng"])
    return step, latest["dynamics"]


def last_state(out, saved):
    """What a run stopped by divergence leaves: the last state saved on schedule (the weights in
    memory, though finite, are those that diverged, so nothing is written), and how to go on."""
    if saved == 0:
        return "No state was saved yet: start again with a lower --lr"
    return f"The state after step {saved} is in {out / 'state'}: continue with --resume and a lower --lr"


def final_tensors(model, dtype, lora_scale=None):
    """(name, full CPU tensor) of each weight in turn, in the save dtype: cast where the weight
    lives (on its device; under FSDP2 each rank casts its shard), gathered (every rank takes part),
    then copied to the host, so the host holds one tensor at a time. Under LoRA each adapted weight
    is W + scale B A, with no adapter entries. Every rank iterates it; rank 0 writes what it
    yields."""
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name.endswith((".lora_A", ".lora_B")):
            continue
        prefix = name.removesuffix("weight")
        if lora_scale and prefix + "lora_A" in params:  # W' = W + scale B A, in fp32, then cast
            A, B = (_full(params[prefix + k].detach(), torch.float32) for k in ("lora_A", "lora_B"))
            w = _full(p.detach(), torch.float32) + lora_scale * (B @ A)
        else:
            w = _full(p.detach(), dtype)
        yield name, w.to(dtype).cpu()


def _full(t, dtype):
    """The whole tensor, cast to dtype before it is gathered (a DTensor) or copied."""
    t = t.to(dtype)
    return t.full_tensor() if isinstance(t, DTensor) else t


# ----------------------------------------------------------------------------- memory per GPU
# How much memory a train.py step takes per GPU, estimated before anything loads (train.py refuses
# a run that would not fit; scripts/memory_table.py prints the table for the paper's models).


def device_memory(device):
    """Bytes of memory a GPU has: $SFTMIX_DEVICE_MEMORY_GB if set (to plan for another device, or to
    test), else CUDA's total memory; None on the CPU (no limit checked)."""
    if os.environ.get("SFTMIX_DEVICE_MEMORY_GB"):
        gb = data.number("SFTMIX_DEVICE_MEMORY_GB", float, "> 0 (GB)")
        return gb(os.environ["SFTMIX_DEVICE_MEMORY_GB"]) * 1e9
    return torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None


def check_memory(model_args, args, samples, world, device):
    """Before any weight loads: refuse a run whose estimated peak per GPU (memory_per_gpu,
    for the longest micro-batch of the data) exceeds the device's memory, naming settings that would
    fit. LoRA runs are not checked (the estimate counts every weight as trained)."""
    limit = device_memory(device)
    if limit is None or args.lora_rank:
        return
    lengths, mixup = sorted(len(s.input_ids) for s in samples), args.mode == "sftmix"

    def peak(shard, checkpointing, micro_batch):
        gpus = {"ddp": 1, "fsdp": world, "hsdp": args.shard_degree}[shard]
        kind, tokens = "ddp" if shard == "ddp" else "fsdp", sum(lengths[-micro_batch:])
        return memory_per_gpu(model_args, gpus, kind, checkpointing, tokens, mixup)["total"]

    now = peak(args.shard, args.activation_checkpointing, args.micro_batch)
    if now <= limit:
        return
    shards = [args.shard] + (["fsdp"] if world > 1 and args.shard != "fsdp" else [])
    mb = args.micro_batch  # then halved, quartered, and the smallest (an SFTMix pair: 2)
    micro = [mb] + [m for m in (mb // 2, mb // 4, 2 if mixup else 1) if 1 <= m < mb]
    # preferred: sharding, then checkpointing, then a smaller micro-batch
    fits = [
        (s, c, m)
        for s in shards
        for m in micro
        for c in (args.activation_checkpointing, True)
        if peak(s, c, m) <= limit
    ]
    advice = "nothing does on this many GPUs: more GPUs, or a smaller model"
    if fits:
        s, c, m = fits[0]
        change = (
            [f"--shard {s}"] * (s != args.shard)
            + ["--activation-checkpointing"] * (c != args.activation_checkpointing)
            + [f"--micro-batch {m}"] * (m != args.micro_batch)
        )
        advice = f"{' '.join(change)} would fit ({peak(s, c, m) / 1e9:.1f} GB)"
    raise InputError(
        f"--shard {args.shard}: an estimated {now / 1e9:.1f} GB a GPU (train.memory_per_gpu), more "
        f"than the device's {limit / 1e9:.1f} GB; {advice}"
    )


def memory_per_gpu(
    m, gpus, shard, activation_checkpointing, tokens_per_gpu, mixup=True, chunk=CHUNK
):
    """Estimated peak bytes per GPU of one train.py step (bf16 compute, fp32 weights, AdamW), by
    term; SFTMix's step, or NTP's with mixup=False.

    ModelArgs m (no biases); P parameters, P_b in one block, E = V D in the embedding (and in an
    untied LM head); N = gpus under FSDP2, 1 under DDP; T tokens per micro-batch, one packed row of
    sequences of equal length (attention sees them right-padded to the longest: unequal lengths add
    padding to its terms below); n = min(T, chunk) positions per LM-head chunk (sftmix.CHUNK).
    Resident:
        weights    4P/N   fp32 (FSDP2: this rank's shards)
        optimizer  8P/N   AdamW's two fp32 moments
        grads      4P/N   fp32. FSDP2 reduce-scatters each unit after every micro-batch: no unsharded gradient
                          stays between micro-batches; the shards fill up during backward (at its
                          start only the LM head's exist). DDP's buckets hold all of them all the
                          time.
        load       4P/N   model.load_pretrained: the shards; the one full tensor read at a time stays on the host
    Working set:
        activations  kept for backward, per token and block (bf16, fp32 where the code computes in fp32):
                         a = 2 (8D + 4)         two RMSNorms: fp32 input and 1/rms, bf16 normalised input
                                                (the weight's gradient needs it) and output
                           + 2 (3 H hd + 2 K hd)   q, k and v as padded sequences (K heads: SDPA's GQA), the
                           + 4 H                   output, and in the row's order the output projection's input;
                                                   fp32 logsumexp
                           + 4 (2 I)               gate, up, silu(gate), silu(gate) * up
                     and 8D + 4 per token for the final norm and the hidden states the head reads. With
                     --activation-checkpointing: each block's bf16 input (2D per token and block), plus one
                     block recomputed in backward, a per token.
        head         the backward of one chunk: its fp32 log-probabilities (kept), their gradient and the
                     logits' gradient, 12 n V; SFTMix's chunk of pairs holds one more (n, V) fp32
                     tensor, the mixed logits' gradient returned to the two halves of the logits, 16
                     n V. And the LM head's weight gradient in bf16, 2E (DDP: and its fp32 cast, 4E
                     more). No (T, V) logits exist.
        buffers      FSDP2's, per unit (each block; the embedding; final norm + LM head together, as torchtitan;
                     a tied model keeps embedding = LM head and final norm in the root unit): the
                     bf16 weights gathered, the unit's bf16 gradient and its fp32 reduce-scatter
                     input; the input of the previous unit's reduce-scatter stays until this unit's
                     begins. DDP: autocast's bf16 copy of every weight, kept for backward, 2P, and
                     the embedding's fp32 gradient before it joins its bucket, 4E.
    The peak is the largest of the step's fullest moments (FSDP2's terms; under DDP every gradient
    exists throughout) and loading:
        head      the LM head's backward: every activation kept, the head's working set; gathered, the head's
                  unit (kept from its forward) and block L-1 (prefetched); no gradient made yet.
        top       block L-1's backward, the first: every activation kept (with checkpointing: every block's
                  input, and this block recomputed); the head's gradients made; this block and the
                  next gathered; its bf16 gradient; the head's reduce-scatter input in flight.
        bottom    block 0's backward, the last: its activations alone; every gradient made but its own and the
                  last unit's; it gathered, its bf16 gradient, block 1's reduce-scatter input in
                  flight.
        last unit the embedding's backward (the tied root's): every other gradient made; the unit
                  gathered (size U), its bf16 gradient and block 0's reduce-scatter input, then
                  that gradient, a bf16 staging copy of it and its fp32 reduce-scatter input:
                  4U + 4 max(P_b, U).
    The tied root is gathered all step, and its bf16 gradient kept from the head's backward to the
    end.
    """
    D, I, L, V = m.hidden_size, m.intermediate_size, m.num_hidden_layers, m.vocab_size
    H, K, hd = m.num_attention_heads, m.num_key_value_heads, m.head_dim
    fsdp, tied = shard == "fsdp", m.tie_word_embeddings
    T, n = tokens_per_gpu, min(tokens_per_gpu, chunk)
    P_b = D * (H + 2 * K) * hd + H * hd * D + 3 * D * I + 2 * D  # attention, MLP, two norms
    E = V * D
    P = L * P_b + E * (1 if tied else 2) + D
    N = gpus if fsdp else 1
    a = 2 * (8 * D + 4) + 2 * (3 * H * hd + 2 * K * hd) + 4 * H + 4 * 2 * I  # per token and block
    final = (8 * D + 4) * T
    if activation_checkpointing:  # every block's input kept, one block recomputed
        kept = {"top": 2 * D * L * T + a * T, "bottom": 2 * D * T + a * T}
        kept["head"] = 2 * D * L * T + final
    else:
        kept = {"head": L * a * T + final, "top": L * a * T, "bottom": a * T}
    head = (16 if mixup else 12) * n * V + (2 if fsdp else 6) * E
    weights, optimizer, grads = 4 * P / N, 8 * P / N, 4 * P / N
    head_unit = E + D  # final norm + LM head; tied: the root's embedding = LM head and final norm
    U = head_unit if tied else E  # the unit reduced last
    if fsdp:
        # the tied root gathered all step, and its gradient
        root = 2 * head_unit + 2 * E if tied else 0
        made = {
            "head": 0,
            "top": 0 if tied else 4 * head_unit / N,
            "bottom": 4 * (P - P_b - U) / N,
            "last unit": 4 * (P - U) / N,
        }
        buffers = {
            "head": 2 * head_unit + 2 * P_b,
            "top": root + 4 * P_b + 2 * P_b + (0 if tied else 4 * head_unit),
            "bottom": root + 2 * P_b + 2 * P_b + 4 * P_b,
            "last unit": 4 * U + 4 * max(P_b, U),
        }
    else:
        made = dict.fromkeys(("head", "top", "bottom", "last unit"), grads)
        buffers = {"head": 2 * P, "top": 2 * P, "bottom": 2 * P, "last unit": 4 * E}
    working = {
        "head": kept["head"] + head,
        "top": kept["top"],
        "bottom": kept["bottom"],
        "last unit": 0,
    }
    phases = {k: weights + optimizer + made[k] + working[k] + buffers[k] for k in made}
    phases["load"] = 4 * P / N
    at = max(phases, key=phases.get)
    return {
        "parameters": P,
        "weights": weights,
        "grads": grads,
        "optimizer": optimizer,
        "load": phases["load"],
        "activations": max(kept.values()),
        "head": head,
        "buffers": max(buffers.values()),
        "phases": phases,
        "at": at,
        "total": phases[at],
    }


if __name__ == "__main__":
    main()
