"""Conformance kit: check another SFTMix implementation against this one, stage by stage.

    python scripts/conformance.py make --out KIT/         # model/, data.jsonl, expected.json
    python scripts/conformance.py check KIT/ THEIRS.json  # agrees / differs / not given, per stage

The kit is a tiny random Llama (a standard HF directory, so any framework loads it), a tokenizer
(SmolLM2's when .assets/SmolLM2-135M-Instruct is present, else a small byte-level BPE made for the
kit with SmolLM2's chat template; expected.json says which), 16 conversations chosen to catch the
usual mistakes, and expected.json with this implementation's values for stated settings:

    stage 1  input_ids, labels       token ids and pre-shifted trained labels per example
    stage 2  response_nll, n_tokens  summed response NLL and its token count at the base weights
    stage 3  perplexities,           at the C = 2 checkpoints of a 2-step NTP reference run
             confidence,             made by train.py (its batches and command written out)
             variability, split
    stage 4  sftmix_steps[0]         the first SFTMix step from the base weights, pairs and lambda
                                     given: L_NTP, L_Mixup, L, grad norm, named gradient entries
    stage 5  sftmix_steps[k].lr,     the lr of each of the run's 6 steps (warm-up, then cosine),
             sftmix_steps[1:]        and steps 2 to 6, through clipping and AdamW
    stage 6  weight_norms            per-tensor norms of the weights after those 6 steps
    stage 7  sftmix_steps_micro      the 6 steps again, each global batch in micro-batches of
                                     whole pairs (accumulated, over ranks): stage 4-5's values

THEIRS.json holds any subset of the keys of expected.json's "expected", in the same layout. `check`
exits 0 when every given stage agrees, 1 on a difference, 2 on malformed input; a known mistake is
named where every value out of tolerance is that mistake's (docs/conformance.md).
"""

import argparse
import contextlib
import io
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import report  # noqa: E402  (scripts/, beside this file)

import data  # noqa: E402
import model as M  # noqa: E402
import sftmix  # noqa: E402
import train  # noqa: E402
from data import IGNORE, InputError  # noqa: E402

SMOLLM2 = ROOT / ".assets" / "SmolLM2-135M-Instruct"
# The kit's two runs as train.py command lines; the settings expected.json states are read back
# from them through train.parse_args (train.py's defaults included: betas, alpha, mu).
RUN_FLAGS = [
    "--model",
    "model",
    "--data",
    "data.jsonl",
    "--global-batch",
    "8",
    "--micro-batch",
    "4",
    "--lr",
    "1e-2",
    "--weight-decay",
    "0.1",
    "--grad-clip",
    "1.0",
    "--max-len",
    "96",
    "--seed",
    "0",
    "--dtype",
    "fp32",
]
REFERENCE_FLAGS = ["--mode", "ntp", "--epochs", "1", "--warmup-ratio", "0", "--dynamics", "2"]
SFTMIX_FLAGS = [
    "--mode",
    "sftmix",
    "--split",
    "split.json",
    "--epochs",
    "3",
    "--warmup-ratio",
    "0.25",
]
SETTINGS = [
    "max_len",
    "seed",
    "global_batch",
    "lr",
    "weight_decay",
    "betas",
    "grad_clip",
    "alpha",
    "mu",
]
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    tie_word_embeddings=False,
)
INIT_STD = {"model.embed_tokens.weight": 1.0, "lm_head.weight": 0.5}  # peaked logits; others 0.2
GRAD_ENTRIES = [
    ("lm_head.weight", "<|im_end|>", 0),
    ("model.embed_tokens.weight", "<|im_start|>", 1),
    ("model.layers.0.self_attn.q_proj.weight", 3, 5),
    ("model.layers.1.mlp.down_proj.weight", 7, 2),
    ("model.norm.weight", 4),
]  # a token name stands for its id
EOT = "<|im_end|>"
SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # SmolLM2's default

