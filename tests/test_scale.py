"""At the paper's scale it fits and runs at the device's speed, proven on the CPU.

- The micro-batch loop never waits for the device: every op that would synchronise host and device
  (an `.item()`, `nonzero`, a boolean-mask index, `repeat_interleave` without `output_size`) and
  every `.tolist()`, `.numpy()` or `.cpu()` is counted while train.train_step runs; the step reads
  the device once, at its end.
- A packed row is one attention call per layer, and `torch.compile` of a block has no graph break
  and compiles at most twice over rows of three lengths.
- SDPA never gets a mask together with `enable_gqa` (no fused kernel takes both), and no mask at all
  when rows are single sequences inside the sliding window.
- Under bf16 autocast the SFTMix gradient stays within bf16 tolerance of the float64 formula, and
  lambda reaches the logit mix unrounded.
- FSDP2: no unsharded gradient is held between micro-batches, the gradient equals the float64
  formula, and loading or resuming never allocates a full-size parameter on the compute device.
"""

import os
import socket
from functools import partial

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import MICRO, step_values
from test_loss import ARGS, make_batch, reference_gradient, relative_error
from torch.distributed.device_mesh import init_device_mesh
from torch.utils._python_dispatch import TorchDispatchMode

import data
import model as M
import sftmix
import train as T

aten = torch.ops.aten
SYNCING = {
    aten._local_scalar_dense,
    aten.nonzero,
    aten.masked_select,
    aten.is_nonzero,
    aten.equal,
    aten.unique_dim,
    aten._unique2,
}
INDEXING = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}


class SyncCounter(TorchDispatchMode):
    """Records every op that makes the host wait for the device's result (on CUDA a stream sync)."""

    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        op = func.overloadpacket
        if op in SYNCING:
            self.syncs.append(str(func))
        elif op in INDEXING and any(t is not None and t.dtype == torch.bool for t in args[1]):
            self.syncs.append(f"{func} with a boolean mask")
        elif (
            op is aten.repeat_interleave
            and torch.is_tensor(args[0])
            and kwargs.get("output_size") is None
            and (len(args) < 2 or torch.is_tensor(args[1]))
        ):
            self.syncs.append(f"{func} without output_size")
        return func(*args, **kwargs)

    def spy_reads(self, monkeypatch, host=()):
        """Also records `.tolist()`, `.numpy()` (which np.asarray calls) and `.cpu()`, which on the
        CPU dispatch no op, of every tensor but the `host` ones (laid out on the host by design).
        `.item()` is aten._local_scalar_dense, counted above."""
        for name in ("tolist", "numpy", "cpu"):
            real = getattr(torch.Tensor, name)

            def read(t, *a, _real=real, _name=name, **k):
                if not any(t is h for h in host):
                    self.syncs.append(f"Tensor.{_name} of {tuple(t.shape)}")
                return _real(t, *a, **k)

            monkeypatch.setattr(torch.Tensor, name, read)


@pytest.mark.parametrize("mode", ["ntp", "sftmix"])
def test_a_training_step_reads_the_device_once(mode, monkeypatch):
    """train.train_step: forward_backward over 4 micro-batches, the AdamW update and the divergence
    check wait for nothing; then the step reads the losses, grad norm and finiteness in one
    `.tolist()` of 5 numbers. lam is a host tensor (sftmix.micro_batches lays it out)."""
    samples, model = make_batch()
    model.float()
    lam = sftmix.sample_lambda(0.5, 4, 3, 5) if mode == "sftmix" else None
    optimizer = T.adamw(model, 1e-3, 0.1)
    counter = SyncCounter()
    counter.spy_reads(monkeypatch, host=[lam])
    with counter:
        T.train_step(
            model,
            model,
            optimizer,
            samples,
            0,
            list(range(8)),
            lam,
            lambda step: 1e-3,
            **step_values(),
        )
    assert counter.syncs == ["Tensor.tolist of (5,)"]


def test_the_sync_counter_sees_the_syncs_it_claims_to(monkeypatch):
    x, host = torch.randn(6), torch.arange(3.0)
    counter = SyncCounter()
    counter.spy_reads(monkeypatch, host=[host])
    with counter:
        x.sum().item()
        x[x > 0]
        x.nonzero()
        torch.repeat_interleave(torch.arange(3), torch.tensor([1, 2, 3]))
        torch.repeat_interleave(
            torch.arange(3), torch.tensor([1, 2, 3]), output_size=6
        )  # not a sync
        x.tolist(), x.numpy(), np.asarray(x), x.cpu()
        host.tolist()  # a host tensor: not counted
    assert len(counter.syncs) == 8
    assert counter.syncs[4:] == [f"Tensor.{f} of (6,)" for f in ("tolist", "numpy", "numpy", "cpu")]


