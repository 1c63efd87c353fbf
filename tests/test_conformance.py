"""The conformance kit: deterministic, reachable from transformers alone, agreeing with train.py, and naming the
stage of each usual mistake."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import conformance as kit_tool  # noqa: E402
import conformance_transformers as cx  # noqa: E402


@pytest.fixture(scope="module")
def kit(smollm2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("kit")
    kit_tool.make(out, smollm2=smollm2_dir)
    return out


@pytest.fixture(scope="module")
def expected(kit):
    return json.loads((kit / "expected.json").read_text())


@pytest.fixture(scope="module")
def theirs(kit):
    """The transformers-only worked example's submission (stages 1, 2, 4, 5)."""
    return cx.compute(kit)


def run_check(kit, submission, tmp_path):
    """(exit status, output lines) of `conformance.py check` on a submission."""
    path = tmp_path / "theirs.json"
    path.write_text(json.dumps(submission))
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "conformance.py"), "check", str(kit), str(path)],
                       capture_output=True, text=True)
    return r.returncode, (r.stdout + r.stderr).strip().splitlines()


def stage_lines(lines):
    """{stage number: its table line}."""
    return {int(line[0]): line for line in lines if line[:1].isdigit()}


@pytest.mark.parametrize("tokenizer", ["smollm2", "kit tokenizer"])
def test_two_makes_write_byte_identical_kits(tokenizer, smollm2_dir, tmp_path):
    source = smollm2_dir if tokenizer == "smollm2" else tmp_path / "absent"
    for name in ("a", "b"):
        kit_tool.make(tmp_path / name, smollm2=source)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert [str(f) for f in files] == ["data.jsonl", "expected.json", "model/config.json", "model/model.safetensors",
                                       "model/tokenizer.json", "model/tokenizer_config.json"]
    for f in files:
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    about = json.loads((tmp_path / "a" / "expected.json").read_text())["kit"]["tokenizer"]
    assert about.startswith("SmolLM2" if tokenizer == "smollm2" else "a byte-level BPE")


def test_kit_holds_the_cases_it_promises(kit, expected):
    conversations = [json.loads(line) for line in (kit / "data.jsonl").read_text().splitlines()]
    roles = [[m["role"] for m in c["messages"]] for c in conversations]
    assert len(conversations) == 16
    assert any(r[0] == "system" for r in roles) and any(r.count("assistant") >= 2 for r in roles)
    assert any(not m["content"].isascii() for c in conversations for m in c["messages"])
    n = expected["expected"]["n_tokens"]
    assert max(n.values()) >= 20 * min(n.values())  # responses of very different lengths
    lengths = [len(x) for x in expected["expected"]["input_ids"].values()]
    assert lengths.count(expected["settings"]["max_len"]) == 1  # one example cut at max_len
    hf = LlamaForCausalLM.from_pretrained(kit / "model")  # the model is a standard HF directory
    assert hf.config.vocab_size == len(AutoTokenizer.from_pretrained(kit / "model"))
    for stage in expected["stages"]:
        assert {"tolerance", "depends_on", "definition", "keys"} <= set(stage)


