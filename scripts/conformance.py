"""Conformance kit: check another SFTMix implementation against this one, stage by stage.

    python scripts/conformance.py make --out KIT/             # the kit: model/, data.jsonl, expected.json
    python scripts/conformance.py check KIT/ THEIRS.json      # a table: agrees / differs / not given per stage

The kit is a tiny random Llama (a standard HF directory, so any framework loads it), a tokenizer (SmolLM2's
when .assets/SmolLM2-135M-Instruct is present, else a small byte-level BPE made for the kit; expected.json
says which), 16 conversations chosen to catch the usual mistakes, and expected.json with this
implementation's values for stated settings:

    stage 1  input_ids, labels              token ids and pre-shifted trained labels per example
    stage 2  response_nll, n_tokens         summed response NLL and its token count at the base weights
    stage 3  perplexities, confidence,      at the C = 2 checkpoints of a 2-step NTP reference run made by
             variability, split             train.py (order, batches, lr, AdamW all written in the file)
    stage 4  sftmix_steps                   two SFTMix steps from the base weights, pairs and lambda given:
                                            L_NTP, L_Mixup, L, grad norm, named gradient entries
    stage 5  weight_norms                   per-tensor norms of the weights after those two steps

THEIRS.json holds any subset of the keys of expected.json's "expected", in the same layout. `check` exits
0 when every given stage agrees, 1 on a difference, 2 on malformed input.
"""
import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import model as M  # noqa: E402
import sftmix  # noqa: E402
from data import IGNORE, InputError  # noqa: E402

SMOLLM2 = ROOT / ".assets" / "SmolLM2-135M-Instruct"
SETTINGS = {  # every stage's settings; train.py's flags of the same names
    "max_len": 96, "seed": 0, "global_batch": 8, "lr": 1e-2, "warmup_ratio": 0.0, "weight_decay": 0.1,
    "betas": [0.9, 0.999], "eps": 1e-8, "grad_clip": 1.0, "dynamics": 2, "alpha": 0.5, "mu": 0.2}
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, tie_word_embeddings=False)
INIT_STD = {"model.embed_tokens.weight": 1.0, "lm_head.weight": 0.5}  # peaked logits; other matrices 0.2, norms 1
GRAD_ENTRIES = [("lm_head.weight", "<|im_end|>", 0), ("model.embed_tokens.weight", "<|im_start|>", 1),
                ("model.layers.0.self_attn.q_proj.weight", 3, 5), ("model.layers.1.mlp.down_proj.weight", 7, 2),
                ("model.norm.weight", 4)]  # a token name stands for its id
EOT = "<|im_end|>"