def packed_inputs(lengths, args=ARGS):
    """A packed row of sequences of these lengths: x (1, T, D), cos, sin, and its layout
    (data.packing).
    """
    positions = torch.cat([torch.arange(n) for n in lengths])[None]  # (1, T)
    T_ = positions.shape[1]
    cos, sin = M.rope_cos_sin(args, positions, torch.float32)
    x = torch.randn(1, T_, args.hidden_size, generator=torch.Generator().manual_seed(T_))
    return x, cos, sin, data.packing(lengths)


def test_a_compiled_block_has_no_graph_break_and_compiles_at_most_twice():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    block = M.Block(ARGS, 0)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(
        block, fullgraph=True, backend=counter
    )  # fullgraph: a graph break is an error
    for lengths in (
        [5, 8],
        [7, 3, 11],
        [4, 4, 4, 9],
    ):  # three micro-batches of different packed lengths
        x, cos, sin, seqs = packed_inputs(lengths)
        ours = compiled(x.requires_grad_(), cos, sin, None, None, seqs)
        ours.sum().backward()
        torch.testing.assert_close(ours, block(x, cos, sin, None, None, seqs))
    assert counter.frame_count <= 2


def test_a_packed_row_is_one_attention_call_per_layer_that_equals_each_sequence_alone():
    """Both ways of attending a packed row, the padded sequences (seqs, what training runs) and the
    whole-row mask from positions (attention_mask), equal each sequence computed on its own, in one
    SDPA call per layer"""
    torch.manual_seed(0)
    model = M.Transformer(ARGS)
    calls = []
    real = F.scaled_dot_product_attention
    lengths = [5, 9, 3]
    ids = torch.randint(0, ARGS.vocab_size, (1, sum(lengths)))
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    alone = torch.cat([model(part)[0] for part in ids.split(lengths, dim=1)])
    for seqs in (data.packing(lengths), None):
        calls.clear()
        with pytest.MonkeyPatch.context() as mp_:
            mp_.setattr(
                F, "scaled_dot_product_attention", lambda *a, **k: calls.append(k) or real(*a, **k)
            )
            packed = model(ids, positions=positions, seqs=seqs)[0]
        assert len(calls) == ARGS.num_hidden_layers
        assert all(
            (k.get("attn_mask") is None) == (seqs is not None) for k in calls
        )  # padded: SDPA's causal mask
        torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_packing_lays_each_sequence_out_right_padded_and_back():
    """index (n, L) holds each sequence's row positions then 0s; inverse sends every row position
    back
    """
    index, inverse = data.packing([2, 4, 1])
    assert index.tolist() == [[0, 1, 0, 0], [2, 3, 4, 5], [6, 0, 0, 0]]
    assert inverse.tolist() == [0, 1, 4, 5, 6, 7, 8]
    row = torch.arange(7.0)
    assert torch.equal(row[index].flatten()[inverse], row)


def test_sdpa_gets_no_mask_inside_the_window_and_never_a_mask_with_enable_gqa():
    args = M.ModelArgs(**MICRO, model_type="mistral", vocab_size=37, sliding_window=16)
    torch.manual_seed(0)
    model = M.Transformer(args)
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*a, **k):
        calls.append((k.get("attn_mask") is not None, k.get("enable_gqa", False)))
        return real(*a, **k)

    with pytest.MonkeyPatch.context() as mp_:
        mp_.setattr(F, "scaled_dot_product_attention", spy)
        model(torch.randint(0, 37, (2, 12)))  # rows of one sequence each, shorter than the window
        assert calls and not any(mask for mask, _ in calls)
        model(torch.randint(0, 37, (2, 24)))  # longer than the window: the band
        model(
            torch.randint(0, 37, (1, 20)),
            positions=torch.cat([torch.arange(8), torch.arange(12)])[None],
        )
        model(
            torch.randint(0, 37, (1, 30)),
            positions=torch.cat([torch.arange(20), torch.arange(10)])[None],
            seqs=data.packing([20, 10]),
        )  # padded sequences longer than the window: the band
    assert any(mask for mask, _ in calls)
    assert not any(mask and gqa for mask, gqa in calls)


def test_bf16_autocast_sftmix_gradient_is_within_bf16_tolerance_of_the_float64_formula():
    samples, model = make_batch()
    model.float()
    lam = sftmix.sample_lambda(0.5, 4, 3, 5)
    T.forward_backward(
        model,
        samples,
        list(range(8)),
        lam,
        **step_values(grad_clip=0.0, amp_dtype=torch.bfloat16),
    )
    ours = {n: p.grad.double() for n, p in model.named_parameters()}
    assert relative_error(ours, reference_gradient()) <= 3e-2  # bf16 keeps 8 bits: ~4e-3 a rounding


