"""SFTMix, the method: training dynamics -> confidence split -> Mixup between confident and
unconfident data.

Each step of the paper is one function here, named after the paper's terms, with its equation:
  response_nll / perplexity   Perp_c(y|x) = exp(-(1/|y|) sum_t log p_c(y_t | x, y_<t))
  confidence, variability     Conf(x, y) = -(1/C) sum_c Perp_c(y|x), and the population std of the same values
  split_by_confidence         D^c = top half by confidence, D^u = bottom half (random_split: the control)
  paired_batches              every batch: G/2 from D^c, G/2 from D^u, pair i = (i-th confident, i-th unconfident)
  sample_lambda               lam ~ Beta(alpha, alpha), one per pair, drawn from (seed, step)
  mixup_loss                  L_Mixup = CE(softmax(W Z~), Y~),  Z~ = lam Z^c + (1-lam) Z^u,  Y~ = lam Y^c + (1-lam) Y^u
  micro_batches, head_losses  L = L_NTP + mu L_Mixup over a global batch, each term token-weighted over it:
                                L_NTP   = sum of NTP NLL over trained tokens   / number of trained tokens
                                L_Mixup = sum of Mixup CE over mixed positions / number of mixed positions
Training calls head_losses, the logit form of mixup_loss: W is linear with no bias, so W Z~ = lam W
Z^c + (1 - lam) W Z^u, and the mixed logits come from the logits NTP computes anyway (no second
LM-head matmul). mixup_loss, the hidden-state form, is the paper's equation as written; tests check
that both agree. The training loop that puts them together is train.py; `python sftmix.py split` is
stage 2 as a command.
"""

import argparse
import json
import math
import random
import sys
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint
from tqdm import tqdm

from data import (
    IGNORE,
    Help,
    InputError,
    add_number,
    check_output,
    json_field,
    length_grouped_batches,
    pack,
    read_json,
    reported,
    shard,
    to_device,
    write_json,
)

# ----------------------------------------------------------------------- stage 1: training dynamics


@torch.no_grad()
def response_nll(model, samples, batch_size, device, amp_dtype=None, desc="dynamics"):
    """Summed response-token NLL and response length of every sample, over all ranks.

    nll(x, y) = -sum_t log p(y_t | x, y_<t) over the trained (label != IGNORE) positions; |y| their
    count. Forward only, in length-grouped batches packed into one row each (no padding), the
    batches sharded over ranks, the LM head applied in chunks (head_losses). amp_dtype (e.g.
    torch.bfloat16) runs the forward under autocast. Returns {id: (nll, n_tokens)} with every
    sample's id exactly once, on every rank."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    batches = length_grouped_batches([len(s.input_ids) for s in samples], batch_size)
    mine = shard(batches, rank, world)
    # every rank runs as many forwards: FSDP gathers weights collectively
    rounds = -(-len(batches) // world)
    # (samples, summed NLL of each on the device), read back once at the end: no sync per batch
    per_batch = []
    for r in tqdm(range(rounds), desc=desc, disable=rank != 0, leave=False):
        batch = [samples[i] for i in (mine[r] if r < len(mine) else batches[0])]
        b = to_device(pack(batch), device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            nll = model(
                b["input_ids"],
                seqs=b["seqs"],
                logits_at=b["trained"],
                head=partial(head_losses, targets=b["targets"]),
            )[0]  # (N,)
        if r < len(mine):  # else a filler forward on a rank with one batch fewer: nothing to record
            # (n,)
            per_batch.append((batch, nll.new_zeros(len(batch)).index_add_(0, b["sample"], nll)))
    result = {}
    for batch, sample_nll in per_batch:
        for s, s_nll in zip(batch, sample_nll.tolist()):
            result[s.id] = (s_nll, int((np.asarray(s.labels) != IGNORE).sum()))
    model.train(was_training)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, result)
        result = {k: v for part in parts for k, v in part.items()}
    return result


def perplexity(nll, n_tokens):
    """Perp(y|x) = exp(nll / |y|); inf when that overflows a float (a mean NLL above ~709.8 nats)."""
    return math.exp(nll / n_tokens) if nll / n_tokens < 709.78 else math.inf


def token_weighted(results, ids):
    """Over examples ids, with results {id: (nll, |y|)}: NLL per token = sum_i nll_i / sum_i |y_i|,
    and PPL = exp(NLL per token), the held-out perplexity of train.py and eval.py (not a mean of
    per-example PPLs)."""
    nll, n = sum(results[i][0] for i in ids), sum(results[i][1] for i in ids)
    return {"examples": len(ids), "tokens": n, "nll_per_token": nll / n, "ppl": perplexity(nll, n)}


def confidence(perplexities):
    """Conf(x, y) = -(1/C) sum_c Perp_c(y|x): (N, C) perplexities at C checkpoints -> (N,)."""
    return -np.asarray(perplexities, dtype=np.float64).mean(axis=1)


def variability(perplexities):
    """Population std over the C checkpoints of the same perplexities: (N, C) -> (N,). The data
    map's y-axis."""
    return np.asarray(perplexities, dtype=np.float64).std(axis=1)