def reference_run_with_transformers(kit, expected, examples):
    """Stage 3 from what expected.json states about the reference run, in transformers: the two NTP steps on
    the stated batches and lr with the stated AdamW and clipping, the perplexities after each, the split."""
    s, run = expected["settings"], expected["inputs"]["reference_run"]
    model = LlamaForCausalLM.from_pretrained(kit / "model", dtype=torch.float32)
    pad_id = AutoTokenizer.from_pretrained(kit / "model").pad_token_id
    optimizer = cx.adamw(model, s)
    perplexities = {i: [] for i in examples}
    for batch, lr in zip(run["batches"], run["lr"]):
        input_ids, labels, attention_mask = cx.collate([examples[i] for i in batch], pad_id)
        cx.ntp_loss(model(input_ids=input_ids, attention_mask=attention_mask).logits, labels).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), s["grad_clip"])
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
        optimizer.zero_grad()
        for i, (x, y) in examples.items():
            nll, n = cx.response_nll(model, x, y)
            perplexities[i].append(math.exp(nll / n))
    confidence = {i: -statistics.fmean(p) for i, p in perplexities.items()}
    ranked = sorted(examples, key=lambda i: (-confidence[i], i))
    return {"perplexities": perplexities, "confidence": confidence,
            "variability": {i: statistics.pstdev(p) for i, p in perplexities.items()},
            "split": {"confident": ranked[:len(ranked) // 2], "unconfident": ranked[len(ranked) // 2:]}}


def test_transformers_example_agrees_at_every_stage(kit, expected, theirs, tmp_path):
    examples = {i: (theirs["input_ids"][i], theirs["labels"][i]) for i in theirs["input_ids"]}
    stage3 = reference_run_with_transformers(kit, expected, examples)
    status, lines = run_check(kit, theirs, tmp_path)
    assert status == 0, lines
    assert "not given" in stage_lines(lines)[3]
    status, lines = run_check(kit, {**theirs, **stage3}, tmp_path)
    assert status == 0, lines
    assert all(" agrees " in line for line in stage_lines(lines).values()), lines
    assert lines[-1] == "every given stage agrees"


def test_stage_4_and_5_agree_with_train_py_sftmix_on_the_same_split_and_seed(kit, expected, tmp_path):
    s = expected["settings"]
    split = tmp_path / "split.json"
    split.write_text(json.dumps(expected["expected"]["split"]))
    flags = {"--global-batch": s["global_batch"], "--micro-batch": 2, "--lr": s["lr"],
             "--warmup-ratio": s["warmup_ratio"], "--weight-decay": s["weight_decay"], "--grad-clip": s["grad_clip"], "--max-len": s["max_len"],
             "--seed": s["seed"], "--alpha": s["alpha"], "--mu": s["mu"], "--dtype": "fp32"}
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--mode", "sftmix", "--split", str(split), "--model",
                    str(kit / "model"), "--data", str(kit / "data.jsonl"), "--out", str(tmp_path / "run"),
                    "--betas", *map(str, s["betas"]), *[str(x) for kv in flags.items() for x in kv]],
                   check=True, capture_output=True)
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps, tol = expected["expected"]["sftmix_steps"], expected["stages"][3]["tolerance"]
    assert len(metrics) == len(steps) == 2
    assert [m["lr"] for m in metrics] == expected["inputs"]["sftmix_steps"]["lr"]
    for m, step in zip(metrics, steps):
        for key in ("ntp_loss", "mixup_loss", "grad_norm"):
            assert m[key] == pytest.approx(step[key], rel=tol["rtol"], abs=tol["atol"]), key
    final, tol = load_file(str(tmp_path / "run" / "final" / "model.safetensors")), expected["stages"][4]["tolerance"]
    for name, norm in expected["expected"]["weight_norms"].items():
        assert final[name].norm().item() == pytest.approx(norm, rel=tol["rtol"], abs=tol["atol"]), name


# ----------------------------------------------------------------------------- deliberately wrong submissions

def extend_to_the_newline(trained_spans):
    def spans(tok, messages):
        text, spans = trained_spans(tok, messages)
        return text, [(start, end + 1) for start, end in spans]  # the "\n" after <|im_end|> too
    return spans


def mean_of_example_means(logits, labels):
    per_example = [torch.nn.functional.cross_entropy(l, y, ignore_index=cx.IGNORE) for l, y in zip(logits, labels)]
    return torch.stack(per_example).mean()


def wrong_mixup(kind):
    """The Mixup loss written out per pair with one mistake: 'lambda' on the wrong member, or 'unaligned'
    positions (position t of c with position t of u, where both are trained)."""
    def loss(hidden, labels, lam, lm_head):
        P, terms = len(lam), []
        for p in range(P):
            if kind == "lambda":
                lam_c, lam_u = 1 - lam[p], lam[p]
                pos_c, pos_u = (labels[p] != cx.IGNORE).nonzero()[:, 0], (labels[P + p] != cx.IGNORE).nonzero()[:, 0]
                n = min(len(pos_c), len(pos_u))
                pos_c, pos_u = pos_c[:n], pos_u[:n]
            else:
                lam_c, lam_u = lam[p], 1 - lam[p]
                pos_c = pos_u = ((labels[p] != cx.IGNORE) & (labels[P + p] != cx.IGNORE)).nonzero()[:, 0]
            logp = torch.log_softmax(lm_head(lam_c * hidden[p, pos_c] + lam_u * hidden[P + p, pos_u]), -1)
            for k in range(len(pos_c)):
                terms.append(-(lam_c * logp[k, labels[p, pos_c[k]]] + lam_u * logp[k, labels[P + p, pos_u[k]]]))
        return torch.stack(terms).mean()
    return loss


def whole_sequence_nll(kit, expected, monkeypatch):
    """Stage 2 with every next token a target: the perplexity over the whole sequence, prompt included."""
    def whole_text(tok, messages):
        text = tok.apply_chat_template(messages, tokenize=False)
        return text, [(0, len(text))]
    monkeypatch.setattr(cx, "trained_spans", whole_text)
    tok = AutoTokenizer.from_pretrained(kit / "model")
    model = LlamaForCausalLM.from_pretrained(kit / "model", dtype=torch.float32).eval()
    conversations = [json.loads(line) for line in (kit / "data.jsonl").read_text().splitlines()]
    nll = {c["id"]: cx.response_nll(model, *cx.tokens(tok, c["messages"], expected["settings"]["max_len"]))
           for c in conversations}
    return {"response_nll": {i: v for i, (v, _) in nll.items()}, "n_tokens": {i: n for i, (_, n) in nll.items()}}


@pytest.mark.parametrize("mistake,patch,stage,names", [
    ("newline after <|im_end|> trained", ("trained_spans", extend_to_the_newline), 1,
     ["labels[", "the token after the end-of-turn token <|im_end|> (its newline) is trained"]),
    ("perplexity over the whole sequence", None, 2, ["n_tokens[", "the perplexity is over the whole sequence"]),
    ("mean of per-example means", ("ntp_loss", lambda _: mean_of_example_means), 4,
     ["sftmix_steps[0].ntp_loss", "a mean of per-example means"]),
    ("lambda on the wrong member", ("mixup_loss", lambda _: wrong_mixup("lambda")), 4,
     ["sftmix_steps[0].mixup_loss", "lambda applied to the unconfident member"]),
    ("unaligned Mixup positions", ("mixup_loss", lambda _: wrong_mixup("unaligned")), 4,
     ["sftmix_steps[0].mixup_loss", "Mixup over unaligned positions"]),
])
def test_wrong_submission_fails_at_the_stage_of_its_mistake_and_is_named(mistake, patch, stage, names, kit, expected,
                                                                          theirs, tmp_path, monkeypatch):
    if patch is None:
        wrong = {**theirs, **whole_sequence_nll(kit, expected, monkeypatch)}
    else:
        name, make_wrong = patch
        monkeypatch.setattr(cx, name, make_wrong(getattr(cx, name)))
        wrong = cx.compute(kit)
    status, lines = run_check(kit, wrong, tmp_path)
    table = stage_lines(lines)
    assert status == 1, lines
    assert all(" agrees " in table[n] for n in table if n < stage and n != 3), lines
    assert " differs " in table[stage], lines
    for name in names:
        assert name in table[stage], (name, table[stage])
    assert lines[-1] == f"first difference at stage {stage}"


@pytest.mark.parametrize("content,message", [
    ("{not json", "invalid JSON"),
    ('{"input_ids": {}, "perplexity": {}}', "unknown keys ['perplexity']"),
    ('{"n_tokens": {"plain": 3}}', "n_tokens: expected one entry per example id of the kit; missing ["),
    ('{"sftmix_steps": [{"ntp_loss": 1.0, "grad_entries": [1.0]}]}',
     "sftmix_steps[0].grad_entries: expected a list of 5 numbers"),
    ('[1, 2]', "expected a JSON object"),
    ('{}', "no key; expected one or more of ['input_ids', 'labels', "),
])
def test_bad_submission_gets_one_line_and_exit_2(content, message, kit, tmp_path):
    path = tmp_path / "theirs.json"
    path.write_text(content)
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "conformance.py"), "check", str(kit), str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith(f"error: {path}: ") and message in r.stderr, r.stderr
