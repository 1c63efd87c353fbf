"""The loss training assembles equals the paper's whole-batch formula, over micro-batches and ranks.

train.forward_backward cuts a global batch into this rank's packed micro-batches
(sftmix.micro_batches), applies the LM head in chunks (sftmix.head_losses) and accumulates
gradients; here the gradient it leaves is compared, in float64, with the gradient of

    L = (1 / n_tokens) sum_x sum_t -log p(y_t | x, y_<t)  +  mu (1 / n_mixed) sum_pairs sum_{k < n} CE(W Z~_k, Y~_k)

written out for the whole batch one example and one position at a time, each example run through the
model alone. A deliberate mistake in the layout (lambda reversed within a pair, n_mixed off by one)
must fail.
"""

import os
import random
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import MICRO, step_values

import data
import model as M
import sftmix
import train as T

V, MU = 37, 0.2
ARGS = M.ModelArgs(**MICRO, vocab_size=V, tie_word_embeddings=False)


def make_batch():
    """8 examples of unequal lengths (prompt spans, one or two response spans) as 4 pairs, and their
    model.
    """
    rng = random.Random(0)
    samples = []
    for i in range(8):
        length = rng.randint(5, 17)
        ids = [rng.randrange(V) for _ in range(length + 1)]
        trained = [False] * length
        start = rng.randint(1, length - 2)
        for t in range(start, min(length, start + rng.randint(1, 9))):
            trained[t] = True
        if i % 3 == 0 and start > 3:
            trained[1] = True  # a second, earlier assistant turn
        samples.append(
            data.Sample(
                f"ex{i}",
                ids[:-1],
                [ids[t + 1] if trained[t] else data.IGNORE for t in range(length)],
            )
        )
    torch.manual_seed(0)
    model = M.Transformer(ARGS).double()
    return samples, model


def whole_batch_loss(model, samples, batch, lam, mu, ntp_weight=1.0):
    """The paper's L for one global batch, position by position, each example through the model
    alone.
    """
    P = len(batch) // 2
    W = model.lm_head.weight
    states, nll = {}, []
    for i in batch:
        s = samples[i]
        hidden = model(torch.tensor([s.input_ids]), head=lambda h, w, softcap: h)  # (1, T, D)
        logits = model.lm_head(hidden)  # (1, T, V)
        positions = [t for t, y in enumerate(s.labels) if y != data.IGNORE]
        states[i] = [(hidden[0, t], s.labels[t]) for t in positions]
        nll += [-torch.log_softmax(logits[0, t], dim=-1)[s.labels[t]] for t in positions]
    mixed = []
    for p in range(P):
        c, u = states[batch[p]], states[batch[P + p]]
        # the first n = min(n_c, n_u) response positions, aligned
        for (z_c, y_c), (z_u, y_u) in zip(c, u):
            z = lam[p] * z_c + (1 - lam[p]) * z_u
            y = lam[p] * F.one_hot(torch.tensor(y_c), V) + (1 - lam[p]) * F.one_hot(
                torch.tensor(y_u), V
            )
            mixed.append(-(y * torch.log_softmax(W @ z, dim=-1)).sum())
    return ntp_weight * torch.stack(nll).mean() + mu * torch.stack(mixed).mean()