# ------------------------------------------------------------------------ stage 2: confidence split


def split_by_confidence(ids, confidence):
    """Split at the median confidence: (confident_ids, unconfident_ids).

    Sort by confidence, highest first, ties broken by id (so the split is deterministic); the first
    floor(N/2) are D^c, the rest D^u. With odd N the median example goes to D^u, which is one
    larger."""
    order = sorted(range(len(ids)), key=lambda i: (-float(confidence[i]), ids[i]))
    half = len(ids) // 2
    return [ids[i] for i in order[:half]], [ids[i] for i in order[half:]]


def random_split(ids, seed):
    """The control for the confidence split: halves of the same sizes as split_by_confidence's,
    drawn at random."""
    order = sorted(ids)
    random.Random(seed).shuffle(order)
    half = len(ids) // 2
    return order[:half], order[half:]


def read_dynamics(path):
    """dynamics.jsonl -> (ids, perplexities (N, C)); each line {"id": a string or an integer,
    "perplexities": [C finite numbers > 0], ...}, C the same on every line."""
    ids, perps, seen, first = [], [], {}, None
    try:
        lines = open(path, encoding="utf-8").read().split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            sample_id, values = record["id"], record["perplexities"]
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise InputError(
                f'{path}:{lineno}: expected {{"id": ..., "perplexities": [numbers]}} ({e})'
            ) from None
        if (
            not isinstance(values, list)
            or not values
            # finite as a float too: a 400-digit integer is not
            or not all(type(v) in (int, float) and 0 < v <= sys.float_info.max for v in values)
        ):
            raise InputError(
                f'{path}:{lineno}: "perplexities": expected a list of finite numbers > 0, got '
                f"{json.dumps(values)[:80]}"
            )
        if type(sample_id) not in (str, int):
            raise InputError(
                f'{path}:{lineno}: "id": expected a string or an integer, got '
                f"{json.dumps(sample_id)[:60]}"
            )
        first = first or (lineno, len(values))
        if len(values) != first[1]:
            raise InputError(
                f'{path}:{lineno}: "perplexities": expected as many as on line {first[0]} '
                f"({first[1]}), got {len(values)}"
            )
        if str(sample_id) in seen:
            raise InputError(
                f'{path}:{lineno}: "id": {json.dumps(sample_id)} already on line {seen[str(sample_id)]}'
            )
        seen[str(sample_id)] = lineno
        ids.append(str(sample_id))
        perps.append([float(v) for v in values])
    if not ids:
        raise InputError(f'{path}: expected one or more lines {{"id", "perplexities"}}, got none')
    return ids, np.asarray(perps)


def read_split(path):
    """split.json -> {"confident": [ids], "unconfident": [ids]}, ids as strings."""
    split = read_json(path)
    return {
        half: [str(i) for i in json_field(split, half, path, _ids, "a list of example ids")]
        for half in ("confident", "unconfident")
    }


def _ids(v):
    return isinstance(v, list) and all(type(i) in (str, int) for i in v)


# -------------------------------------------------------------------------- stage 3: Mixup training


def paired_batches(confident, unconfident, batch_size, seed, epoch):
    """One epoch of batches, each `batch_size // 2` confident followed by as many unconfident
    examples.

    D^c and D^u are shuffled separately from (seed, epoch) and zipped, so pair i is (confident[i],
    unconfident[i]) at random. Each example appears at most once per epoch. Leftovers are dropped
    for this epoch (a different few each epoch): the extra example(s) of the larger half, and the
    pairs that do not fill a last whole batch."""
    assert batch_size % 2 == 0, "an SFTMix batch holds pairs: batch_size must be even"
    rng = random.Random(f"{seed}-{epoch}")
    c, u = list(confident), list(unconfident)
    rng.shuffle(c)
    rng.shuffle(u)
    P = batch_size // 2
    n_batches = min(len(c), len(u)) // P
    return [c[b * P : (b + 1) * P] + u[b * P : (b + 1) * P] for b in range(n_batches)]


