"""The conformance kit's worked example, computed with transformers alone: every stage.

    python scripts/conformance.py make --out KIT/
    python scripts/conformance_transformers.py KIT/ --out theirs.json
    python scripts/conformance.py check KIT/ theirs.json

It reads only the kit's files (model/, data.jsonl, and the settings and inputs in expected.json) and
uses only transformers and torch: apply_chat_template, the tokenizer's offsets, LlamaForCausalLM and
hidden_states[-1]. Nothing of this project is imported but kit_example.py, its command line
(standard library only), so it is the template to start from on any transformers stack: replace a
function by the corresponding piece of your own code and check again (on TRL:
scripts/conformance_trl.py). It runs whole global batches, so it leaves stage 7 (micro-batches) out.
"""

import json
import math
import statistics
from pathlib import Path

import kit_example  # the command line: KIT --out FILE
import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, LlamaForCausalLM

IGNORE = -100  # PyTorch's ignore_index: the label of a position that is not trained


# ------------------------------------------------------------------------ stage 1: tokens


def trained_spans(tok, messages):
    """(rendered text, character spans [start, end) of every assistant turn's content and its
    end-of-turn token).

    A turn starts where the chat template's generation prompt for it ends, and ends after the first
    end-of-turn token (tok.eos_token, <|im_end|> in ChatML) after its content: the newline the
    template puts after that token is not part of the turn.
    """
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = tok.apply_chat_template(
                messages[:i], tokenize=False, add_generation_prompt=True
            )
            assert text.startswith(prompt), "the chat template renders a prefix differently"
            end = text.index(tok.eos_token, len(prompt) + len(m["content"])) + len(tok.eos_token)
            spans.append((len(prompt), end))
    return text, spans


def tokens(tok, messages, max_len):
    """(input_ids, pre-shifted labels) of one conversation, as the kit states them.

    The text is tokenized whole; a token is trained when its characters overlap a trained span (so
    a token that straddles the prompt and the reply is trained). HF-style labels y (y_t = x_t or
    -100) over x_0..x_max_len become the kit's by the shift: input_ids = x[:-1], labels = y[1:].
    """
    text, spans = trained_spans(tok, messages)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    x = enc["input_ids"][: max_len + 1]
    y = [
        t if any(a < end and b > start for start, end in spans) else IGNORE
        for t, (a, b) in zip(x, enc["offset_mapping"])
    ]
    return x[:-1], y[1:]


# ------------------------------------------------------------------------ stage 2: response NLL


@torch.no_grad()
def response_nll(model, input_ids, labels):
    """(sum of -log p over the trained positions, their number) of one example, alone."""
    logits = model(torch.tensor([input_ids])).logits[0]  # (T, V)
    y = torch.tensor(labels)  # (T,)
    return F.cross_entropy(logits, y, ignore_index=IGNORE, reduction="sum").item(), int(
        (y != IGNORE).sum()
    )


# ------------------------------------------------------------------------ stages 3 to 6: training