LONG = " ".join(
    f"Step {i}: stir the sauce, taste it, and add a pinch of salt if it needs more."
    for i in range(1, 13)
)
CONVERSATIONS = [  # (id, messages as (role, content)); each catches a mistake named in its id
    ("plain", [("user", "What is the capital of France?"), ("assistant", "Paris.")]),
    (
        "system-turn",
        [
            ("system", "You answer in one word."),
            ("user", "Colour of the sky?"),
            ("assistant", "Blue"),
        ],
    ),
    (
        "two-assistant-turns",
        [
            ("user", "Name a prime number."),
            ("assistant", "Seven."),
            ("user", "And an even one?"),
            ("assistant", "Two, the only even prime."),
        ],
    ),
    (
        "three-turns-system",
        [
            ("system", "Be brief."),
            ("user", "Hi"),
            ("assistant", "Hello!"),
            ("user", "Count to 3"),
            ("assistant", "1, 2, 3"),
            ("user", "Backwards?"),
            ("assistant", "3, 2, 1"),
        ],
    ),
    ("truncated-at-max-len", [("user", "How do I make tomato sauce?"), ("assistant", LONG)]),
    ("one-token-answer", [("user", "Is water wet? Answer yes or no."), ("assistant", "Yes")]),
    (
        "non-ascii",
        [
            ("user", "Say hello in German and Japanese."),
            ("assistant", "Grüße aus Köln — こんにちは、東京! 🌸"),
        ],
    ),
    (
        "leading-space-and-newline",
        [("user", "Reply with a leading space."), ("assistant", " \nokay, here it is")],
    ),
    (
        "trailing-newlines",
        [("user", "End your answer with blank lines."), ("assistant", "Done.\n\n")],
    ),
    (
        "code",
        [
            ("user", "Python: add two numbers."),
            ("assistant", "```python\ndef add(a, b):\n    return a + b\n```"),
        ],
    ),
    (
        "long-prompt-short-answer",
        [
            (
                "user",
                "Here is a long story about a cat who sat on a mat, then on a chair, then on the "
                "roof, then on a fence, and finally on the warm kitchen floor. Where did the cat "
                "sit last?",
            ),
            ("assistant", "The kitchen floor."),
        ],
    ),
    (
        "medium-answer",
        [
            ("user", "Why is the sea salty?"),
            (
                "assistant",
                "Rivers carry dissolved minerals from rocks into the sea; the "
                "water evaporates, the salt stays.",
            ),
        ],
    ),
    ("numbers", [("user", "What is 12 * 12?"), ("assistant", "12 * 12 = 144")]),
    (
        "quote-marks",
        [
            ("user", "Quote a proverb."),
            ("assistant", '"A stitch in time saves nine," as they say.'),
        ],
    ),
    ("list-answer", [("user", "Three colours?"), ("assistant", "- red\n- green\n- blue")]),
    (
        "second-turn-long",
        [
            ("user", "Hi!"),
            ("assistant", "Hi, how can I help?"),
            ("user", "Explain rain."),
            (
                "assistant",
                "Water evaporates, rises, cools into droplets that form "
                "clouds, and falls back as rain when the droplets grow "
                "heavy enough.",
            ),
        ],
    ),
]
STAGES = [  # (number, title, keys, stages it depends on)
    (1, "tokens", ["input_ids", "labels"], []),
    (2, "response NLL", ["response_nll", "n_tokens"], [1]),
    (3, "dynamics, split", ["perplexities", "confidence", "variability", "split"], [1, 2]),
    (4, "SFTMix step 1", ["sftmix_steps[0]"], [1, 2]),
    (5, "schedule, clip", ["sftmix_steps[k].lr", "sftmix_steps[1:]"], [4]),
    (6, "weight norms", ["weight_norms"], [5]),
    (7, "micro-batches", ["sftmix_steps_micro"], [4, 5]),
]
TOLERANCE = {  # |theirs - ours| <= atol + rtol scale; transformers, TRL, train.py: 8x closer
    1: {"exact": True},
    2: {"rtol": 1e-5, "atol": 1e-4},
    3: {
        "rtol": 1e-4,
        "atol": 1e-6,
        "split": "exact",
        "scale": "|ours|; for confidence and variability the example's largest perplexity",
    },
    4: {"rtol": 1e-4, "atol": 1e-6},  # a gradient entry sums many terms, ~1e-7 apart in any order
    5: {"rtol": 1e-4, "atol": 1e-6},
    6: {"rtol": 1e-5, "atol": 1e-6},
    7: {"rtol": 1e-4, "atol": 1e-6},
}
STEP_KEYS = ["lr", "ntp_loss", "mixup_loss", "loss", "grad_norm", "grad_entries"]


# ----------------------------------------------------------------------------- make


def kit_tokenizer(out, texts):
    """A byte-level BPE of at most 1024 tokens trained on texts, with ChatML's special tokens and
    SmolLM2's chat template (its default system prompt included)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=1024,
            special_tokens=["<|endoftext|>", "<|im_start|>", EOT],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    template = (
        "{% for message in messages %}"
        "{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\\n" + SYSTEM + "<|im_end|>\\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
        "'\\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    data.write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": None,
            "eos_token": EOT,
            "pad_token": EOT,
            "unk_token": "<|endoftext|>",
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "chat_template": template,
        },
    )


def tiny_model(vocab_size):
    """The kit's model: a 2-layer Llama, seeded normal weights (INIT_STD, else 0.2), norms 1."""
    torch.manual_seed(0)
    tiny = M.Transformer(M.ModelArgs(**TINY, vocab_size=vocab_size))
    with torch.no_grad():
        for name, p in tiny.named_parameters():
            p.normal_(0, INIT_STD.get(name, 0.2)) if p.dim() > 1 else p.fill_(1.0)
    return tiny


def command(flags):
    """(train.py's arguments for one of the kit's runs, as it parses them; its command line)."""
    args = train.parse_args([*RUN_FLAGS, *flags, "--out", "OUT"])
    return args, " ".join(["python train.py", *RUN_FLAGS, *flags])