def test_lambda_reaches_the_logit_mix_unrounded_under_bf16_autocast():
    """lam = 0.3 is 0.30078 in bf16: the mix must use 0.3 (fp32), on logits upcast to fp32 first"""
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(2, 16, generator=g), torch.randn(50, 16, generator=g)
    y = torch.tensor([3, 7])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, mix = sftmix.head_losses(
            h,
            W,
            y,
            torch.tensor([0]),
            torch.tensor([1]),
            torch.tensor([0.3]),
            torch.tensor([], dtype=torch.long),
        )
        z = (h @ W.T).double()  # the bf16 logits autocast gives, exactly, in float64
    logp = torch.log_softmax(0.3 * z[0] + 0.7 * z[1], dim=0)
    expected = -(0.3 * logp[3] + 0.7 * logp[7])
    assert abs(mix[0].item() - expected.item()) <= 1e-5 * abs(expected.item())
    rounded = torch.log_softmax(0.30078125 * z[0] + 0.69921875 * z[1], dim=0)
    assert abs(mix[0].item() + (0.30078125 * rounded[3] + 0.69921875 * rounded[7]).item()) > 1e-5


class FullSizeAllocations(TorchDispatchMode):
    """Records each new floating-point tensor (not a view of an input) that has the full shape of a
    sharded parameter."""

    def __init__(self, full_shapes):
        super().__init__()
        self.full_shapes, self.seen = full_shapes, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {storage(t) for t in torch.utils._pytree.tree_leaves((args, kwargs))}
        for t in torch.utils._pytree.tree_leaves(out):
            if (
                torch.is_tensor(t)
                and t.is_floating_point()
                and tuple(t.shape) in self.full_shapes
                and storage(t) not in inputs
            ):  # (DCP's resharding makes integer index ranges of that size)
                self.seen.append((str(func), tuple(t.shape)))
        return out


def storage(t):
    """Where a tensor's memory starts (None for what has none: not a tensor, meta, a wrapper
    subclass).
    """
    try:
        return (
            t.untyped_storage().data_ptr()
            if torch.is_tensor(t) and t.device.type != "meta"
            else None
        )
    except RuntimeError:
        return None


def _outside_modes(fn, *args, **kwargs):
    with torch.utils._python_dispatch._disable_current_modes():
        return fn(*args, **kwargs)


def fsdp_rank(rank, world, port, checkpoint, state_dir, queue):
    """On each gloo rank: load the checkpoint sharded by FSDP2, run forward_backward over 4
    micro-batches, checking after each backward that no unsharded gradient is held; save and resume
    the state."""
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from torch.distributed.fsdp import FSDPModule

    with torch.device("meta"):
        full = {n: tuple(p.shape) for n, p in M.Transformer(ARGS).named_parameters()}
    prepare = partial(
        T.prepare_model,
        lora=(0, 0, ()),
        activation_checkpointing=False,
        compile=False,
        mesh=init_device_mesh("cpu", (world,)),
        bf16=False,
    )
    # to_empty gives each rank memory for its own shards (FSDP2 made them on meta); it swaps
    # parameters, which fails under a dispatch mode, so it runs outside the count. On one rank a
    # shard is the whole parameter: loading and resuming still make no second full-size copy
    to_empty = torch.nn.Module.to_empty
    torch.nn.Module.to_empty = lambda self, **k: _outside_modes(to_empty, self, **k)
    with FullSizeAllocations(set(full.values())) as allocations:
        model = M.load_pretrained(checkpoint, dtype=torch.float64, prepare=prepare)
    torch.nn.Module.to_empty = to_empty
    units = [m for m in model.modules() if isinstance(m, FSDPModule)]
    held = []

    def check_after(*a, **k):
        real_backward(*a, **k)
        for unit in units:
            group = unit._get_fsdp_state()._fsdp_param_group
            for p in group.fsdp_params if group else []:
                unsharded = getattr(p, "_unsharded_param", None)
                held.append(
                    p.unsharded_accumulated_grad is not None
                    or (unsharded is not None and unsharded.grad is not None)
                )

    real_backward = torch.autograd.backward
    torch.autograd.backward = check_after
    samples, _ = make_batch()
    T.forward_backward(
        model,
        samples,
        list(range(8)),
        None,
        **step_values(micro_batch=2 if world == 1 else 1, grad_clip=0.0, rank=rank, world=world),
    )
    torch.autograd.backward = real_backward
    grads = {n: p.grad.full_tensor().numpy().copy() for n, p in model.named_parameters()}
    optimizer = T.adamw(model, 1e-3, 0.1)
    optimizer.step()
    saver = T.Saver(state_dir, rank)
    saver.save(model, optimizer, 1, {}, {"x": 1})
    saver.wait()
    again = M.load_pretrained(checkpoint, dtype=torch.float64, prepare=prepare)
    optimizer = T.adamw(again, 1e-3, 0.1)
    with FullSizeAllocations(set(full.values())) as resumed:
        T.load_state(state_dir, T.read_latest(state_dir), again, optimizer)
    same = all(
        torch.equal(p.full_tensor(), q.full_tensor())
        for p, q in zip(model.parameters(), again.parameters())
    )
    if rank == 0:
        queue.put(
            (
                grads,
                len({id(u._get_fsdp_state()) for u in units}),
                sum(held),
                len(held),
                allocations.seen + resumed.seen,
                same,
            )
        )
    dist.barrier()
    dist.destroy_process_group()


