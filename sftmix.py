"""SFTMix, the method: training dynamics -> confidence split -> Mixup between confident and unconfident data.

Each step of the paper is one function here, named after the paper's terms, with its equation:
  response_nll / perplexity     Perp_c(y|x) = exp(-(1/|y|) sum_t log p_c(y_t | x, y_<t))
  confidence, variability       Conf(x, y) = -(1/C) sum_c Perp_c(y|x), and the std of the same values
  split_by_confidence           D^c = top half by confidence, D^u = bottom half
  paired_batches                every batch: half from D^c, half from D^u, paired at random
  mixup_loss                    CE(softmax(W (lam Z^c + (1-lam) Z^u)), lam Y^c + (1-lam) Y^u)
The training loop that puts them together is train.py; `python sftmix.py split` is stage 2 as a command.
"""
import argparse
import json
import math
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from data import IGNORE, InputError, collate, length_grouped_batches, shard, write_json


# ----------------------------------------------------------------------------- stage 1: training dynamics

@torch.no_grad()
def response_nll(model, samples, batch_size, device, amp_dtype=None, desc="dynamics"):
    """Summed response-token NLL and response length of every sample, over all ranks.

    nll(x, y) = -sum_t log p(y_t | x, y_<t) over the trained (label != -100) positions; |y| their count.
    Forward only, in length-grouped batches so padding stays small, the batches sharded over ranks.
    amp_dtype (e.g. torch.bfloat16) runs the forward under autocast, as training does.
    Returns {id: (nll, n_tokens)} with every sample's id exactly once, on every rank.
    """
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    batches = length_grouped_batches([len(s.input_ids) for s in samples], batch_size)
    mine = shard(batches, rank, world)
    rounds = -(-len(batches) // world)  # every rank runs as many forwards: FSDP gathers weights collectively
    result = {}
    for r in tqdm(range(rounds), desc=desc, disable=rank != 0, leave=False):
        b = collate([samples[i] for i in (mine[r] if r < len(mine) else batches[0])], pad_id=0)
        input_ids, labels = b["input_ids"].to(device), b["labels"].to(device)  # (B, T) each
        trained = labels != IGNORE  # (B, T)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(input_ids, logits_at=trained)  # (N, V), the N trained positions
        if r >= len(mine):
            continue  # a filler forward on a rank with one batch fewer: nothing to record
        nll = F.cross_entropy(logits.float(), labels[trained], reduction="none")  # (N,)
        row_nll = torch.zeros(len(labels), dtype=nll.dtype, device=device).index_add_(0, trained.nonzero()[:, 0], nll)
        for sample_id, s_nll, n in zip(b["ids"], row_nll.tolist(), trained.sum(1).tolist()):
            result[sample_id] = (s_nll, n)
    model.train(was_training)
    if world > 1:
        parts = [None] * world
        dist.all_gather_object(parts, result)
        result = {k: v for part in parts for k, v in part.items()}
    return result


def perplexity(nll, n_tokens):
    """Perp(y|x) = exp(nll / |y|)."""
    return math.exp(nll / n_tokens)


def confidence(perplexities):
    """Conf(x, y) = -(1/C) sum_c Perp_c(y|x): (N, C) perplexities at C checkpoints -> (N,)."""
    return -np.asarray(perplexities, dtype=np.float64).mean(axis=1)


def variability(perplexities):
    """Population std over the C checkpoints of the same perplexities: (N, C) -> (N,). The data map's y-axis."""
    return np.asarray(perplexities, dtype=np.float64).std(axis=1)


# ----------------------------------------------------------------------------- stage 2: confidence split

def split_by_confidence(ids, confidence):
    """Split at the median confidence: (confident_ids, unconfident_ids).

    Sort by confidence, highest first, ties broken by id (so the split is deterministic); the first
    floor(N/2) are D^c, the rest D^u. With odd N the median example goes to D^u, which is one larger.
    """
    order = sorted(range(len(ids)), key=lambda i: (-float(confidence[i]), ids[i]))
    half = len(ids) // 2
    return [ids[i] for i in order[:half]], [ids[i] for i in order[half:]]


def read_dynamics(path):
    """dynamics.jsonl -> (ids, perplexities (N, C)); each line {"id", "perplexities", ...}."""
    ids, perps = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                record = json.loads(line)
                ids.append(str(record["id"]))
                perps.append([float(p) for p in record["perplexities"]])
            except (ValueError, KeyError, TypeError) as e:
                raise InputError(f"{path}:{lineno}: expected {{\"id\": ..., \"perplexities\": [numbers]}} ({e})")
    if not ids or len({len(p) for p in perps}) != 1:
        raise InputError(f"{path}: expected one or more lines, each with the same number of perplexities")
    return ids, np.asarray(perps)


def read_split(path):
    """split.json -> {"confident": [ids], "unconfident": [ids]}, ids as strings."""
    try:
        split = json.loads(open(path, encoding="utf-8").read())
        return {half: [str(i) for i in split[half]] for half in ("confident", "unconfident")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f'{path}: expected {{"confident": [ids], "unconfident": [ids]}} ({e})') from None


# ----------------------------------------------------------------------------- stage 3: Mixup training

def paired_batches(confident, unconfident, batch_size, seed, epoch):
    """One epoch of batches, each `batch_size // 2` confident followed by as many unconfident examples.

    D^c and D^u are shuffled separately from (seed, epoch) and zipped, so pair i is
    (confident[i], unconfident[i]) at random. Each example appears at most once per epoch. Leftovers
    are dropped for this epoch (a different few each epoch): the extra example(s) of the larger half,
    and the pairs that do not fill a last whole batch.
    """
    assert batch_size % 2 == 0, "an SFTMix batch holds pairs: batch_size must be even"
    rng = random.Random(f"{seed}-{epoch}")
    c, u = list(confident), list(unconfident)
    rng.shuffle(c)
    rng.shuffle(u)
    P = batch_size // 2
    n_batches = min(len(c), len(u)) // P
    return [c[b * P:(b + 1) * P] + u[b * P:(b + 1) * P] for b in range(n_batches)]


def sample_lambda(alpha, n_pairs, seed, step):
    """lam ~ Beta(alpha, alpha), one per pair, drawn from (seed, step): the same on every rank and on resume."""
    return torch.from_numpy(np.random.default_rng([seed, step]).beta(alpha, alpha, size=n_pairs)).float()


def first_n_response_positions(labels_c, labels_u):
    """Masks (P, T) of the first n = min(n^c, n^u) response positions of each example of each pair.

    labels_* (P, T) are next-token targets, IGNORE where nothing is trained. Both masks hold exactly
    n_p positions in row p, so taking them in row-major order aligns the k-th response position of c
    with the k-th of u, counted from the first response position.
    """
    rank_c = (labels_c != IGNORE).cumsum(1)  # (P, T): 1-based rank among response positions
    rank_u = (labels_u != IGNORE).cumsum(1)
    n = torch.minimum(rank_c[:, -1], rank_u[:, -1])[:, None]  # (P, 1)
    return (labels_c != IGNORE) & (rank_c <= n), (labels_u != IGNORE) & (rank_u <= n)


def mixup_loss(hidden_c, labels_c, hidden_u, labels_u, lam, lm_head_weight, reduction="mean"):
    """Mixup cross-entropy of interpolated last-layer hidden states.

        Z~ = lam Z^c + (1 - lam) Z^u,   Y~ = lam Y^c + (1 - lam) Y^u
        L_Mixup = CE(softmax(W Z~), Y~) = lam CE(W Z~, y^c) + (1 - lam) CE(W Z~, y^u)

    hidden_* (P, T, D) final-norm hidden states of P pairs; labels_* (P, T) next-token targets at those
    positions (IGNORE elsewhere); lam (P,); lm_head_weight W (V, D). Each pair is cut to its first
    n = min(n^c, n^u) response positions. "mean" averages over all mixed positions, "sum" sums them.
    """
    mask_c, mask_u = first_n_response_positions(labels_c, labels_u)
    lam_pos = lam[:, None].expand_as(labels_c)[mask_c][:, None].to(hidden_c.dtype)  # (M, 1)
    mixed = lam_pos * hidden_c[mask_c] + (1 - lam_pos) * hidden_u[mask_u]  # (M, D)
    logits = mixed @ lm_head_weight.T  # (M, V)
    return soft_label_ce(logits, labels_c[mask_c], labels_u[mask_u], lam_pos[:, 0], reduction)


def mixup_loss_from_logits(logits_c, labels_c, logits_u, labels_u, lam, reduction="mean"):
    """mixup_loss computed from the NTP logits: W is linear with no bias, so W Z~ = lam W Z^c + (1 - lam) W Z^u.

    logits_* (N_*, V): the logits at the response positions of labels_* (P, T) (labels != IGNORE), in
    row-major order, as the model returns them with logits_at. Same value as mixup_loss, with no second
    LM-head matmul.
    """
    mask_c, mask_u = first_n_response_positions(labels_c, labels_u)
    keep_c, keep_u = mask_c[labels_c != IGNORE], mask_u[labels_u != IGNORE]  # (N_c,), (N_u,): the first n of each row
    lam_pos = lam[:, None].expand_as(labels_c)[mask_c].to(logits_c.dtype)  # (M,)
    mixed = torch.lerp(logits_u[keep_u], logits_c[keep_c], lam_pos[:, None])  # (M, V) = lam c + (1-lam) u
    return soft_label_ce(mixed, labels_c[mask_c], labels_u[mask_u], lam_pos, reduction)


def soft_label_ce(logits, y_c, y_u, lam, reduction):
    """-sum_v Y~_v log softmax(logits)_v with Y~ = lam onehot(y_c) + (1 - lam) onehot(y_u); logits (M, V)."""
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (M, V), >= fp32
    nll = -(lam * logp.gather(1, y_c[:, None])[:, 0] + (1 - lam) * logp.gather(1, y_u[:, None])[:, 0])  # (M,)
    if reduction == "sum":
        return nll.sum()
    return nll.sum() / max(nll.numel(), 1)


# ----------------------------------------------------------------------------- `python sftmix.py split`

def main(argv=None):
    p = argparse.ArgumentParser(description="Stage 2: split the data at the median confidence.")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split", help="dynamics.jsonl -> split.json (confident / unconfident ids)")
    s.add_argument("--dynamics", required=True, help="dynamics.jsonl written by train.py --dynamics C")
    s.add_argument("--out", required=True, help="split.json to write")
    args = p.parse_args(argv)
    try:
        ids, perps = read_dynamics(args.dynamics)
    except (OSError, InputError) as e:
        sys.exit(f"error: {e}")
    if len(set(ids)) != len(ids):
        sys.exit(f"error: {args.dynamics}: an id appears more than once")
    conf = confidence(perps)
    confident, unconfident = split_by_confidence(ids, conf)
    write_json(args.out, {"confident": confident, "unconfident": unconfident})
    by_id = dict(zip(ids, conf))
    for name, half in (("confident", confident), ("unconfident", unconfident)):
        values = [by_id[i] for i in half]
        print(f"{name:>11}: {len(half):6d} examples, confidence {min(values):.4g} .. {max(values):.4g}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