def reference_run(kit, out, *flags):
    """Stage 3 from the project's trainer: a 2-step NTP run with dynamics at C = 2 checkpoints.
    Returns (its perplexities, confidence and variability in THEIRS.json's layout, its lr)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *RUN_FLAGS,
            *REFERENCE_FLAGS,
            *flags,
            "--out",
            str(out),
        ],
        cwd=kit,
        env=env,
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise RuntimeError(f"the reference run failed:\n{r.stderr[-3000:]}")
    ids, perps = sftmix.read_dynamics(out / "dynamics.jsonl")
    lr = [r["lr"] for r in report.read_metrics(out / "metrics.jsonl")]
    return {
        "perplexities": dict(zip(ids, perps.tolist())),
        "confidence": dict(zip(ids, sftmix.confidence(perps).tolist())),
        "variability": dict(zip(ids, sftmix.variability(perps).tolist())),
    }, lr


def entry_index(tok, entry):
    return [tok.hf.token_to_id(i) if isinstance(i, str) else i for i in entry[1:]]


MISTAKES = {  # the usual mistakes that run() computes in place of the definitions: their names
    "mean of means": "a mean of per-example means; L_NTP weighs every trained token of the global "
    "batch the same",
    "lambda swapped": "lambda applied to the unconfident member of each pair; Z~ = lam Z^c + "
    "(1 - lam) Z^u",
    "unaligned": "Mixup over unaligned positions (the same position t in both examples); the k-th "
    "response position of c is mixed with the k-th of u",
    "from the end": "Mixup over positions aligned from the last response position; they are "
    "aligned from the first",
    "warm-up from 0": "warm-up from lr 0 (HF's: step k at lr k/W); step k of the warm-up runs at "
    "lr (k + 1)/W",
    "linear": "linear decay after the warm-up; it is cosine: lr (1 + cos(pi progress)) / 2",
    "clipping off": "gradient clipping off; the gradient is clipped to grad_clip before each "
    "AdamW step",
    "clipping per tensor": "each tensor clipped to grad_clip on its own; the gradient is clipped "
    "as one vector of all tensors",
    # stage 7: each micro-batch one pair, 4 of them a global batch
    4: "L_Mixup averaged per micro-batch and summed over 4 accumulation steps (weight 4 mu: "
    "transformers divides no loss by the accumulation steps when the model takes "
    "num_items_in_batch); it is over the global batch's mixed positions",
    2: "L_Mixup averaged per micro-batch and summed over 2 accumulation steps on each of 2 ranks "
    "(weight 2 mu); it is over the global batch's mixed positions",
    1: "L_Mixup averaged per micro-batch, the micro-batches averaged; it is over the global "
    "batch's mixed positions",
}


def mixup(hidden, labels, lam, W, mistake=None):
    """L_Mixup of a global batch (rows [0, P) confident, [P, 2P) their partners) by its
    definition, or under a mistake of MISTAKES; an int k: the sum of every pair's own mean
    (a micro-batch a pair, 4 of them) over k accumulation steps per rank."""
    P = len(lam)
    c, u = labels[:P], labels[P:]
    if isinstance(mistake, int):
        return (
            sum(
                sftmix.mixup_loss(
                    hidden[p : p + 1],
                    c[p : p + 1],
                    hidden[P + p : P + p + 1],
                    u[p : p + 1],
                    lam[p : p + 1],
                    W,
                )
                for p in range(P)
            )
            * mistake
            / P
        )
    if mistake == "lambda swapped":
        return sftmix.mixup_loss(hidden[P:], u, hidden[:P], c, lam, W)
    if mistake == "unaligned":
        both = (c != IGNORE) & (u != IGNORE)  # the same position t trained in both
        return sftmix.mixup_loss(
            hidden[:P],
            torch.where(both, c, IGNORE),
            hidden[P:],
            torch.where(both, u, IGNORE),
            lam,
            W,
        )
    if mistake == "from the end":
        return sftmix.mixup_loss(
            hidden[:P].flip(1), c.flip(1), hidden[P:].flip(1), u.flip(1), lam, W
        )
    return sftmix.mixup_loss(hidden[:P], c, hidden[P:], u, lam, W)


def lr_of(step, total, lr, warmup_ratio, mistake=None):
    """train.lr_at, or the schedule of a mistake of MISTAKES."""
    W = math.ceil(warmup_ratio * total)
    if mistake == "warm-up from 0" and step < W:
        return lr * step / W
    if mistake == "linear" and step >= W:
        return lr * (1 - (step - W) / max(1, total - W))
    return train.lr_at(step, total, lr, warmup_ratio)


def run(kit, samples, batches, args, tok, mistake=None, perplexities=None):
    """Optimizer steps from the base weights by the definitions, each on one whole global batch:

        L_NTP   = sum of -log p over the trained tokens of the G rows / their number
        L_Mixup = mixup(): sftmix.mixup_loss over the first n = min(n^c, n^u) response positions of
                  every pair, their mean; with no lambdas (NTP) L = L_NTP
        L       = L_NTP + mu L_Mixup; one backward; the gradient's norm and entries; clip to
                  args.grad_clip; AdamW (train.adamw) at train.lr_at of the step
    batches: [(G sample indices, P confident then their partners; lam (P,) or None)], one a step.
    mistake: a key of MISTAKES, computed in place of its definition. perplexities: {id: []} gains
    every example's response perplexity after each step (stage 3).
    Returns (the step records, the weights after them).
    """
    model = M.load_pretrained(kit / "model")
    optimizer = train.adamw(model, args.lr, args.weight_decay, args.betas)
    params = dict(model.named_parameters())
    clip = math.inf if mistake == "clipping off" else args.grad_clip
    records = []
    for step, (rows, lam) in enumerate(batches):
        b = data.collate([samples[i] for i in rows], tok.pad_id)
        labels, W = b["labels"], model.lm_head.weight  # (G, T)
        hidden = model(b["input_ids"], head=lambda h, w, softcap: h)  # (G, T, D): final-norm states
        trained = labels != IGNORE  # (G, T); the logits of the N trained positions only:
        nll = F.cross_entropy(hidden[trained] @ W.T, labels[trained], reduction="none")  # (N,)
        if mistake == "mean of means":
            row = trained.nonzero()[:, 0]  # (N,): each position's example
            ntp = torch.stack([nll[row == r].mean() for r in row.unique()]).mean()
        else:
            ntp = nll.mean()
        loss, record = (
            ntp,
            {
                "lr": lr_of(step, len(batches), args.lr, args.warmup_ratio, mistake),
                "ntp_loss": ntp.item(),
            },
        )
        if lam is not None:
            mix = mixup(hidden, labels, lam, W, mistake)
            loss = ntp + args.mu * mix
            record.update(mixup_loss=mix.item(), loss=loss.item())
        loss.backward()
        record["grad_entries"] = [
            params[e[0]].grad[tuple(entry_index(tok, e))].item() for e in GRAD_ENTRIES
        ]
        record["grad_norm"] = torch.nn.utils.get_total_norm(
            [p.grad for p in model.parameters()]
        ).item()
        for group in (
            [[p] for p in model.parameters()]
            if mistake == "clipping per tensor"
            else [model.parameters()]
        ):
            torch.nn.utils.clip_grad_norm_(group, clip)  # g *= min(1, clip / (its norm + 1e-6))
        for group in optimizer.param_groups:
            group["lr"] = record["lr"]
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        records.append(record)
        if perplexities is not None:
            with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
                nll = sftmix.response_nll(model, samples, len(samples), torch.device("cpu"))
            for i, v in nll.items():
                perplexities[i].append(sftmix.perplexity(*v))
    return records, model


def dynamics_of(ids, perplexities):
    """Stage 3's values in THEIRS.json's layout from {id: [perplexity at each checkpoint]}."""
    perps = [perplexities[i] for i in ids]  # (n, C)
    return {
        "perplexities": dict(zip(ids, perps)),
        "confidence": dict(zip(ids, sftmix.confidence(perps).tolist())),
        "variability": dict(zip(ids, sftmix.variability(perps).tolist())),
    }


def norms(model):
    return {name: t.norm().item() for name, t in model.state_dict().items()}


def known_mistakes(expected, variants):
    """{where: [{"mistake", "value"}]}: every value of stages 3 to 7 that a known mistake puts out
    of tolerance. variants: [(mistake, the values it gives, in THEIRS.json's layout)]."""
    known = {}
    for mistake, theirs in variants:
        for n, items in NUMBERS.items():
            for where, o, t, *scale in items(expected["expected"], theirs, expected):
                if not close(o, t, TOLERANCE[n], *scale):
                    known.setdefault(where, []).append({"mistake": mistake, "value": t})
    return known


def check_kit_dir(out):
    """--out checked before anything is written: a directory (its parents made if missing) whose
    model/, data.jsonl and expected.json make can replace."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file; expected a directory to write the kit into")
    if (out / "model").exists() and not (out / "model").is_dir():
        raise InputError(
            f"--out {out}: {out / 'model'} is a file; expected the kit's model "
            f"directory, or nothing"
        )
    for name in ("data.jsonl", "expected.json"):
        if (out / name).is_dir():
            raise InputError(f"--out {out / name}: is a directory; expected a file to write")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"--out {out}: cannot make {out.parent}: {e.strerror}") from None
    for d in (out.parent, out, out / "model"):  # the kit is made beside out, then moved in
        if d.is_dir() and not os.access(d, os.W_OK | os.X_OK):
            raise InputError(f"--out {out}: cannot write in {d}; expected a writable directory")


def make(out, smollm2=SMOLLM2):
    """Write the kit into out: model/ (HF directory with tokenizer), data.jsonl, expected.json.

    It is made in .OUT.making beside out (a leftover of a killed make is removed first), then
    moved in: a new out appears whole, and in an old one expected.json goes last."""
    torch.set_num_threads(1)
    out = Path(out)
    check_kit_dir(out)
    work = out.parent.absolute() / f".{out.name}.making"  # train.py runs in it
    shutil.rmtree(work, ignore_errors=True)
    try:
        expected = build(work, smollm2)
        shutil.rmtree(work / "runs")
        if not out.exists():
            os.replace(work, out)
            return expected
        for name in ("expected.json", "data.jsonl", "model"):
            shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink(
                missing_ok=True
            )
        for name in ("model", "data.jsonl", "expected.json"):
            os.replace(work / name, out / name)
        return expected
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build(out, smollm2):
    """The kit's files in a new directory out, with its runs' work in out/runs/."""
    records = [
        {"id": i, "messages": [{"role": r, "content": c} for r, c in turns]}
        for i, turns in CONVERSATIONS
    ]
    (out / "runs").mkdir(parents=True)
    data.write_json(out / "data.jsonl", records, lines=True)
    tok_dir = Path(smollm2)
    tok_about = "SmolLM2-135M-Instruct's tokenizer (49152 tokens, ChatML, default system prompt)"
    if not (tok_dir / "tokenizer.json").is_file():
        tok_dir = out / "runs" / "tokenizer"
        texts = [c for _, turns in CONVERSATIONS for _, c in turns]
        kit_tokenizer(tok_dir, [SYSTEM] * len(CONVERSATIONS) + texts)
        tok_about = "a byte-level BPE made for the kit (ChatML, SmolLM2's chat template)"
    base = tiny_model(data.load_tokenizer(tok_dir).hf.get_vocab_size())
    M.save_pretrained(base, out / "model", tokenizer_dir=tok_dir)
    tok = data.load_tokenizer(out / "model")
    ref, ref_command = command(REFERENCE_FLAGS)
    args, sft_command = command(SFTMIX_FLAGS)
    samples, stats = data.load_dataset(out / "data.jsonl", tok, max_len=args.max_len, verbose=False)
    assert stats["truncated"] == 1 and stats["dropped"] == 0, stats
    ids = [x.id for x in samples]
    with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
        nll = sftmix.response_nll(base, samples, len(samples), torch.device("cpu"))  # stage 2
    dynamics, ref_lr = reference_run(out, out / "runs" / "ref")  # stage 3
    confident, unconfident = sftmix.split_by_confidence(
        ids, [dynamics["confidence"][i] for i in ids]
    )
    ref_batches = train.epoch_batches(len(samples), None, 0, ref.global_batch, ref.seed, ref.alpha)
    halves = [[ids.index(i) for i in half] for half in (confident, unconfident)]
    batches = [
        b
        for epoch in range(args.epochs)
        for b in train.epoch_batches(
            len(samples), halves, epoch, args.global_batch, args.seed, args.alpha
        )
    ]
    steps, trained = run(out, samples, batches, args, tok)  # stages 4 to 7

    ranked = sorted(dynamics["confidence"].values(), reverse=True)
    settings = {k: getattr(args, k) for k in SETTINGS}
    settings["eps"] = train.adamw(base, 1, 0).defaults["eps"]
    adamw = {
        "betas": args.betas,
        "eps": settings["eps"],
        "weight_decay": args.weight_decay,
        "decayed": "tensors of 2 or more dimensions only (embeddings, projections, LM head); "
        "the RMSNorm weights are not decayed",
        "decoupled": "p -= lr * weight_decay * p, as torch.optim.AdamW",
    }
    P = args.global_batch // 2
    expected = {
        "about": __doc__.split("\n\n")[0],
        "kit": {
            "tokenizer": tok_about,
            "model": "model/ (LlamaForCausalLM, fp32, untied LM head)",
            "data": "data.jsonl (chat messages, one conversation per line)",
            "prompt_format": "ChatML as in the tokenizer's chat_template; tokenized whole, "
            "special tokens parsed",
            "dtype": "float32 everywhere",
            "end_of_turn": {"token": EOT, "id": tok.hf.token_to_id(EOT)},
            "made_by": "python scripts/conformance.py make --out KIT/",
        },
        "stages": [
            {
                "stage": n,
                "title": title,
                "keys": keys,
                "depends_on": deps,
                "tolerance": TOLERANCE[n],
                "definition": definition,
            }
            for (n, title, keys, deps), definition in zip(STAGES, definitions(args.max_len))
        ],
        "settings": settings,
        "inputs": {
            "reference_run": {
                "command": ref_command,
                "start": "the base weights, model/",
                "steps": len(ref_batches),
                "batches": [[ids[i] for i in b] for b, _ in ref_batches],
                "order": f"train.epoch_batches: data.shuffled_order(16, seed, 0) cut into global "
                f"batches of {args.global_batch}; the loss of a step is over its whole "
                f"batch (token-weighted)",
                "warmup_ratio": ref.warmup_ratio,
                "lr": ref_lr,
                "adamw": adamw,
                "grad_clip": f"{args.grad_clip}: g *= min(1, grad_clip / (norm + 1e-6)) before the "
                f"AdamW step",
                "dynamics": ref.dynamics,
                "checkpoints_after_steps": [1, 2],
                "median_confidence_gap": ranked[len(ranked) // 2 - 1] - ranked[len(ranked) // 2],
            },
            "sftmix_run": {
                "command": sft_command,
                "split.json": "expected.split, as `sftmix.py split` writes it",
                "start": "the base weights, model/ (not the reference run's)",
                "steps": len(batches),
                "warmup_ratio": args.warmup_ratio,
                "lr": "asked back: stage 5",
                "pairs": [[[ids[b[p]], ids[b[P + p]]] for p in range(P)] for b, _ in batches],
                "pairs_are": "[confident id, unconfident id]; the batch of a step is its pairs' "
                "examples",
                "lambda": [lam.tolist() for _, lam in batches],
                "mu": args.mu,
                "adamw": "as reference_run",
                "grad_clip": "as reference_run",
                "grad_entries": [[e[0], entry_index(tok, e)] for e in GRAD_ENTRIES],
            },
        },
        "expected": {
            "input_ids": {x.id: x.input_ids for x in samples},
            "labels": {x.id: x.labels for x in samples},
            "response_nll": {i: nll[i][0] for i in ids},
            "n_tokens": {i: nll[i][1] for i in ids},
            **dynamics,
            "split": {"confident": confident, "unconfident": unconfident},
            "sftmix_steps": steps,
            "weight_norms": norms(trained),
        },
    }
    expected["expected"]["sftmix_steps_micro"] = steps  # the split changes nothing
    clip = [min(1, args.grad_clip / (s["grad_norm"] + 1e-6)) for s in steps]
    after_clipping = [
        {**s, "grad_entries": [g * c for g in s["grad_entries"]]} for s, c in zip(steps, clip)
    ]
    variants = [
        (
            "gradient entries read after clipping (scaled by min(1, grad_clip / (grad_norm + "
            "1e-6))); they are read before",
            {"sftmix_steps": after_clipping, "sftmix_steps_micro": after_clipping},
        )
    ]
    for mistake, name in MISTAKES.items():  # each run again under the mistake, where it applies
        theirs = {}
        if mistake in ("mean of means", "clipping off", "clipping per tensor"):
            perplexities = {i: [] for i in ids}
            run(out, samples, ref_batches, ref, tok, mistake, perplexities)
            theirs = dynamics_of(ids, perplexities)
        mistaken, weights = run(out, samples, batches, args, tok, mistake)
        if not isinstance(mistake, int):
            theirs.update(sftmix_steps=mistaken, weight_norms=norms(weights))
        variants.append((name, {**theirs, "sftmix_steps_micro": mistaken}))
    expected["known_mistakes"] = known_mistakes(expected, variants)
    data.write_json(out / "expected.json", expected)
    return expected


def definitions(max_len):
    """Each stage's definition, as expected.json states it."""
    return [
        f"Every conversation of data.jsonl rendered with the chat template and tokenized whole to "
        f"x_0..x_L, cut on the right to max_len + 1 = {max_len + 1} tokens. input_ids = "
        f"x_0..x_(L-1). labels are PRE-SHIFTED: labels[t] = x_(t+1) if x_(t+1) is trained, else "
        f"{IGNORE}. Trained: every token whose characters overlap an assistant turn's content or "
        f"its end-of-turn token {EOT}, so a token that straddles the prompt and the reply "
        f"(SmolLM2's 'ĊĠ': the header's newline and the reply's leading space) is trained; not "
        f"the newline after {EOT}, not prompts. From HF-style unshifted labels y over x_0..x_L: "
        f"input_ids = x[:-1], labels = y[1:].",
        "At the base weights (model/), per example: response_nll = -sum over positions t with "
        "labels[t] != -100 of log p(labels[t] | input_ids[:t+1]) (natural log, summed, not "
        "averaged); n_tokens = their number. The perplexity is exp(response_nll / n_tokens).",
        "inputs.reference_run: plain NTP from the base weights, 2 optimizer steps. Perplexities at "
        "the C = 2 checkpoints (after step 1 and after step 2) over the response tokens of stage "
        "1; confidence = -mean over checkpoints; variability = population std; split: sort by "
        "confidence, highest first, ties by id; the first half is confident.",
        "The first step of inputs.sftmix_run, at the base weights, on the global batch of its "
        "pairs (G = 2P rows): ntp_loss = L_NTP over all trained tokens of the G rows "
        "(token-weighted); mixup_loss = L_Mixup = sum over pairs p and their first n_p = "
        "min(n^c, n^u) response positions k (the k-th trained position of c with the k-th of u) "
        "of -(lam_p log q(y^c_k) + (1-lam_p) log q(y^u_k)), q = softmax(W (lam_p Z^c_k + "
        "(1-lam_p) Z^u_k)), Z the final-norm hidden state (HF hidden_states[-1]) at that "
        "position, divided by the number of mixed positions of the batch; loss = L_NTP + mu "
        "L_Mixup; grad_norm = the L2 norm of the gradient g of loss over all tensors; "
        "grad_entries = g at inputs.sftmix_run.grad_entries. Both are of g BEFORE clipping.",
        "inputs.sftmix_run: from the base weights, its S steps one after another, step k (from 0) "
        "at lr (k+1)/W while k < W = ceil(warmup_ratio S) (warm-up), then at lr (1 + cos(pi "
        "(k-W)/(S-W)))/2 (cosine to 0); after the backward the gradient is clipped, g *= min(1, "
        "grad_clip / (grad_norm + 1e-6)), then AdamW takes its step. Every step's lr, and steps 2 "
        "to S as stage 4 defines them, each at the weights after the step before.",
        "Frobenius norm of every tensor (HF names) after the steps of inputs.sftmix_run.",
        "inputs.sftmix_run again, each global batch split into micro-batches of whole pairs (of "
        "any size, over any number of ranks; the kit names the usual mistakes for micro-batches "
        "of one pair: 4 accumulation steps on one rank, or 2 on each of 2 ranks), the gradient "
        "accumulated over them before the step: every value of every step as stages 4 and 5 "
        "define it, L_NTP over the global batch's trained tokens and L_Mixup over its mixed "
        "positions, so the values are sftmix_steps' whatever the split.",
    ]


# ----------------------------------------------------------------------------- check


class Difference(Exception):
    """The first differing value of a stage: where, ours, theirs, the stage's largest relative
    difference (None where it means nothing: ids, token counts), a hint naming the usual mistake
    that gives theirs, and the stage's numbers (where, ours, theirs[, scale]) for explain()."""

    def __init__(self, where, ours, theirs, worst=None, hint="", items=()):
        super().__init__(where)
        self.where, self.ours, self.theirs, self.worst, self.hint = where, ours, theirs, worst, hint
        self.items = items


def close(ours, theirs, tol, scale=None):
    """|theirs - ours| <= atol + rtol * scale, the scale |ours| unless given."""
    return abs(theirs - ours) <= tol["atol"] + tol["rtol"] * (abs(ours) if scale is None else scale)


def is_num(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def is_ints(v):
    return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)


def validate(theirs, expected, path):
    """One InputError line for anything that is not the layout of expected.json's "expected"."""
    if not isinstance(theirs, dict):
        raise InputError(f'{path}: expected a JSON object with keys of expected.json\'s "expected"')
    ours, ids = expected["expected"], list(expected["expected"]["input_ids"])
    unknown = sorted(set(theirs) - set(ours))
    if unknown or not theirs:
        raise InputError(
            f"{path}: {f'unknown keys {unknown}' if unknown else 'no key'}; expected "
            f"one or more of {list(ours)}"
        )

    def check_type(key, value, ok, what):
        if not ok(value):
            raise InputError(f"{path}: {key}: expected {what}, got {json.dumps(value)[:60]}")

    C = expected["inputs"]["reference_run"]["dynamics"]
    per_example = {
        "input_ids": (is_ints, "a list of ints"),
        "labels": (is_ints, "a list of ints"),
        "response_nll": (is_num, "a number"),
        "n_tokens": (lambda v: isinstance(v, int), "an int"),
        "perplexities": (
            lambda v: isinstance(v, list) and len(v) == C and all(map(is_num, v)),
            f"a list of {C} numbers",
        ),
        "confidence": (is_num, "a number"),
        "variability": (is_num, "a number"),
    }
    for key, (ok, what) in per_example.items():
        if key not in theirs:
            continue
        check_type(key, theirs[key], lambda v: isinstance(v, dict), "an object {example id: value}")
        if set(theirs[key]) != set(ids):
            missing = sorted(set(ids) - set(theirs[key]))
            extra = sorted(set(theirs[key]) - set(ids))
            raise InputError(
                f"{path}: {key}: expected one entry per example id of the kit; "
                f"missing {missing[:3]}, unknown {extra[:3]}"
            )
        for i, v in theirs[key].items():
            check_type(f"{key}[{json.dumps(i)}]", v, ok, what)
    if "input_ids" in theirs and "labels" in theirs:
        for i in ids:
            if len(theirs["labels"][i]) != len(theirs["input_ids"][i]):
                raise InputError(
                    f"{path}: labels[{json.dumps(i)}]: expected as many as input_ids "
                    f"({len(theirs['input_ids'][i])}), got {len(theirs['labels'][i])}"
                )
    if "split" in theirs:
        split = theirs["split"]
        check_type(
            "split",
            split,
            lambda v: (
                isinstance(v, dict)
                and set(v) == {"confident", "unconfident"}
                and all(
                    isinstance(h, list) and all(isinstance(i, str) for i in h) for h in v.values()
                )
            ),
            '{"confident": [ids], "unconfident": [ids]}, ids as strings',
        )
        if sorted(split["confident"] + split["unconfident"]) != sorted(ids):
            raise InputError(
                f"{path}: split: expected every example id of the kit in exactly one half"
            )
    n_entries = len(expected["inputs"]["sftmix_run"]["grad_entries"])
    for run in ("sftmix_steps", "sftmix_steps_micro"):
        if run not in theirs:
            continue
        steps, S = theirs[run], len(ours[run])
        check_type(
            run,
            steps,
            lambda v: isinstance(v, list) and 1 <= len(v) <= S,
            f"a list of 1 to {S} step objects",
        )
        for k, step in enumerate(steps):
            check_type(
                f"{run}[{k}]",
                step,
                lambda v: isinstance(v, dict) and set(v) <= set(STEP_KEYS),
                f"an object with keys among {STEP_KEYS}",
            )
            for key, v in step.items():
                if key == "grad_entries":
                    check_type(
                        f"{run}[{k}].{key}",
                        v,
                        lambda v: (
                            isinstance(v, list) and len(v) == n_entries and all(map(is_num, v))
                        ),
                        f"a list of {n_entries} numbers",
                    )
                else:
                    check_type(f"{run}[{k}].{key}", v, is_num, "a number")
    if "weight_norms" in theirs:
        norms, names = theirs["weight_norms"], set(ours["weight_norms"])
        check_type(
            "weight_norms",
            norms,
            lambda v: isinstance(v, dict) and all(map(is_num, v.values())),
            "an object {tensor name: number}",
        )
        if set(norms) != names:
            raise InputError(
                f"{path}: weight_norms: expected the kit's tensor names; missing "
                f"{sorted(names - set(norms))[:3]}, unknown "
                f"{sorted(set(norms) - names)[:3]}"
            )


def compare_numbers(items, tol):
    """items: (where, ours, theirs[, scale]) in reading order. Raise Difference at the first out of
    tolerance, with every item. Returns the largest relative difference |theirs - ours| /
    (scale + atol / rtol), which is within tolerance up to rtol."""
    worst = max(
        (
            abs(t - o) / ((s[0] if s else abs(o)) + tol["atol"] / tol["rtol"])
            for _, o, t, *s in items
        ),
        default=0.0,
    )
    for where, o, t, *scale in items:
        if not close(o, t, tol, *scale):
            raise Difference(where, o, t, worst, items=items)
    return worst


def explain(items, known, tol):
    """The hint naming the known mistake that gives a stage's values: every value out of
    tolerance is the mistake's, and every value the mistake puts out of tolerance is out. Failing
    that, the mistake that gives the largest share (at least half) of the values either puts out:
    "closest to" it, with the share."""
    out = {where for where, o, t, *scale in items if not close(o, t, tol, *scale)}
    its, matched = {}, {}  # mistake: the values it puts out of tolerance; those theirs matches
    for where, o, t, *scale in items:
        for m in known.get(where, []):
            its.setdefault(m["mistake"], set()).add(where)
            if close(m["value"], t, tol, *scale):
                matched.setdefault(m["mistake"], set()).add(where)
    share, k, n, mistake = max(
        (
            (len(matched.get(m, ())) / len(w | out), len(matched.get(m, ())), len(w | out), m)
            for m, w in its.items()
        ),
        default=(0, 0, 0, ""),
    )
    if share == 1:
        return f"the values of: {mistake}"
    return f"closest to: {mistake} ({k} of {n} values)" if share >= 0.5 else ""


# The numbers of stages 3 to 7: (ours, theirs, expected) -> [(where, ours, theirs[, scale])].


def items_dynamics(ours, theirs, expected):
    ids = list(ours["input_ids"])
    items = [
        (f"perplexities[{json.dumps(i)}][{c}]", o, t)
        for i in ids
        if "perplexities" in theirs
        for c, (o, t) in enumerate(zip(ours["perplexities"][i], theirs["perplexities"][i]))
    ]
    for key in ("confidence", "variability"):  # a std of close values: on the perplexities' scale
        items += [
            (f"{key}[{json.dumps(i)}]", ours[key][i], theirs[key][i], max(ours["perplexities"][i]))
            for i in ids
            if key in theirs
        ]
    return items


def step_items(ours, theirs, expected, run, k, keys):
    """(where, ours, theirs) of step k of run's given values among keys, in reading order."""
    names, items = expected["inputs"]["sftmix_run"]["grad_entries"], []
    for key in keys:
        if key == "grad_entries" and key in theirs:
            items += [
                (f"{run}[{k}].grad_entries[{j}] ({n}{ix})", o, t)
                for j, ((n, ix), o, t) in enumerate(zip(names, ours[key], theirs[key]))
            ]
        elif key in theirs:
            items.append((f"{run}[{k}].{key}", ours[key], theirs[key]))
    return items


def items_step_1(ours, theirs, expected):
    return [
        x
        for step in theirs.get("sftmix_steps", [])[:1]
        for x in step_items(
            ours["sftmix_steps"][0], step, expected, "sftmix_steps", 0, STEP_KEYS[1:]
        )
    ]


def items_schedule(ours, theirs, expected):
    return [
        x
        for k, step in enumerate(theirs.get("sftmix_steps", []))
        for x in step_items(
            ours["sftmix_steps"][k], step, expected, "sftmix_steps", k, STEP_KEYS if k else ["lr"]
        )
    ]


def items_norms(ours, theirs, expected):
    return [
        (f"weight_norms[{n}]", o, theirs["weight_norms"][n])
        for n, o in ours["weight_norms"].items()
        if "weight_norms" in theirs
    ]


def items_micro(ours, theirs, expected):
    return [
        x
        for k, step in enumerate(theirs.get("sftmix_steps_micro", []))
        for x in step_items(
            ours["sftmix_steps_micro"][k], step, expected, "sftmix_steps_micro", k, STEP_KEYS
        )
    ]


NUMBERS = {3: items_dynamics, 4: items_step_1, 5: items_schedule, 6: items_norms, 7: items_micro}


# Each stage: (ours, theirs, expected) -> (the keys given, the largest relative difference), or
# raises Difference at its first difference.


def stage_tokens(ours, theirs, expected):
    for key in ("input_ids", "labels"):
        for i, o in ours[key].items():
            t = theirs.get(key, {}).get(i, o)
            if t != o:
                k = next((k for k, (a, b) in enumerate(zip(o, t)) if a != b), min(len(o), len(t)))
                got = t[k] if k < len(t) else "nothing"
                exp = o[k] if k < len(o) else "nothing"
                raise Difference(
                    f"{key}[{json.dumps(i)}][{k}] (of {len(o)}, theirs {len(t)})",
                    exp,
                    got,
                    hint=token_hint(
                        key, k, o, t, ours["labels"][i], expected["kit"]["end_of_turn"]
                    ),
                )
    return [k for k in ("input_ids", "labels") if k in theirs], None


def token_hint(key, k, o, t, labels, eot):
    """Name the usual tokenisation mistakes from where the first difference sits."""
    if key != "labels" or k >= min(len(o), len(t)):
        return (
            ""
            if len(o) == len(t)
            else "a different length: truncation, a missing or extra special token?"
        )
    if o[k] == IGNORE and k > 0 and labels[k - 1] == eot["id"]:
        return (
            f"the token after the end-of-turn token {eot['token']} (its newline) is "
            f"trained; it must not be"
        )
    if o[k] == eot["id"] and t[k] == IGNORE:
        return (
            f"the end-of-turn token {eot['token']} of an assistant turn is not trained; it must be"
        )
    if t[k] == IGNORE and (k == 0 or o[k - 1] == IGNORE):
        return (
            "the first token of an assistant turn is not trained: a token is trained when its "
            "characters overlap the reply, so one that straddles the prompt and the reply is "
            "trained"
        )
    return "trained where we do not train" if o[k] == IGNORE else "not trained where we train"


def stage_nll(ours, theirs, expected):
    ids = list(ours["input_ids"])
    for i in ids if "n_tokens" in theirs else []:
        if theirs["n_tokens"][i] != ours["n_tokens"][i]:
            whole = theirs["n_tokens"][i] == len(ours["input_ids"][i])
            raise Difference(
                f"n_tokens[{json.dumps(i)}]",
                ours["n_tokens"][i],
                theirs["n_tokens"][i],
                hint="n_tokens counts every position: the "
                "perplexity is over the whole sequence, not only the response"
                if whole
                else "",
            )
    items = [
        (f"response_nll[{json.dumps(i)}]", ours["response_nll"][i], theirs["response_nll"][i])
        for i in ids
        if "response_nll" in theirs
    ]
    return [k for k in ("response_nll", "n_tokens") if k in theirs], compare_numbers(
        items, TOLERANCE[2]
    )


def stage_dynamics(ours, theirs, expected):
    try:
        worst = compare_numbers(items_dynamics(ours, theirs, expected), TOLERANCE[3])
    except Difference as d:
        if d.where.startswith("confidence") and close(-d.ours, d.theirs, TOLERANCE[3], abs(d.ours)):
            d.hint = "confidence of the opposite sign; it is minus the mean perplexity"
        raise
    if "split" in theirs:
        wrong = sorted(set(theirs["split"]["confident"]) ^ set(ours["split"]["confident"]))
        if wrong:
            half = {i: h for h, members in ours["split"].items() for i in members}[wrong[0]]
            other = "unconfident" if half == "confident" else "confident"
            swapped = set(theirs["split"]["confident"]) == set(ours["split"]["unconfident"])
            raise Difference(
                f"split[{json.dumps(wrong[0])}] ({len(wrong)} examples in the other half)",
                half,
                other,
                hint="halves swapped: the confident half holds the highest confidence "
                "(the lowest perplexities)"
                if swapped
                else "sort by confidence, highest first, ties by id; the first half is confident",
            )
    return [k for k in STAGES[2][2] if k in theirs], worst


def stage_step_1(ours, theirs, expected):
    items = items_step_1(ours, theirs, expected)
    return ["sftmix_steps[0]"] * bool(items), compare_numbers(items, TOLERANCE[4])


def stage_schedule(ours, theirs, expected):
    steps = theirs.get("sftmix_steps", [])
    given = ["lr"] * any("lr" in s for s in steps) + [f"sftmix_steps[1:{len(steps)}]"] * (
        len(steps) > 1
    )
    return given, compare_numbers(items_schedule(ours, theirs, expected), TOLERANCE[5])


def stage_norms(ours, theirs, expected):
    worst = compare_numbers(items_norms(ours, theirs, expected), TOLERANCE[6])
    return ["weight_norms"] * ("weight_norms" in theirs), worst


def stage_micro(ours, theirs, expected):
    steps = theirs.get("sftmix_steps_micro", [])
    worst = compare_numbers(items_micro(ours, theirs, expected), TOLERANCE[7])
    return [f"sftmix_steps_micro[0:{len(steps)}]"] * bool(steps), worst


COMPARE = {
    1: stage_tokens,
    2: stage_nll,
    3: stage_dynamics,
    4: stage_step_1,
    5: stage_schedule,
    6: stage_norms,
    7: stage_micro,
}


KIT_KEYS = [
    ("expected", k)
    for k in (
        "input_ids",
        "labels",
        "response_nll",
        "n_tokens",
        "perplexities",
        "confidence",
        "variability",
        "split",
        "sftmix_steps",
        "weight_norms",
        "sftmix_steps_micro",
    )
] + [
    ("inputs", "reference_run", "dynamics"),
    ("inputs", "sftmix_run", "grad_entries"),
    ("kit", "end_of_turn"),
    ("known_mistakes",),
]


def read_kit(kit):
    """expected.json of the kit, with every key that check reads, else one InputError line."""
    path, remake = (
        kit / "expected.json",
        f"make it with `python scripts/conformance.py make --out {kit}`",
    )
    try:
        expected = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the kit ({e}); {remake}") from None
    for keys in KIT_KEYS:
        value = expected
        for depth, key in enumerate(keys):
            if not isinstance(value, dict) or key not in value:
                raise InputError(
                    f"{path}: no {'.'.join(keys[: depth + 1])}; expected a kit of "
                    f"this version's make: {remake}"
                )
            value = value[key]
    return expected


def check(kit, theirs_path):
    """Print the stage table; return 0 (every given stage agrees), 1 (a difference) or 2."""
    kit = Path(kit)
    expected = read_kit(kit)
    try:
        theirs = json.loads(Path(theirs_path).read_text("utf-8"))
    except OSError as e:
        raise InputError(f"{theirs_path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise InputError(f"{theirs_path}: invalid JSON: {e}") from None
    validate(theirs, expected, theirs_path)
    ours, known, differing, status = expected["expected"], expected["known_mistakes"], [], 0
    print(f"{'stage':<20} {'result':<10} details")
    for n, title, keys, deps in STAGES:
        try:
            given, worst = COMPARE[n](ours, theirs, expected)
            if not given:
                print(f"{n} {title:<18} not given")
                continue
            rtol = TOLERANCE[n].get("rtol")
            rel = f"; max rel diff {worst:.2g} (tolerance {rtol:g})" if worst else ""
            print(f"{n} {title:<18} {'agrees':<10} {', '.join(given)}{rel}")
        except Difference as d:
            status = 1
            d.hint = d.hint or explain(d.items, known, TOLERANCE[n])
            after = [k for k in deps if k in differing]
            print(
                f"{n} {title:<18} {'differs':<10} first at {d.where}: ours {d.ours}, theirs "
                f"{d.theirs}"
                + (f"; max rel diff {d.worst:.2g}" if d.worst is not None else "")
                + (f"; {d.hint}" if d.hint else "")
                + (
                    f" (stage {after[0]} differs first: fix that)"
                    if len(after) == 1
                    else f" (stages {', '.join(map(str, after))} differ first: fix those)"
                    if after
                    else ""
                )
            )
            differing.append(n)
    print(f"first difference at stage {differing[0]}" if differing else "every given stage agrees")
    return status


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("make", help="write the kit: model/, data.jsonl, expected.json")
    m.add_argument("--out", required=True, help="kit directory to write")
    c = sub.add_parser("check", help="compare THEIRS.json with the kit, stage by stage")
    c.add_argument("kit", help="kit directory written by make")
    c.add_argument("theirs", help='JSON with any subset of expected.json\'s "expected" keys')
    args = p.parse_args(argv)
    try:
        if args.command == "make":
            make(args.out)
            print(f"wrote {args.out}: model/, data.jsonl, expected.json")
        else:
            sys.exit(check(args.kit, args.theirs))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