def spawn_ranks(target, world, *args, replies):
    """Run target(rank, world, port, *args, queue) on `world` spawned gloo processes and return the
    first `replies` values they put on the queue."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=target, args=(r, world, port, *args, queue)) for r in range(world)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in range(replies)]
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.terminate()
    return results


@pytest.mark.parametrize("world", [1, 2])
def test_fsdp_holds_no_unsharded_gradient_and_loads_no_full_parameter(world, tmp_path):
    samples, model = make_batch()
    M.save_pretrained(model, tmp_path / "ckpt")
    [(grads, n_units, held, checked, allocations, same)] = spawn_ranks(
        fsdp_rank, world, tmp_path / "ckpt", tmp_path / "run", replies=1
    )
    assert (
        n_units == ARGS.num_hidden_layers + 3
    )  # each block, the embedding, [norm + LM head], the root
    assert checked > 0 and held == 0
    assert allocations == [], str(allocations)
    assert same  # the resumed weights are the saved ones
    grads = {n: torch.from_numpy(g) for n, g in grads.items()}
    assert relative_error(grads, reference_gradient("ntp")) <= 1e-6


def tokenizing_rank(rank, world, port, path, tokenizer_dir, cache, queue):
    """On each gloo rank: data.cached_dataset with local rank 0 tokenizing, counting the calls of
    data.load_dataset; puts (rank, calls, samples as lists, stats, error line)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    calls, real = [], data.load_dataset
    data.load_dataset = lambda *a, **k: calls.append(a[0]) or real(*a, **k)

    def barrier(failed):
        flag = torch.tensor([float(failed)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag)

    try:
        samples, stats = data.cached_dataset(
            path, data.load_tokenizer(tokenizer_dir), None, 64, None, cache, rank == 0, barrier
        )
        queue.put(
            (
                rank,
                len(calls),
                [(s.id, s.input_ids.tolist(), s.labels.tolist()) for s in samples],
                stats["samples"],
                type(samples[0].input_ids).__name__,
                None,
            )
        )
    except data.InputError as e:
        queue.put((rank, len(calls), None, None, None, str(e)))
    dist.destroy_process_group()


def ranks_tokenizing(path, tokenizer_dir, cache, world=3):
    return sorted(spawn_ranks(tokenizing_rank, world, path, tokenizer_dir, cache, replies=world))


def test_one_rank_tokenizes_and_the_others_memory_map_its_arrays(
    tiny_model_dir, chat_data, tmp_path
):
    """3 gloo ranks of one node: rank 0 reads and tokenizes (load_dataset once), ranks 1 and 2 never
    do and get the same samples, memory-mapped int32 arrays equal to load_dataset's lists; a second
    start reads the cache (no rank tokenizes); a file rank 0 cannot read is one line on rank 0, and
    the others stop too"""
    expected = [
        (s.id, s.input_ids, s.labels)
        for s in data.load_dataset(
            chat_data, data.load_tokenizer(tiny_model_dir), max_len=64, verbose=False
        )[0]
    ]
    results = ranks_tokenizing(chat_data, tiny_model_dir, tmp_path / "cache")
    assert [(r, calls) for r, calls, *_ in results] == [(0, 1), (1, 0), (2, 0)]
    assert all(
        samples == expected and n == 40 and kind == "memmap"
        for _, _, samples, n, kind, _ in results
    )
    again = ranks_tokenizing(chat_data, tiny_model_dir, tmp_path / "cache")
    assert [calls for _, calls, *_ in again] == [0, 0, 0] and again[1][2] == expected
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "Hi"},\n')
    errors = [e for *_, e in ranks_tokenizing(bad, tiny_model_dir, tmp_path / "cache")]
    assert (
        errors[0].startswith(f"{bad}:1: invalid JSON")
        and errors[1:] == [f"{bad}: another rank could not read it (its line says why)"] * 2
    )