LONG = " ".join(f"Step {i}: stir the sauce, taste it, and add a pinch of salt if it needs more." for i in range(1, 13))
CONVERSATIONS = [  # (id, messages as (role, content)); each catches a mistake named in its id
    ("plain", [("user", "What is the capital of France?"), ("assistant", "Paris.")]),
    ("system-turn", [("system", "You answer in one word."), ("user", "Colour of the sky?"), ("assistant", "Blue")]),
    ("two-assistant-turns", [("user", "Name a prime number."), ("assistant", "Seven."),
                             ("user", "And an even one?"), ("assistant", "Two, the only even prime.")]),
    ("three-turns-system", [("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Count to 3"),
                            ("assistant", "1, 2, 3"), ("user", "Backwards?"), ("assistant", "3, 2, 1")]),
    ("truncated-at-max-len", [("user", "How do I make tomato sauce?"), ("assistant", LONG)]),
    ("one-token-answer", [("user", "Is water wet? Answer yes or no."), ("assistant", "Yes")]),
    ("non-ascii", [("user", "Say hello in German and Japanese."), ("assistant", "Grüße aus Köln — こんにちは、東京! 🌸")]),
    ("leading-space-and-newline", [("user", "Reply with a leading space."), ("assistant", " \nokay, here it is")]),
    ("trailing-newlines", [("user", "End your answer with blank lines."), ("assistant", "Done.\n\n")]),
    ("code", [("user", "Python: add two numbers."), ("assistant", "```python\ndef add(a, b):\n    return a + b\n```")]),
    ("long-prompt-short-answer", [("user", "Here is a long story about a cat who sat on a mat, then on a chair, "
                                   "then on the roof, then on a fence, and finally on the warm kitchen floor. "
                                   "Where did the cat sit last?"), ("assistant", "The kitchen floor.")]),
    ("medium-answer", [("user", "Why is the sea salty?"), ("assistant", "Rivers carry dissolved minerals from rocks "
                                                           "into the sea; the water evaporates, the salt stays.")]),
    ("numbers", [("user", "What is 12 * 12?"), ("assistant", "12 * 12 = 144")]),
    ("quote-marks", [("user", "Quote a proverb."), ("assistant", "\"A stitch in time saves nine,\" as they say.")]),
    ("list-answer", [("user", "Three colours?"), ("assistant", "- red\n- green\n- blue")]),
    ("second-turn-long", [("user", "Hi!"), ("assistant", "Hi, how can I help?"), ("user", "Explain rain."),
                          ("assistant", "Water evaporates, rises, cools into droplets that form clouds, and falls "
                                        "back as rain when the droplets grow heavy enough.")]),
]
STAGES = [  # (number, title, keys, stages it depends on)
    (1, "tokens", ["input_ids", "labels"], []),
    (2, "response NLL", ["response_nll", "n_tokens"], [1]),
    (3, "dynamics, split", ["perplexities", "confidence", "variability", "split"], [1, 2]),
    (4, "SFTMix steps", ["sftmix_steps"], [1, 2]),
    (5, "weight norms", ["weight_norms"], [4]),
]
TOLERANCE = {  # |theirs - ours| <= atol + rtol |ours|; transformers and train.py differ by at most 3e-6 relative
    1: {"exact": True},
    2: {"rtol": 1e-5, "atol": 1e-4},
    3: {"rtol": 1e-4, "atol": 1e-6, "split": "exact"},
    4: {"rtol": 1e-4, "atol": 1e-7},
    5: {"rtol": 1e-5, "atol": 1e-6},
}
STEP_KEYS = ["ntp_loss", "mixup_loss", "loss", "grad_norm", "grad_entries"]


# ----------------------------------------------------------------------------- make

def kit_tokenizer(out, texts):
    """A byte-level BPE of 512 tokens trained on the kit's own text, with ChatML's special tokens and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<|endoftext|>", "<|im_start|>", EOT], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    template = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
                "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
                "{% endif %}")
    data.write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None, "eos_token": EOT, "pad_token": EOT,
        "unk_token": "<|endoftext|>", "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False, "chat_template": template})


def tiny_model(vocab_size):
    """The kit's model: a 2-layer Llama, seeded normal weights (INIT_STD, else 0.2), RMSNorm weights 1."""
    torch.manual_seed(0)
    tiny = M.Transformer(M.ModelArgs(**TINY, vocab_size=vocab_size))
    with torch.no_grad():
        for name, p in tiny.named_parameters():
            p.normal_(0, INIT_STD.get(name, 0.2)) if p.dim() > 1 else p.fill_(1.0)
    return tiny


def reference_run(kit, work):
    """Stage 3 from the project's trainer: a 2-step NTP run with dynamics at C = 2 checkpoints."""
    s = SETTINGS
    cmd = ["train.py", "--mode", "ntp", "--model", "model", "--data", "data.jsonl", "--dynamics", str(s["dynamics"]),
           "--global-batch", str(s["global_batch"]), "--micro-batch", "4", "--lr", str(s["lr"]),
           "--warmup-ratio", str(s["warmup_ratio"]), "--weight-decay", str(s["weight_decay"]),
           "--betas", *map(str, s["betas"]), "--grad-clip", str(s["grad_clip"]), "--max-len", str(s["max_len"]),
           "--seed", str(s["seed"]), "--dtype", "fp32", "--epochs", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / cmd[0]), *cmd[1:], "--out", str(work / "ref")], cwd=kit, env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"the reference run failed:\n{r.stderr[-3000:]}")
    ids, perps = sftmix.read_dynamics(work / "ref" / "dynamics.jsonl")
    lr = [json.loads(line)["lr"] for line in (work / "ref" / "metrics.jsonl").read_text().splitlines()]
    return " ".join(["python", *cmd, "--out", "OUT"]), ids, perps, lr