def sample_lambda(alpha, n_pairs, seed, step):
    """lam ~ Beta(alpha, alpha), one per pair, drawn from (seed, step): the same on every rank and
    on resume."""
    return torch.from_numpy(
        np.random.default_rng([seed, step]).beta(alpha, alpha, size=n_pairs)
    ).float()


def mixup_loss(hidden_c, labels_c, hidden_u, labels_u, lam, lm_head_weight, reduction="mean"):
    """Mixup cross-entropy of interpolated last-layer hidden states, the paper's equation position
    by position.

        Z~ = lam Z^c + (1 - lam) Z^u,   Y~ = lam Y^c + (1 - lam) Y^u   (Y: one-hot next tokens, so Y~ is soft)
        L_Mixup = CE(softmax(W Z~), Y~) = -sum_v Y~_v log softmax(W Z~)_v

    hidden_* (P, T, D) final-norm hidden states of P pairs; labels_* (P, T) next-token targets
    (IGNORE where nothing is trained); lam (P,); lm_head_weight W (V, D). Pair p mixes the k-th
    response position of its confident example with the k-th of its unconfident one, k < n =
    min(n^c, n^u): the longer one's tail is not mixed. "mean" averages over all mixed positions,
    "sum" sums them. Training computes the same with head_losses, from the logits (faster); tests
    check that both agree."""
    V = lm_head_weight.shape[0]
    losses = []
    for p in range(len(lam)):
        at_c = (labels_c[p] != IGNORE).nonzero()[:, 0]  # the confident example's response positions
        at_u = (labels_u[p] != IGNORE).nonzero()[:, 0]  # the unconfident example's
        n = min(len(at_c), len(at_u))
        at_c, at_u, l = at_c[:n], at_u[:n], lam[p].to(hidden_c.dtype)
        z = l * hidden_c[p, at_c] + (1 - l) * hidden_u[p, at_u]  # (n, D)  Z~
        logp = torch.log_softmax(
            (z @ lm_head_weight.T).to(torch.promote_types(z.dtype, torch.float32)), dim=-1
        )
        # (n, V)  Y~
        y = l * F.one_hot(labels_c[p, at_c], V) + (1 - l) * F.one_hot(labels_u[p, at_u], V)
        losses.append(-(y.to(logp.dtype) * logp).sum(-1))  # (n,) the CE at each mixed position
    nll = torch.cat(losses)
    return nll.sum() if reduction == "sum" else nll.sum() / max(nll.numel(), 1)


@dataclass
class MicroBatch:
    """One forward pass of training: the examples it packs, and where its Mixup pairs sit (host
    tensors).

    Its N trained positions are numbered 0..N-1 in row order (rows one after another, each row's
    trained positions left to right), which is the order in which the model returns states with
    `logits_at`.
        rows    sample indices; with pairs: the p confident examples, then their p partners in the same order
        mix_c   (M,) the number of each mixed position's confident token among the N
        mix_u   (M,) the number of the aligned unconfident token (the k-th response token of each, k < n)
        lam     (M,) the pair's lambda at each mixed position (fp32)
        rest    (N - 2M,) the positions trained by NTP alone (a longer partner's tail; every position in NTP)
    Plain NTP has no pairs: mix_c, mix_u and lam are empty."""

    rows: list
    mix_c: torch.Tensor
    mix_u: torch.Tensor
    lam: torch.Tensor
    rest: torch.Tensor


def snake_rank(k, world):
    """The rank that gets the k-th unit dealt in snake order: 0, 1, .., W-1, then W-1, .., 1, 0,
    then 0, 1, .."""
    lap, place = divmod(k, world)
    return place if lap % 2 == 0 else world - 1 - place


