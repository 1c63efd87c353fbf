"""The resumable state of a train.py run, through torch.distributed.checkpoint (DCP), and final/.

    OUT/state/step-N/shard-R-model-00001-of-00001.safetensors
        what rank R-1 holds of the state (DCP's HuggingFaceStorageWriter: safetensors, each shard's
        offsets in its JSON header)
    OUT/state/latest.json
        {"layout", "step", "checkpoint", "ranks", "config", "dynamics"}: replaced atomically once
        every rank's write is complete, so it is the commit point
    OUT/final/
        HF checkpoint; written as OUT/final.tmp/ and renamed when complete

The state holds the weights, AdamW's two moments and step, and the RNG, as tensors only, so nothing
is pickled: DCP's own reader (FileSystemReader) unpickles a `.metadata` file;
HuggingFaceStorageReader reads the safetensors headers instead. Each rank writes its own shards
(FSDP2's DTensors; a replicated tensor once), and DCP reshards on load, so a state saved on N ranks
resumes on M. Writes are asynchronous: the state is copied to host memory, then written by a thread
while training goes on; at most one write is in flight.
"""

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.tensor import DTensor

import data
from data import InputError

LAYOUT = (
    "dcp-safetensors-1"  # what latest.json's "layout" names; any other state is an older layout
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
    """OUT/state/latest.json, checked: one line when it is unreadable or of an older layout."""
    path = Path(out) / "state" / "latest.json"
    try:
        latest = json.loads(path.read_text())
        if not isinstance(latest, dict) or not isinstance(latest.get("config"), dict):
            raise TypeError("no config object")
    except (OSError, ValueError, TypeError) as e:
        raise InputError(
            f"{path}: unreadable ({e}); expected the latest.json of a run's state"
        ) from None
    if latest.get("layout") != LAYOUT:
        raise InputError(
            f"{path}: an older state layout "
            f"({latest.get('layout') or 'a safetensors file per rank'})"
            f", expected {LAYOUT}: resume it with the train.py that wrote it, or start again"
        )
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
        latest = {
            "layout": LAYOUT,
            "step": step,
            "checkpoint": name,
            "ranks": ranks,
            "config": config,
            "dynamics": {str(k): v for k, v in dynamics.items()},
        }
        self.pending = future, latest
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


def load_state(out, model, optimizer):
    """Restore the state latest.json names (its settings already checked) into the model and
    optimizer, on any number of ranks; returns (step, dynamics). An unreadable state is one line
    naming its folder."""
    latest = read_latest(out)
    path = Path(out) / "state" / "latest.json"
    try:
        step, folder = int(latest["step"]), Path(out) / "state" / str(latest["checkpoint"])
        dynamics = {
            int(k): {str(i): float(x) for i, x in v.items()} for k, v in latest["dynamics"].items()
        }
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise InputError(
            f"{path}: unreadable ({e}); expected the latest.json of a run's state"
        ) from None
    tensors = state_tensors(model, optimizer)
    warnings.filterwarnings("ignore", "torch.distributed is disabled")
    try:
        if not any(folder.glob("*.safetensors")):
            raise FileNotFoundError("no safetensors file")
        reader = dcp.HuggingFaceStorageReader(str(folder))  # safetensors headers, no pickle
        dcp.load(tensors, storage_reader=reader, no_dist=not dist.is_initialized())
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
    return step, dynamics


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