def entry_index(tok, entry):
    return [tok.hf.token_to_id(i) if isinstance(i, str) else i for i in entry[1:]]


def sftmix_steps(kit, samples, pairs, lams, lrs, tok):
    """Stage 4 from the definitions, each step on one whole global batch of P pairs (G = 2P rows):

        L_NTP   = sum of -log p over the trained tokens of the G rows / their number
        L_Mixup = sftmix.mixup_loss over the first n = min(n^c, n^u) response positions of every pair (mean)
        L       = L_NTP + mu L_Mixup;  one backward; grad norm over all tensors; clip; AdamW at lr of the step
    Returns (the step records, known-mistake values of step 1, the weights after both steps).
    """
    s, by_id = SETTINGS, {x.id: x for x in samples}
    model = M.load_pretrained(kit / "model")
    decayed = [p for p in model.parameters() if p.dim() >= 2]  # as train.py: matrices decay, RMSNorm weights do not
    groups = [{"params": decayed, "weight_decay": s["weight_decay"]},
              {"params": [p for p in model.parameters() if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=lrs[0], betas=tuple(s["betas"]), eps=s["eps"])
    params = dict(model.named_parameters())
    records, mistakes = [], {}
    for step, (step_pairs, lam, lr) in enumerate(zip(pairs, lams, lrs)):
        b = data.collate([by_id[c] for c, _ in step_pairs] + [by_id[u] for _, u in step_pairs], tok.pad_id)
        labels, P = b["labels"], len(step_pairs)  # (G, T)
        logits, hidden = model(b["input_ids"], return_hidden=True)  # (G, T, V), (G, T, D)
        ntp = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE)
        lam = torch.tensor(lam)  # (P,) float32
        W = model.lm_head.weight
        mix = sftmix.mixup_loss(hidden[:P], labels[:P], hidden[P:], labels[P:], lam, W)
        loss = ntp + s["mu"] * mix
        if step == 0:
            mistakes = known_mistake_values(logits, hidden, labels, lam, W)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
        entries = [params[e[0]].grad[tuple(entry_index(tok, e))].item() for e in GRAD_ENTRIES]
        records.append({"ntp_loss": ntp.item(), "mixup_loss": mix.item(), "loss": loss.item(),
                        "grad_norm": grad_norm.item(), "grad_entries": entries})
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return records, mistakes, model


@torch.no_grad()
def known_mistake_values(logits, hidden, labels, lam, W):
    """Step 1's L_NTP and L_Mixup under the usual mistakes, so that `check` can name one it meets."""
    P = len(lam)
    per_example = [F.cross_entropy(logits[i], labels[i], ignore_index=IGNORE) for i in range(len(labels))]
    c, u = labels[:P], labels[P:]
    both = (c != IGNORE) & (u != IGNORE)  # the same position t trained in both
    same_t = sftmix.mixup_loss(hidden[:P], torch.where(both, c, IGNORE), hidden[P:], torch.where(both, u, IGNORE),
                               lam, W)
    from_end = sftmix.mixup_loss(hidden[:P].flip(1), c.flip(1), hidden[P:].flip(1), u.flip(1), lam, W)  # from the last
    return {
        "ntp_loss": [("a mean of per-example means; L_NTP weighs every trained token of the global batch the same",
                      torch.stack(per_example).mean().item())],
        "mixup_loss": [("lambda applied to the unconfident member of each pair; Z~ = lam Z^c + (1 - lam) Z^u",
                        sftmix.mixup_loss(hidden[P:], u, hidden[:P], c, lam, W).item()),
                       ("Mixup over unaligned positions (the same position t in both examples); the k-th response "
                        "position of c is mixed with the k-th of u", same_t.item()),
                       ("Mixup over positions aligned from the last response position; they are aligned from the "
                        "first", from_end.item())]}


def make(out, smollm2=SMOLLM2):
    """Write the kit into out: model/ (HF directory with tokenizer), data.jsonl, expected.json."""
    torch.set_num_threads(1)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    records = [{"id": i, "messages": [{"role": r, "content": c} for r, c in turns]} for i, turns in CONVERSATIONS]
    data.write_json(out / "data.jsonl", records, lines=True)
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if (Path(smollm2) / "tokenizer.json").is_file():
            tok_dir = Path(smollm2)
            tok_about = "SmolLM2-135M-Instruct's tokenizer (49152 tokens, ChatML, default system prompt)"
        else:
            tok_dir = work / "tokenizer"
            kit_tokenizer(tok_dir, [c for _, turns in CONVERSATIONS for _, c in turns])
            tok_about = "a byte-level BPE of 512 tokens made for the kit (ChatML, no default system prompt)"
        tok = data.load_tokenizer(tok_dir)
        base = tiny_model(tok.hf.get_vocab_size())
        M.save_pretrained(base, out / "model", tokenizer_dir=tok_dir)
        tok = data.load_tokenizer(out / "model")
        samples, stats = data.load_dataset(out / "data.jsonl", tok, max_len=SETTINGS["max_len"], verbose=False)
        assert stats["truncated"] == 1 and stats["dropped"] == 0, stats
        ids = [x.id for x in samples]

        with contextlib.redirect_stderr(io.StringIO()):  # its progress bar
            nll = sftmix.response_nll(base, samples, len(samples), torch.device("cpu"))  # stage 2
        command, dyn_ids, perps, ref_lr = reference_run(out, work)  # stage 3
        assert dyn_ids == ids
        conf, var = sftmix.confidence(perps), sftmix.variability(perps)
        confident, unconfident = sftmix.split_by_confidence(ids, conf)
        G, seed = SETTINGS["global_batch"], SETTINGS["seed"]
        order = data.shuffled_order(len(ids), seed, 0)
        batches = [[ids[i] for i in order[b * G:(b + 1) * G]] for b in range(len(ids) // G)]
        pair_batches = sftmix.paired_batches(confident, unconfident, G, seed, 0)  # stage 4
        pairs = [list(zip(b[:G // 2], b[G // 2:])) for b in pair_batches]
        lams = [sftmix.sample_lambda(SETTINGS["alpha"], G // 2, seed, step).tolist() for step in range(len(pairs))]
        steps, mistakes, trained = sftmix_steps(out, samples, pairs, lams, ref_lr, tok)

    ranked = sorted(conf.tolist(), reverse=True)
    s = SETTINGS
    expected = {
        "about": __doc__.split("\n\n")[0],
        "kit": {"tokenizer": tok_about, "model": "model/ (LlamaForCausalLM, fp32, untied LM head)",
                "data": "data.jsonl (chat messages, one conversation per line)",
                "prompt_format": "ChatML as in the tokenizer's chat_template; tokenized whole, special tokens parsed",
                "dtype": "float32 everywhere", "made_by": "python scripts/conformance.py make --out KIT/"},
        "stages": [{
            "stage": n, "title": title, "keys": keys, "depends_on": deps, "tolerance": TOLERANCE[n],
            "definition": definition} for (n, title, keys, deps), definition in zip(STAGES, [
                f"Every conversation of data.jsonl rendered with the chat template and tokenized whole to x_0..x_L, "
                f"cut on the right to max_len + 1 = {s['max_len'] + 1} tokens. input_ids = x_0..x_(L-1). labels are "
                f"PRE-SHIFTED: labels[t] = x_(t+1) if x_(t+1) is trained, else {IGNORE}. Trained: every token of an "
                f"assistant turn's content and its end-of-turn token {EOT}; not the newline after it, not prompts. "
                f"From HF-style unshifted labels y over x_0..x_L: input_ids = x[:-1], labels = y[1:].",
                "At the base weights (model/), per example: response_nll = -sum over positions t with labels[t] != "
                "-100 of log p(labels[t] | input_ids[:t+1]) (natural log, summed, not averaged); n_tokens = their "
                "number. The perplexity is exp(response_nll / n_tokens).",
                "inputs.reference_run: plain NTP from the base weights, 2 optimizer steps. Perplexities at the C = 2 "
                "checkpoints (after step 1 and after step 2) over the response tokens of stage 1; confidence = "
                "-mean over checkpoints; variability = population std; split: sort by confidence, highest first, "
                "ties by id; the first half is confident.",
                "inputs.sftmix_steps: from the base weights again, 2 steps, each on the global batch of its pairs "
                "(G = 2P rows): L_NTP over all trained tokens of the G rows (token-weighted); L_Mixup = "
                "sum over pairs p and their first n_p = min(n^c, n^u) response positions k (the k-th trained "
                "position of c with the k-th of u) of -(lam_p log q(y^c_k) + (1-lam_p) log q(y^u_k)), q = "
                "softmax(W (lam_p Z^c_k + (1-lam_p) Z^u_k)), Z the final-norm hidden state (HF hidden_states[-1]) "
                "at that position, divided by the number of mixed positions of the batch; loss = L_NTP + mu L_Mixup; "
                "grad_norm = L2 norm of the gradient of loss over all tensors, before clipping; grad_entries = the "
                "gradient (before clipping) at inputs.sftmix_steps.grad_entries. Then clip to grad_clip and take "
                "the AdamW step at that step's lr; step 2 is computed at the weights after step 1.",
                "Frobenius norm of every tensor (HF names) after the two steps of stage 4."])],
        "settings": s,
        "inputs": {
            "reference_run": {
                "command": command, "start": "the base weights, model/", "steps": len(batches),
                "batches": batches, "order": "data.shuffled_order(16, seed, 0) cut into global batches of "
                                             f"{G}; the loss of a step is over its whole batch (token-weighted)",
                "lr": ref_lr, "schedule": "linear warm-up over ceil(warmup_ratio * 2) steps, then cosine to 0",
                "adamw": {"betas": s["betas"], "eps": s["eps"], "weight_decay": s["weight_decay"],
                          "decayed": "tensors of 2 or more dimensions only (embeddings, projections, LM head); "
                                     "the RMSNorm weights are not decayed",
                          "decoupled": "p -= lr * weight_decay * p, as torch.optim.AdamW"},
                "grad_clip": f"{s['grad_clip']}: g *= min(1, grad_clip / (norm + 1e-6)) before the AdamW step",
                "checkpoints_after_steps": [1, 2],
                "median_confidence_gap": ranked[len(ranked) // 2 - 1] - ranked[len(ranked) // 2]},
            "sftmix_steps": {
                "start": "the base weights, model/ (not the reference run's)", "pairs": pairs,
                "pairs_are": "[confident id, unconfident id]; the batch of a step is its pairs' examples",
                "lambda": lams, "lr": ref_lr, "mu": s["mu"], "adamw": "as reference_run",
                "grad_clip": "as reference_run",
                "grad_entries": [[e[0], entry_index(tok, e)] for e in GRAD_ENTRIES]}},
        "expected": {
            "input_ids": {x.id: x.input_ids for x in samples},
            "labels": {x.id: x.labels for x in samples},
            "response_nll": {i: nll[i][0] for i in ids},
            "n_tokens": {i: nll[i][1] for i in ids},
            "perplexities": {i: p.tolist() for i, p in zip(ids, perps)},
            "confidence": dict(zip(ids, conf.tolist())),
            "variability": dict(zip(ids, var.tolist())),
            "split": {"confident": confident, "unconfident": unconfident},
            "sftmix_steps": steps,
            "weight_norms": {name: t.norm().item() for name, t in trained.state_dict().items()}},
        "known_mistakes": {f"sftmix_steps[0].{k}": [{"mistake": m, "value": v} for m, v in items]
                           for k, items in mistakes.items()},
    }
    data.write_json(out / "expected.json", expected)
    return expected


# ----------------------------------------------------------------------------- check

class Difference(Exception):
    """The first differing value of a stage: where, ours, theirs, the largest |difference| in the stage (None
    where it means nothing: ids, token counts), and a hint naming the usual mistake that gives theirs."""

    def __init__(self, where, ours, theirs, worst=None, hint=""):
        super().__init__(where)
        self.where, self.ours, self.theirs, self.worst, self.hint = where, ours, theirs, worst, hint


def close(ours, theirs, tol, scale=None):
    """|theirs - ours| <= atol + rtol * scale, the scale |ours| unless given."""
    return abs(theirs - ours) <= tol["atol"] + tol["rtol"] * (abs(ours) if scale is None else scale)


def validate(theirs, expected, path):
    """One InputError line for anything that is not the layout of expected.json's "expected"."""
    if not isinstance(theirs, dict):
        raise InputError(f"{path}: expected a JSON object with keys of expected.json's \"expected\"")
    ours, ids = expected["expected"], list(expected["expected"]["input_ids"])
    unknown = sorted(set(theirs) - set(ours))
    if unknown or not theirs:
        raise InputError(f"{path}: {f'unknown keys {unknown}' if unknown else 'no key'}; expected one or more of "
                         f"{list(ours)}")

    def is_num(x):
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    def check_type(key, value, ok, what):
        if not ok(value):
            raise InputError(f"{path}: {key}: expected {what}, got {json.dumps(value)[:60]}")

    C = expected["settings"]["dynamics"]
    def is_ints(v):
        return isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v)

    per_example = {"input_ids": (is_ints, "a list of ints"), "labels": (is_ints, "a list of ints"),
                   "response_nll": (is_num, "a number"), "n_tokens": (lambda v: isinstance(v, int), "an int"),
                   "perplexities": (lambda v: isinstance(v, list) and len(v) == C and all(map(is_num, v)),
                                    f"a list of {C} numbers"),
                   "confidence": (is_num, "a number"), "variability": (is_num, "a number")}
    for key, (ok, what) in per_example.items():
        if key not in theirs:
            continue
        check_type(key, theirs[key], lambda v: isinstance(v, dict), "an object {example id: value}")
        if set(theirs[key]) != set(ids):
            missing, extra = sorted(set(ids) - set(theirs[key])), sorted(set(theirs[key]) - set(ids))
            raise InputError(f"{path}: {key}: expected one entry per example id of the kit; missing {missing[:3]}, "
                             f"unknown {extra[:3]}")
        for i, v in theirs[key].items():
            check_type(f"{key}[{json.dumps(i)}]", v, ok, what)
    if "input_ids" in theirs and "labels" in theirs:
        for i in ids:
            if len(theirs["labels"][i]) != len(theirs["input_ids"][i]):
                raise InputError(f"{path}: labels[{json.dumps(i)}]: expected as many as input_ids "
                                 f"({len(theirs['input_ids'][i])}), got {len(theirs['labels'][i])}")
    if "split" in theirs:
        split = theirs["split"]
        check_type("split", split, lambda v: isinstance(v, dict) and set(v) == {"confident", "unconfident"} and all(
            isinstance(h, list) for h in v.values()), '{"confident": [ids], "unconfident": [ids]}')
        if sorted(split["confident"] + split["unconfident"]) != sorted(ids):
            raise InputError(f"{path}: split: expected every example id of the kit in exactly one half")
    if "sftmix_steps" in theirs:
        steps, n_entries = theirs["sftmix_steps"], len(expected["inputs"]["sftmix_steps"]["grad_entries"])
        check_type("sftmix_steps", steps, lambda v: isinstance(v, list) and 1 <= len(v) <= len(ours["sftmix_steps"]),
                   f"a list of 1 to {len(ours['sftmix_steps'])} step objects")
        for k, step in enumerate(steps):
            check_type(f"sftmix_steps[{k}]", step, lambda v: isinstance(v, dict) and set(v) <= set(STEP_KEYS),
                       f"an object with keys among {STEP_KEYS}")
            for key, v in step.items():
                ok = (lambda v: isinstance(v, list) and len(v) == n_entries and all(map(is_num, v))) \
                    if key == "grad_entries" else is_num
                check_type(f"sftmix_steps[{k}].{key}", v, ok,
                           f"a list of {n_entries} numbers" if key == "grad_entries" else "a number")
    if "weight_norms" in theirs:
        norms = theirs["weight_norms"]
        check_type("weight_norms", norms, lambda v: isinstance(v, dict) and all(map(is_num, v.values())),
                   "an object {tensor name: number}")
        if set(norms) != set(ours["weight_norms"]):
            raise InputError(f"{path}: weight_norms: expected the kit's tensor names; missing "
                             f"{sorted(set(ours['weight_norms']) - set(norms))[:3]}, unknown "
                             f"{sorted(set(norms) - set(ours['weight_norms']))[:3]}")


def compare_numbers(items, tol):
    """items: (where, ours, theirs[, scale]) in reading order. Raise Difference at the first out of tolerance."""
    worst = max((abs(t - o) for _, o, t, *_ in items), default=0.0)
    for where, o, t, *scale in items:
        if not close(o, t, tol, *scale):
            raise Difference(where, o, t, worst)
    return worst


def stage_tokens(ours, theirs, expected, tok_names):
    for key in ("input_ids", "labels"):
        for i, o in ours[key].items():
            t = theirs.get(key, {}).get(i, o)
            if t != o:
                k = next((k for k, (a, b) in enumerate(zip(o, t)) if a != b), min(len(o), len(t)))
                got = t[k] if k < len(t) else "nothing"
                exp = o[k] if k < len(o) else "nothing"
                raise Difference(f"{key}[{json.dumps(i)}][{k}] (of {len(o)}, theirs {len(t)})", exp, got,
                                 hint=token_hint(key, k, o, t, ours["labels"][i], tok_names))
    return 0


def token_hint(key, k, o, t, labels, names):
    """Name the usual tokenisation mistakes from where the first difference sits."""
    if key != "labels" or k >= min(len(o), len(t)):
        return "" if len(o) == len(t) else "a different length: truncation, a missing or extra special token?"
    previous = names.get(labels[k - 1]) if k > 0 else None
    if o[k] == IGNORE and previous == EOT:
        return f"the token after the end-of-turn token {EOT} (its newline) is trained; it must not be"
    if names.get(o[k]) == EOT and t[k] == IGNORE:
        return f"the end-of-turn token {EOT} of an assistant turn is not trained; it must be"
    return "trained where we do not train" if o[k] == IGNORE else "not trained where we train"


def stage_nll(ours, theirs, expected, _):
    ids = list(ours["input_ids"])
    for i in ids if "n_tokens" in theirs else []:
        if theirs["n_tokens"][i] != ours["n_tokens"][i]:
            hint = "n_tokens counts every position: the perplexity is over the whole sequence, not only the " \
                   "response" if theirs["n_tokens"][i] == len(ours["input_ids"][i]) else ""
            raise Difference(f"n_tokens[{json.dumps(i)}]", ours["n_tokens"][i], theirs["n_tokens"][i], hint=hint)
    items = [(f"response_nll[{json.dumps(i)}]", ours["response_nll"][i], theirs["response_nll"][i])
             for i in ids if "response_nll" in theirs]
    return compare_numbers(items, TOLERANCE[2])


def stage_dynamics(ours, theirs, expected, _):
    ids, tol = list(ours["input_ids"]), TOLERANCE[3]
    items = [(f"perplexities[{json.dumps(i)}][{c}]", o, t) for i in ids if "perplexities" in theirs
             for c, (o, t) in enumerate(zip(ours["perplexities"][i], theirs["perplexities"][i]))]
    for key in ("confidence", "variability"):  # a std of close values: its tolerance is on the perplexities' scale
        items += [(f"{key}[{json.dumps(i)}]", ours[key][i], theirs[key][i], max(ours["perplexities"][i]))
                  for i in ids if key in theirs]
    worst = compare_numbers(items, tol)
    if "split" in theirs:
        wrong = sorted(set(theirs["split"]["confident"]) ^ set(ours["split"]["confident"]))
        if wrong:
            half = {i: h for h, members in ours["split"].items() for i in members}[wrong[0]]
            other = "unconfident" if half == "confident" else "confident"
            raise Difference(f"split[{json.dumps(wrong[0])}] ({len(wrong)} examples in the other half)", half, other,
                             hint="sort by confidence, highest first, ties by id; the first half is confident")
    return worst


def stage_steps(ours, theirs, expected, _):
    mistakes, names = expected["known_mistakes"], expected["inputs"]["sftmix_steps"]["grad_entries"]
    items = []
    for k, step in enumerate(theirs.get("sftmix_steps", [])):
        for key in STEP_KEYS:
            if key == "grad_entries" and key in step:
                items += [(f"sftmix_steps[{k}].grad_entries[{j}] ({n}{ix})", o, t)
                          for j, ((n, ix), o, t) in enumerate(zip(names, ours["sftmix_steps"][k][key], step[key]))]
            elif key in step:
                items.append((f"sftmix_steps[{k}].{key}", ours["sftmix_steps"][k][key], step[key]))
    try:
        return compare_numbers(items, TOLERANCE[4])
    except Difference as d:
        d.hint = next((f"the value of: {m['mistake']}" for m in mistakes.get(d.where, [])
                       if close(m["value"], d.theirs, TOLERANCE[4])), "")
        raise


def stage_norms(ours, theirs, expected, _):
    items = [(f"weight_norms[{n}]", o, theirs["weight_norms"][n]) for n, o in ours["weight_norms"].items()
             if "weight_norms" in theirs]
    return compare_numbers(items, TOLERANCE[5])


def check(kit, theirs_path):
    """Print the stage table; return 0 (every given stage agrees), 1 (a difference) or 2 (bad input)."""
    kit = Path(kit)
    try:
        expected = json.loads((kit / "expected.json").read_text("utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{kit / 'expected.json'}: cannot read the kit ({e}); make it with "
                         f"`python scripts/conformance.py make --out {kit}`") from None
    try:
        theirs = json.loads(Path(theirs_path).read_text("utf-8"))
    except OSError as e:
        raise InputError(f"{theirs_path}: cannot read: {e.strerror}") from None
    except ValueError as e:
        raise InputError(f"{theirs_path}: invalid JSON: {e}") from None
    validate(theirs, expected, theirs_path)
    special = json.loads((kit / "model" / "tokenizer.json").read_text("utf-8"))["added_tokens"]
    tok_names = {t["id"]: t["content"] for t in special}  # for the hints of stage 1
    compare = {1: stage_tokens, 2: stage_nll, 3: stage_dynamics, 4: stage_steps, 5: stage_norms}
    ours, differing, status = expected["expected"], [], 0
    print(f"{'stage':<20} {'result':<10} details")
    for n, title, keys, deps in STAGES:
        given = [k for k in keys if k in theirs]
        if not given:
            print(f"{n} {title:<18} not given")
            continue
        try:
            worst = compare[n](ours, theirs, expected, tok_names)
            print(f"{n} {title:<18} {'agrees':<10} {', '.join(given)}" + (f"; max |diff| {worst:.3g}" if worst else ""))
        except Difference as d:
            status = 1
            after = [k for k in deps if k in differing]
            print(f"{n} {title:<18} {'differs':<10} first at {d.where}: ours {d.ours}, theirs {d.theirs}"
                  + (f"; max |diff| {d.worst:.3g}" if d.worst is not None else "")
                  + (f"; {d.hint}" if d.hint else "")
                  + (f" (stage {after[0]} differs first: fix that)" if len(after) == 1 else
                     f" (stages {', '.join(map(str, after))} differ first: fix those)" if after else ""))
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
    c.add_argument("theirs", help="JSON with any subset of the keys of expected.json's \"expected\"")
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