def micro_batches(batch, samples, rank, world, micro_batch, lam=None):
    """This rank's micro-batches of one global batch, and the normalisers of the whole global batch.

    batch: G sample indices. With lam (P = G/2 lambdas) the batch holds pairs, as paired_batches
    lays them out: pair i is (batch[i], batch[P + i]) with lambda lam[i]; without it, G single
    examples (plain NTP). A unit (one example, or a pair kept together) goes to one rank: units are
    dealt longest first in snake order (snake_rank), so every rank gets as many units (FSDP gathers
    weights in every forward, on all ranks alike) and a similar number of tokens; each rank cuts its
    units into micro-batches of `micro_batch` examples. Everything is computed here, on the host, so
    training needs no device-to-host read to find its positions. Returns (micro-batches, n_tokens,
    n_mixed), the global normalisers:
        n_tokens = sum over the G examples of |y|            (trained tokens)
        n_mixed  = sum over the P pairs of min(|y^c|, |y^u|)  (mixed positions; 0 without pairs)"""
    # trained tokens per example
    n = {i: int((np.asarray(samples[i].labels) != IGNORE).sum()) for i in batch}
    P = len(batch) // 2
    lam = None if lam is None else lam.tolist()  # a host tensor: plain numbers for the layout
    if lam is not None:  # (pair index, its two sample indices)
        units = [(i, (batch[i], batch[P + i])) for i in range(P)]
    else:  # (example index, its sample index)
        units = [(i, (j,)) for i, j in enumerate(batch)]
    units.sort(key=lambda u: (-sum(len(samples[j].input_ids) for j in u[1]), u[0]))  # longest first
    mine = [u for k, u in enumerate(units) if snake_rank(k, world) == rank]
    per_micro = micro_batch // len(units[0][1])
    result = []
    for first in range(0, len(mine), per_micro):
        group = mine[first : first + per_micro]
        # confident rows, then their partners
        rows = [u[1][k] for k in range(len(group[0][1])) for u in group]
        offset = np.cumsum([0] + [n[i] for i in rows])  # first trained position of each row
        mix_c, mix_u, lam_pos = [], [], []
        for j, (pair, members) in enumerate(group if lam is not None else []):
            m = min(n[members[0]], n[members[1]])
            mix_c += range(offset[j], offset[j] + m)
            mix_u += range(offset[len(group) + j], offset[len(group) + j] + m)
            lam_pos += [lam[pair]] * m
        rest = sorted(set(range(offset[-1])) - set(mix_c) - set(mix_u))
        result.append(
            MicroBatch(
                rows,
                *(torch.tensor(x, dtype=torch.long) for x in (mix_c, mix_u)),
                torch.tensor(lam_pos, dtype=torch.float32),
                torch.tensor(rest, dtype=torch.long),
            )
        )
    n_mixed = sum(min(n[batch[i]], n[batch[P + i]]) for i in range(P)) if lam is not None else 0
    return result, sum(n.values()), n_mixed


CHUNK = 1024  # positions per LM-head chunk by default: (CHUNK, V) fp32 logits at a time, whatever N