def ntp_loss(logits, labels):
    """L_NTP over the global batch: logits (G, T, V), labels (G, T); every trained token weighs
    the same."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)


def mixup_loss(hidden, labels, lam, lm_head, reduction="mean"):
    """L_Mixup: rows [0, P) of hidden (G, T, D) / labels (G, T) are the confident examples, rows
    [P, 2P) their unconfident partners, lam (P,). The k-th response position of c is mixed with the
    k-th of u, k < n = min(n^c, n^u); the loss -(lam log q(y^c) + (1 - lam) log q(y^u)),
    q = softmax(lm_head(lam z^c + (1 - lam) z^u)), is averaged over every mixed position ("sum":
    summed). The head is linear without bias, so its logits are mixed instead of the states: in fp32
    with lam in fp32, as the log-softmax, whatever the model's dtype.
    """
    P, losses = len(lam), []
    for p in range(P):
        pos_c = (labels[p] != IGNORE).nonzero()[:, 0]
        pos_u = (labels[P + p] != IGNORE).nonzero()[:, 0]
        n = min(len(pos_c), len(pos_u))
        pos_c, pos_u = pos_c[:n], pos_u[:n]
        logits = lm_head(torch.cat([hidden[p, pos_c], hidden[P + p, pos_u]])).float()  # (2n, V)
        z = lam[p] * logits[:n] + (1 - lam[p]) * logits[n:]  # lm_head(lam z^c + (1 - lam) z^u)
        logp = torch.log_softmax(z, dim=-1)  # (n, V)
        y_c, y_u = labels[p, pos_c], labels[P + p, pos_u]
        losses.append(
            -(lam[p] * logp[torch.arange(n), y_c] + (1 - lam[p]) * logp[torch.arange(n), y_u])
        )
    losses = torch.cat(losses)  # (M,)
    return losses.sum() if reduction == "sum" else losses.mean()


def collate(rows, pad_id):
    """Right-padded (input_ids, labels, attention_mask), each (G, T), of [(input_ids, labels)]."""
    T = max(len(ids) for ids, _ in rows)
    input_ids = torch.tensor([ids + [pad_id] * (T - len(ids)) for ids, _ in rows])
    labels = torch.tensor([y + [IGNORE] * (T - len(y)) for _, y in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (T - len(ids)) for ids, _ in rows])
    return input_ids, labels, attention_mask


def adamw(model, settings):
    """AdamW as the kit states it: weight decay on the tensors of 2 or more dimensions only."""
    groups = [
        {
            "params": [p for p in model.parameters() if p.dim() >= 2],
            "weight_decay": settings["weight_decay"],
        },
        {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(groups, betas=tuple(settings["betas"]), eps=settings["eps"])


def lr_at(step, total, lr, warmup_ratio):
    """The kit's schedule: W = ceil(warmup_ratio * total) warm-up steps, step k at lr (k + 1) / W,
    then cosine from lr to 0 over the remaining steps."""
    warmup = math.ceil(warmup_ratio * total)
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train(
    model, batches, settings, warmup_ratio, pad_id, lambdas=None, grad_entries=(), after_step=None
):
    """Optimizer steps on the global batches [[(input_ids, labels)]]: NTP, or SFTMix with lambdas
    (per step, the P lambdas; a batch holds its P confident examples, then their P partners). Each
    step: the loss, the gradient's norm and entries before clipping, clip, AdamW at lr_at.
    Returns a record per step."""
    optimizer = adamw(model, settings)
    params = dict(model.named_parameters())
    records = []
    for step, rows in enumerate(batches):
        input_ids, labels, attention_mask = collate(rows, pad_id)
        out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        ntp = ntp_loss(out.logits, labels)
        record = {
            "lr": lr_at(step, len(batches), settings["lr"], warmup_ratio),
            "ntp_loss": ntp.item(),
        }
        loss = ntp
        if lambdas is not None:  # hidden_states[-1]: after the final norm
            lam = torch.tensor(lambdas[step])
            mix = mixup_loss(out.hidden_states[-1], labels, lam, model.lm_head)
            loss = ntp + settings["mu"] * mix
            record.update(mixup_loss=mix.item(), loss=loss.item())
        loss.backward()
        record["grad_entries"] = [
            params[name].grad[tuple(index)].item() for name, index in grad_entries
        ]
        record["grad_norm"] = torch.nn.utils.clip_grad_norm_(
            model.parameters(), settings["grad_clip"]
        ).item()
        for group in optimizer.param_groups:
            group["lr"] = record["lr"]
        optimizer.step()
        optimizer.zero_grad()
        records.append(record)
        if after_step:
            after_step()
    return records


def reference_run(kit, examples, run, settings, pad_id):
    """Stage 3: the NTP run on the stated batches, the perplexities after each step, confidence,
    variability and the split."""
    model = LlamaForCausalLM.from_pretrained(kit / "model", dtype=torch.float32)
    perplexities = {i: [] for i in examples}

    def record_perplexities():
        for i, (x, y) in examples.items():
            nll, n = response_nll(model, x, y)
            perplexities[i].append(math.exp(nll / n))

    batches = [[examples[i] for i in batch] for batch in run["batches"]]
    train(model, batches, settings, run["warmup_ratio"], pad_id, after_step=record_perplexities)
    confidence = {i: -statistics.fmean(p) for i, p in perplexities.items()}
    ranked = sorted(examples, key=lambda i: (-confidence[i], i))
    return {
        "perplexities": perplexities,
        "confidence": confidence,
        "variability": {i: statistics.pstdev(p) for i, p in perplexities.items()},
        "split": {
            "confident": ranked[: len(ranked) // 2],
            "unconfident": ranked[len(ranked) // 2 :],
        },
    }


def compute(kit):
    """THEIRS.json's content for every stage."""
    kit = Path(kit)
    expected = json.loads((kit / "expected.json").read_text("utf-8"))
    settings, inputs = expected["settings"], expected["inputs"]
    tok = AutoTokenizer.from_pretrained(kit / "model")
    model = LlamaForCausalLM.from_pretrained(kit / "model", dtype=torch.float32)
    conversations = [json.loads(line) for line in (kit / "data.jsonl").read_text().splitlines()]
    examples = {c["id"]: tokens(tok, c["messages"], settings["max_len"]) for c in conversations}
    nll = {i: response_nll(model, *x) for i, x in examples.items()}
    run = inputs["sftmix_run"]
    batches = [
        [examples[c] for c, _ in pairs] + [examples[u] for _, u in pairs] for pairs in run["pairs"]
    ]
    steps = train(
        model,
        batches,
        settings,
        run["warmup_ratio"],
        tok.pad_token_id,
        run["lambda"],
        run["grad_entries"],
    )
    return {
        "input_ids": {i: x for i, (x, _) in examples.items()},
        "labels": {i: y for i, (_, y) in examples.items()},
        "response_nll": {i: v for i, (v, _) in nll.items()},
        "n_tokens": {i: n for i, (_, n) in nll.items()},
        **reference_run(kit, examples, inputs["reference_run"], settings, tok.pad_token_id),
        "sftmix_steps": steps,
        "weight_norms": {name: p.norm().item() for name, p in model.named_parameters()},
    }


if __name__ == "__main__":
    kit_example.main(compute, __doc__.split("\n\n")[0])