def run_forward_backward(rank, world, port, mistake, mode, queue):
    """train.forward_backward on `world` gloo ranks; rank 0 puts the summed-over-ranks gradient in
    the queue.
    """
    torch.set_num_threads(1)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    samples, model = make_batch()
    batch = list(range(8))  # pairs (0, 4), (1, 5), (2, 6), (3, 7)
    if mistake:
        real = sftmix.micro_batches

        def wrong(*a, **k):
            micro, n_tokens, n_mixed = real(*a, **k)
            if mistake == "lambda reversed":
                for mb in micro:
                    mb.lam = 1 - mb.lam
            return micro, n_tokens, n_mixed + (mistake == "n_mixed off by one")

        sftmix.micro_batches = wrong
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    lam = None if mode == "ntp" else sftmix.sample_lambda(0.5, 4, 3, 5)
    T.forward_backward(
        wrapped,
        samples,
        batch,
        lam,
        **step_values(
            mu=MU, mixup_only=mode == "mixup only", grad_clip=0.0, rank=rank, world=world
        ),
    )
    if rank == 0:
        # no shared memory
        queue.put({n: p.grad.numpy().copy() for n, p in model.named_parameters()})
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def training_gradient(world, mistake=None, mode="sftmix"):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with socket.socket() as s:  # a free port for the ranks to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        ctx.Process(target=run_forward_backward, args=(r, world, port, mistake, mode, queue))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    grads = {n: torch.from_numpy(g) for n, g in queue.get(timeout=300).items()}
    # the gradient arrived, so every rank finished forward_backward; only teardown is left
    for p in procs:
        p.join(timeout=60)
        if p.is_alive():
            p.terminate()
    return grads


def reference_gradient(mode="sftmix"):
    samples, model = make_batch()
    lam = sftmix.sample_lambda(0.5, 4, 3, 5).double()
    mu, ntp_weight = {"sftmix": (MU, 1.0), "ntp": (0.0, 1.0), "mixup only": (1.0, 0.0)}[mode]
    loss = whole_batch_loss(model, samples, list(range(8)), lam, mu, ntp_weight)
    loss.backward()
    return {n: p.grad for n, p in model.named_parameters()}


def relative_error(a, b):
    return max(((a[n] - b[n]).norm() / b[n].norm()).item() for n in b if b[n].norm() > 0)


@pytest.fixture(scope="module")
def reference():
    return reference_gradient()


@pytest.mark.parametrize("world", [1, 2])
def test_accumulated_gradient_equals_the_whole_batch_formula(world, reference):
    """4 pairs in micro-batches of 1 pair: 4 micro-batches on one rank, 2 a rank on two (DDP);
    packed rows, chunk-free head: rel <= 1e-6 in float64"""
    assert relative_error(training_gradient(world), reference) <= 1e-6


@pytest.mark.parametrize("mistake", ["lambda reversed", "n_mixed off by one"])
def test_a_deliberate_layout_mistake_breaks_the_equality(mistake, reference):
    assert relative_error(training_gradient(1, mistake), reference) > 1e-3


@pytest.mark.parametrize("mode", ["ntp", "mixup only"])
def test_plain_ntp_and_mixup_only_give_the_gradient_of_their_term_alone(mode):
    assert relative_error(training_gradient(2, mode=mode), reference_gradient(mode)) <= 1e-6


def test_warm_up_step_k_runs_at_lr_times_k_plus_1_over_w_then_cosine_to_zero():
    """documented difference from HF's schedule (step 1 at lr 0): W = ceil(0.25 * 10) = 3 warm-up
    steps
    """
    lrs = [T.lr_at(k, 10, lr=0.3, warmup_ratio=0.25) for k in range(10)]
    import math

    expected = [0.1, 0.2, 0.3] + [0.3 * 0.5 * (1 + math.cos(math.pi * j / 7)) for j in range(7)]
    assert lrs == pytest.approx(expected)


def test_the_pad_tokens_embedding_row_is_trained_unlike_transformers_padding_idx():
    """documented difference: HF's Llama embedding has padding_idx = pad_token_id (that row never
    gets a gradient); ours has none, so the pad token (SmolLM2: <|im_end|>, also the end-of-turn
    token) trains as an input too"""
    from transformers import LlamaConfig, LlamaForCausalLM

    pad = 3
    ids = torch.tensor([[5, pad, 7, 9]])
    cfg = LlamaConfig(**dict(MICRO, num_hidden_layers=1), vocab_size=V, pad_token_id=pad)
    hf = LlamaForCausalLM(cfg)
    hf(ids, labels=ids).loss.backward()
    assert hf.model.embed_tokens.weight.grad[pad].abs().sum() == 0
    ours = M.Transformer(ARGS)
    F.cross_entropy(ours(ids)[0, :-1], ids[0, 1:]).backward()
    assert ours.model.embed_tokens.weight.grad[pad].abs().sum() > 0