def head_losses(
    hidden, weight, targets, mix_c=None, mix_u=None, lam=None, rest=None, softcap=None, chunk=CHUNK
):
    """NTP NLL at each of N positions (N,), and the Mixup CE at each of M mixed positions (M,), from
    final states.

    hidden (N, D) final-norm states, targets (N,) next tokens, weight W (V, D) the LM head; mix_c,
    mix_u, lam, rest as in MicroBatch (None: no pairs, every position is NTP's alone). Logits z = W
    h, capped as c tanh(z / c) when the model soft-caps (Gemma 2).
        nll_t   = -log softmax(cap(z_t))[y_t]
        mix_k   = -[lam log softmax(cap(z~))[y^c] + (1 - lam) log softmax(cap(z~))[y^u]],  z~ = lam z^c + (1 - lam) z^u
    This is mixup_loss's CE of W Z~: W is linear with no bias, so W (lam Z^c + (1 - lam) Z^u) = lam
    z^c + (1 - lam) z^u, and the logits NTP needs anyway give the mixed ones (no second LM-head
    matmul; a cap is applied after mixing, as it would be to W Z~). Logits are mixed in fp32 with
    lam in fp32, whatever the autocast dtype. The head runs on `chunk` positions at a time, each
    chunk recomputed in backward when N > chunk, so no (N, V) tensor is ever held: a mixed pair's
    positions share one chunk, the other positions follow. Every index comes from the host: nothing
    here waits for the device."""
    N = len(targets)
    if mix_c is None:  # no pairs: every position is NTP's alone
        mix_c = mix_u = torch.zeros(0, dtype=torch.long, device=hidden.device)
        lam, rest = hidden.new_zeros(0, dtype=torch.float32), torch.arange(N, device=hidden.device)
    half = chunk // 2  # pairs per chunk: their confident and unconfident positions together
    parts = [
        (mix_c[k : k + half], mix_u[k : k + half], lam[k : k + half])
        for k in range(0, len(mix_c), half)
    ]
    parts += [(rest[k : k + chunk], None, None) for k in range(0, len(rest), chunk)]
    recompute = N > chunk and torch.is_grad_enabled()  # one chunk's logits are held whole anyway
    # losses in at least fp32, also under bf16 autocast
    dtype = torch.promote_types(hidden.dtype, torch.float32)
    nll, mix = hidden.new_zeros(N, dtype=dtype), []
    for idx_c, idx_u, lam_k in parts:
        idx = idx_c if idx_u is None else torch.cat([idx_c, idx_u])
        args = (hidden.index_select(0, idx), weight, targets.index_select(0, idx), lam_k, softcap)
        nll_k, mix_k = (
            torch.utils.checkpoint.checkpoint(_head_chunk, *args, use_reentrant=False)
            if recompute
            else _head_chunk(*args)
        )
        nll = nll.index_add(0, idx, nll_k)
        mix.append(mix_k)
    return nll, torch.cat(mix) if mix else hidden.new_zeros(0, dtype=dtype)


def _head_chunk(h, weight, y, lam, softcap):
    """head_losses on one chunk: h (n, D), y (n,); with lam (m,), rows [0, m) are confident, [m, 2m)
    their partners."""

    def logp(z):  # log softmax of capped logits
        return torch.log_softmax(
            z if softcap is None else softcap * torch.tanh(z / softcap), dim=-1
        )

    z = (h @ weight.T).to(torch.promote_types(h.dtype, torch.float32))  # (n, V) in at least fp32
    nll = -logp(z).gather(1, y[:, None])[:, 0]  # (n,)
    if lam is None:
        return nll, z.new_zeros(0)
    m = len(lam)
    # (m, V): lam z^c + (1 - lam) z^u, fp32 lam
    lp = logp(torch.lerp(z[m:], z[:m], lam[:, None].to(z.dtype)))
    return nll, -(
        lam * lp.gather(1, y[:m, None])[:, 0] + (1 - lam) * lp.gather(1, y[m:, None])[:, 0]
    )


# ------------------------------------------------------------------------- `python sftmix.py split`


def main(argv=None):
    p = argparse.ArgumentParser(description="Stage 2: split the data at the median confidence.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser(
        "split",
        help="dynamics.jsonl -> split.json (confident / unconfident ids)",
        formatter_class=Help,
        description="Sort by confidence (-mean perplexity over the checkpoints), highest first, ties "
        "by id; the first floor(N/2) examples are confident, the rest unconfident (the "
        "median example joins them when N is odd).",
    )
    s.add_argument(
        "--dynamics", required=True, help="dynamics.jsonl written by train.py --dynamics C"
    )
    s.add_argument("--out", required=True, help="split.json to write")
    s.add_argument(
        "--random",
        action="store_true",
        help="ignore confidence: random halves of the same sizes (the control that isolates the split)",
    )
    add_number(s, "--seed", int, ">= 0", 0, "with --random: the draw")
    with reported():  # bad input: one line and exit 2; a bug of ours keeps its traceback
        run_split(p.parse_args(argv))


def run_split(args):
    check_output(args.out, inputs={"--dynamics": args.dynamics})
    ids, perps = read_dynamics(args.dynamics)
    if len(ids) < 2:
        raise InputError(
            f"{args.dynamics}: {len(ids)} example; expected at least 2 to split in halves"
        )
    conf = confidence(perps)
    confident, unconfident = (
        random_split(ids, args.seed) if args.random else split_by_confidence(ids, conf)
    )
    write_json(args.out, {"confident": confident, "unconfident": unconfident})
    by_id = dict(zip(ids, conf))
    for name, half in (("confident", confident), ("unconfident", unconfident)):
        values = [by_id[i] for i in half]
        print(
            f"{name:>11}: {len(half):6d} examples, confidence {min(values):.4g} .. {max(values):.4g}"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
