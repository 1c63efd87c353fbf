"""The conformance kit: deterministic, reachable from transformers alone and from TRL, agreeing
with train.py, its schedule stage able to tell schedules apart, and naming the stage of each usual
mistake."""

import contextlib
import io
import json
import math
import os
import re
import runpy
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, LlamaForCausalLM, get_cosine_schedule_with_warmup

ROOT = Path(__file__).resolve().parent.parent
KIT_TOOL = ROOT / "scripts" / "conformance.py"
sys.path.insert(0, str(ROOT / "scripts"))
import conformance as kit_tool  # noqa: E402
import conformance_transformers as cx  # noqa: E402
import conformance_trl as ctrl  # noqa: E402


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
    """The transformers-only worked example's submission, every stage."""
    return cx.compute(kit)


@pytest.fixture(scope="module")
def theirs_trl(kit):
    """The TRL worked example's submission, every stage; stage 7 in micro-batches of one pair (4
    accumulation steps)."""
    return ctrl.compute(kit)


def kit_command(*argv):
    """`python scripts/conformance.py ARGV` in this process: (exit status, stdout, stderr). Its
    commands as processes run in tests/test_readme.py (README.md's three kit commands)."""
    out, err, status = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            kit_tool.main([str(a) for a in argv])
        except SystemExit as e:
            status = e.code
    return status, out.getvalue(), err.getvalue()


def run_check(kit, submission, tmp_path):
    """(exit status, output lines) of `conformance.py check` on a submission."""
    path = tmp_path / "theirs.json"
    path.write_text(json.dumps(submission))
    status, out, err = kit_command("check", kit, path)
    return status, (out + err).strip().splitlines()


def stage_lines(lines):
    """{stage number: its table line}."""
    return {int(line[0]): line for line in lines if line[:1].isdigit()}


def conversation(kit, example_id):
    lines = (kit / "data.jsonl").read_text().splitlines()
    return next(json.loads(x)["messages"] for x in lines if json.loads(x)["id"] == example_id)


def test_two_makes_write_byte_identical_kits(kit, smollm2_dir, tmp_path):
    kit_tool.make(tmp_path / "b", smollm2=smollm2_dir)
    for name in ("c", "d"):  # without SmolLM2: the kit's own tokenizer
        kit_tool.make(tmp_path / name, smollm2=tmp_path / "absent")
    for a, b in ((kit, tmp_path / "b"), (tmp_path / "c", tmp_path / "d")):
        files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
        assert [str(f) for f in files] == [
            "data.jsonl",
            "expected.json",
            "model/config.json",
            "model/model.safetensors",
            "model/tokenizer.json",
            "model/tokenizer_config.json",
        ]
        for f in files:
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    about = json.loads((tmp_path / "c" / "expected.json").read_text())["kit"]["tokenizer"]
    assert about.startswith("a byte-level BPE")


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


def test_a_token_that_straddles_the_prompt_and_the_reply_is_trained(kit, expected):
    tok = AutoTokenizer.from_pretrained(kit / "model")
    messages = conversation(kit, "leading-space-and-newline")
    reply_start = len(
        tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    )
    enc = tok(
        tok.apply_chat_template(messages, tokenize=False),
        add_special_tokens=False,
        return_offsets_mapping=True,
    )
    straddling = [j for j, (a, b) in enumerate(enc["offset_mapping"]) if a < reply_start < b]
    assert len(straddling) == 1  # SmolLM2's "\n ": the header's newline, the reply's first space
    j = straddling[0]
    assert expected["expected"]["labels"]["leading-space-and-newline"][j - 1] == enc["input_ids"][j]
    assert "straddles the prompt and the reply" in expected["stages"][0]["definition"]


def schedule(kind, step, total, lr, warmup_ratio):
    """The lr of a step by the stated definition (cosine), or by one of two usual mistakes."""
    W = math.ceil(warmup_ratio * total)
    if kind == "warm-up from 0":  # transformers' (and so TRL's) cosine schedule
        optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        return lr * get_cosine_schedule_with_warmup(optimizer, W, total).lr_lambdas[0](step)
    if step < W:
        return lr * (step + 1) / W
    progress = (step - W) / (total - W)
    return lr * (1 - progress) if kind == "linear" else lr * (1 + math.cos(math.pi * progress)) / 2


def test_the_schedule_stage_tells_the_usual_schedules_apart_and_clips_every_step(expected):
    run, s = expected["inputs"]["sftmix_run"], expected["settings"]
    steps = expected["expected"]["sftmix_steps"]
    assert len(steps) == run["steps"] == len(run["pairs"]) == len(run["lambda"]) >= 3
    lrs = {
        kind: [
            schedule(kind, k, len(steps), s["lr"], run["warmup_ratio"]) for k in range(len(steps))
        ]
        for kind in ("cosine", "warm-up from 0", "linear")
    }
    assert [step["lr"] for step in steps] == pytest.approx(lrs["cosine"], rel=1e-12)
    for mistake in ("warm-up from 0", "linear"):
        assert max(abs(a - b) / a for a, b in zip(lrs["cosine"], lrs[mistake])) > 0.2, mistake
    factors = [s["grad_clip"] / step["grad_norm"] for step in steps]
    assert max(factors) < 1  # every step clipped ...
    assert max(factors) > 1.5 * min(factors)  # ... by factors that Adam does not cancel


@pytest.mark.parametrize("example", ["transformers", "TRL"])
def test_worked_example_agrees_at_every_stage(example, kit, theirs, theirs_trl, tmp_path):
    status, lines = run_check(kit, theirs if example == "transformers" else theirs_trl, tmp_path)
    table = stage_lines(lines)
    assert status == 0, lines
    assert len(table) == 7 and lines[-1] == "every given stage agrees", lines
    assert all(" agrees " in table[n] for n in range(1, 7)), lines
    # the transformers example runs whole global batches only; TRL's stage 7: 4 accumulation steps
    assert (" agrees " if example == "TRL" else " not given") in table[7], lines


def test_trl_example_in_micro_batches_of_two_pairs_agrees(kit, tmp_path):
    steps, trainer = ctrl.sftmix_run(kit, 4)
    assert trainer.args.gradient_accumulation_steps == 2
    status, lines = run_check(kit, {"sftmix_steps_micro": steps}, tmp_path)
    assert status == 0 and " agrees " in stage_lines(lines)[7], lines


def test_trl_example_on_two_gloo_ranks_agrees_at_every_stage(kit, tmp_path):
    """torchrun, 2 CPU processes: stages 3 to 6 with a global batch's half on each rank, stage 7
    with one pair a micro-batch, 2 accumulation steps on each rank."""
    out = tmp_path / "theirs.json"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(ROOT / "scripts" / "conformance_trl.py"),
            str(kit),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=1200,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    status, lines = run_check(kit, json.loads(out.read_text()), tmp_path)
    assert status == 0, lines
    assert all(" agrees " in line for line in stage_lines(lines).values()), lines


class MixupPerMicroBatch(ctrl.KitTrainer):
    """The k mu bug: L_Mixup averaged over each micro-batch's own mixed positions; Trainer leaves
    the micro-batches summed (it does not divide a model's loss by the accumulation steps)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        n = (inputs["labels"][:, 1:] != -100).sum(1)
        self.n_mixed = torch.minimum(*n.view(2, -1)).sum()
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)


def test_trl_example_weighs_mixup_as_train_py_under_accumulation(kit, expected, tmp_path):
    """Mixup's weight is mu whatever the split: the per-micro-batch mean, summed over 4
    accumulation steps, weighs it 4 mu, and stage 7 names that."""
    steps, _ = ctrl.sftmix_run(kit, 2, MixupPerMicroBatch)
    ours = expected["expected"]["sftmix_steps_micro"]
    for s, o in zip(steps, ours):  # its loss is L_NTP + mu x (the sum of 4 micro-batch means)
        assert s["loss"] == pytest.approx(
            s["ntp_loss"] + expected["settings"]["mu"] * s["mixup_loss"], rel=1e-5
        )
    assert steps[0]["mixup_loss"] > 3 * ours[0]["mixup_loss"]
    status, lines = run_check(kit, {"sftmix_steps_micro": steps}, tmp_path)
    assert (
        status == 1
        and "the values of: L_Mixup averaged per micro-batch and summed over 4 accumulation steps"
        in stage_lines(lines)[7]
    ), lines


@pytest.mark.parametrize(
    "setting,message",
    [
        ({"packing": True}, "packing and padding_free take a pair's examples out of their rows"),
        (
            {"padding_free": True},
            "packing and padding_free take a pair's examples out of their rows",
        ),
        ({"lr_scheduler_type": "linear"}, "lr_scheduler_type linear: expected cosine"),
        (
            {"gradient_accumulation_steps": 3},
            "per_device_train_batch_size x gradient_accumulation_"
            "steps x world_size = 6: expected the 8 rows",
        ),
    ],
)
def test_trl_example_refuses_what_breaks_the_pairs_in_one_line(setting, message, kit, monkeypatch):
    config = ctrl.SFTConfig

    def with_setting(**kwargs):
        return config(**{**kwargs, **setting})

    monkeypatch.setattr(ctrl, "SFTConfig", with_setting)
    with pytest.raises(ValueError) as e:
        ctrl.sftmix_run(kit, 2)
    assert str(e.value).startswith("SFTMixTrainer: ") and message in str(e.value), e.value
    assert "\n" not in str(e.value)


def test_trl_example_lays_pairs_out_by_id_in_the_data_set_trl_keeps(kit, expected, tmp_path):
    """TRL drops an example whose prompt fills max_length (nothing left to train), which shifts
    the indices after it: the sampler follows ids, micro-batch q of a step holds pair q (one pair a
    micro-batch here, 4 accumulation steps), and a dropped id is refused in one line."""
    conversations = [json.loads(x) for x in (kit / "data.jsonl").read_text().splitlines()]
    ids = [c["id"] for c in conversations]
    pairs = expected["inputs"]["sftmix_run"]["pairs"][:2]
    batches = [[c for c, _ in step] + [u for _, u in step] for step in pairs]
    long_prompt = {
        "id": "long-prompt",
        "messages": [
            {"role": "user", "content": "word " * 200},
            {"role": "assistant", "content": "Yes."},
        ],
    }
    longer = tmp_path / "kit"  # the kit's model, its data with long-prompt first
    longer.mkdir()
    (longer / "model").symlink_to(kit / "model")
    (longer / "data.jsonl").write_text(
        "".join(json.dumps(c) + "\n" for c in [long_prompt, *conversations])
    )
    trainer = ctrl.kit_trainer(
        longer, expected["settings"], batches, 0.25, 2, lambdas=[[0.5] * 4] * 2
    )
    with pytest.raises(ValueError) as e:
        ctrl.kit_trainer(
            longer,
            expected["settings"],
            [[*b[:3], "long-prompt", *b[4:]] for b in batches],
            0.25,
            2,
            lambdas=[[0.5] * 4] * 2,
        )._get_train_sampler()
    assert trainer.train_dataset["id"] == ids  # long-prompt dropped
    rows = [trainer.train_dataset[k]["id"] for k in trainer._get_train_sampler()]
    assert rows == [i for step in pairs for pair in step for i in pair]  # c, u of each pair
    assert (
        str(e.value) == "SFTMixTrainer: examples ['long-prompt'] are not in the training set "
        "(TRL drops those that truncation leaves untrained)"
    )


def test_trl_example_mixes_a_bf16_model_in_fp32(kit):
    """mixup_loss on a bf16 model's states and head: the logits mixed and log-softmaxed in fp32,
    as a float64 computation from the same bf16 logits."""
    model = LlamaForCausalLM.from_pretrained(kit / "model", dtype=torch.bfloat16)
    torch.manual_seed(0)
    hidden = torch.randn(4, 6, model.config.hidden_size).to(torch.bfloat16)  # (G, T, D)
    labels = torch.randint(0, model.config.vocab_size, (4, 6))
    labels[0, :2] = labels[3, 4:] = cx.IGNORE
    lam = torch.tensor([0.3, 0.9])
    got = cx.mixup_loss(hidden, labels, lam, model.lm_head)
    assert got.dtype == torch.float32
    logits = model.lm_head(hidden).double()  # (G, T, V): the head's bf16 logits, exactly
    terms = []
    for p in range(2):
        pc = (labels[p] != cx.IGNORE).nonzero()[:, 0]
        pu = (labels[2 + p] != cx.IGNORE).nonzero()[:, 0]
        n = min(len(pc), len(pu))
        z = lam[p].double() * logits[p, pc[:n]] + (1 - lam[p].double()) * logits[2 + p, pu[:n]]
        logp = torch.log_softmax(z, -1)
        terms += [
            -(
                lam[p].double() * logp[k, labels[p, pc[k]]]
                + (1 - lam[p].double()) * logp[k, labels[2 + p, pu[k]]]
            )
            for k in range(n)
        ]
    assert got.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)


@pytest.mark.parametrize("layout", ["stated", "2 ranks, one pair a micro-batch"])
def test_stages_4_to_7_agree_with_train_py_running_the_stated_command(
    layout, kit, expected, tmp_path
):
    """The stated command (micro-batches of 4, one rank) gives stages 4 to 6; on 2 gloo ranks with
    micro-batches of one pair (2 accumulation steps each) it gives the same: stage 7's values."""
    run = expected["inputs"]["sftmix_run"]
    for name in ("model", "data.jsonl"):
        (tmp_path / name).symlink_to(kit / name)
    (tmp_path / "split.json").write_text(json.dumps(expected["expected"]["split"]))
    flags = shlex.split(run["command"])[2:]  # after "python train.py"
    launch = [sys.executable, str(ROOT / "train.py")]
    if layout != "stated":
        flags[flags.index("--micro-batch") + 1] = "2"
        launch = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            str(ROOT / "train.py"),
        ]
    subprocess.run(
        [*launch, *flags, "--out", "run"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    key, stage = ("sftmix_steps", 4) if layout == "stated" else ("sftmix_steps_micro", 7)
    steps, tol = expected["expected"][key], expected["stages"][stage - 1]["tolerance"]
    assert len(metrics) == len(steps) == run["steps"]
    for m, step in zip(metrics, steps):
        for key in ("lr", "ntp_loss", "mixup_loss", "loss", "grad_norm"):
            assert m[key] == pytest.approx(step[key], rel=tol["rtol"], abs=tol["atol"]), key
    final = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    tol = expected["stages"][5]["tolerance"]
    for name, norm in expected["expected"]["weight_norms"].items():
        assert final[name].norm().item() == pytest.approx(norm, rel=tol["rtol"], abs=tol["atol"])


# ------------------------------------------------------------------ deliberately wrong submissions


def extend_to_the_newline(trained_spans):
    def spans(tok, messages):
        text, spans = trained_spans(tok, messages)
        return text, [(start, end + 1) for start, end in spans]  # the "\n" after <|im_end|> too

    return spans


def starting_inside_the_reply(_):
    """cx.tokens with another rule: a token is trained when it starts inside a trained span."""

    def tokens(tok, messages, max_len):
        text, spans = cx.trained_spans(tok, messages)
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        x = enc["input_ids"][: max_len + 1]
        y = [
            t if any(start <= a < end for start, end in spans) else cx.IGNORE
            for t, (a, _) in zip(x, enc["offset_mapping"])
        ]
        return x[:-1], y[1:]

    return tokens


def mean_of_example_means(logits, labels):
    per_example = [
        torch.nn.functional.cross_entropy(x, y, ignore_index=cx.IGNORE)
        for x, y in zip(logits, labels)
    ]
    return torch.stack(per_example).mean()


def wrong_mixup(kind):
    """The Mixup loss written out per pair with one mistake: 'lambda' on the wrong member, or
    'unaligned' positions (position t of c with position t of u, where both are trained)."""

    def loss(hidden, labels, lam, lm_head):
        P, terms = len(lam), []
        for p in range(P):
            trained_c, trained_u = labels[p] != cx.IGNORE, labels[P + p] != cx.IGNORE
            if kind == "lambda":
                lam_c, lam_u = 1 - lam[p], lam[p]
                pos_c, pos_u = trained_c.nonzero()[:, 0], trained_u.nonzero()[:, 0]
                n = min(len(pos_c), len(pos_u))
                pos_c, pos_u = pos_c[:n], pos_u[:n]
            else:
                lam_c, lam_u = lam[p], 1 - lam[p]
                pos_c = pos_u = (trained_c & trained_u).nonzero()[:, 0]
            z = lam_c * hidden[p, pos_c] + lam_u * hidden[P + p, pos_u]
            logp = torch.log_softmax(lm_head(z), -1)
            for k in range(len(pos_c)):
                terms.append(
                    -(
                        lam_c * logp[k, labels[p, pos_c[k]]]
                        + lam_u * logp[k, labels[P + p, pos_u[k]]]
                    )
                )
        return torch.stack(terms).mean()

    return loss


def whole_sequence_nll(kit, expected, theirs, monkeypatch):
    """Stage 2 with every next token a target: the perplexity over the whole sequence."""

    def whole_text(tok, messages):
        text = tok.apply_chat_template(messages, tokenize=False)
        return text, [(0, len(text))]

    monkeypatch.setattr(cx, "trained_spans", whole_text)
    tok = AutoTokenizer.from_pretrained(kit / "model")
    model = LlamaForCausalLM.from_pretrained(kit / "model", dtype=torch.float32)
    conversations = [json.loads(line) for line in (kit / "data.jsonl").read_text().splitlines()]
    max_len = expected["settings"]["max_len"]
    nll = {
        c["id"]: cx.response_nll(model, *cx.tokens(tok, c["messages"], max_len))
        for c in conversations
    }
    return {
        **theirs,
        "response_nll": {i: v for i, (v, _) in nll.items()},
        "n_tokens": {i: n for i, (_, n) in nll.items()},
    }


def halves_swapped(kit, expected, theirs, monkeypatch):
    return {
        **theirs,
        "split": {
            "confident": theirs["split"]["unconfident"],
            "unconfident": theirs["split"]["confident"],
        },
    }


def entries_after_clipping(kit, expected, theirs, monkeypatch):
    clip = expected["settings"]["grad_clip"]
    return {
        **theirs,
        "sftmix_steps": [
            {
                **s,
                "grad_entries": [
                    g * min(1, clip / (s["grad_norm"] + 1e-6)) for g in s["grad_entries"]
                ],
            }
            for s in theirs["sftmix_steps"]
        ],
    }


def clipping_per_tensor(kit, expected, theirs, monkeypatch):
    clip = torch.nn.utils.clip_grad_norm_

    def per_tensor(params, max_norm):
        params = list(params)
        norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params]))
        for p in params:
            clip([p], max_norm)
        return norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", per_tensor)
    return cx.compute(kit)


def stripped_responses(kit, expected, theirs, monkeypatch):
    """Every assistant turn's content stripped of leading and trailing whitespace."""
    tokens = cx.tokens

    def stripped(tok, messages, max_len):
        return tokens(
            tok,
            [
                {**m, "content": m["content"].strip()} if m["role"] == "assistant" else m
                for m in messages
            ],
            max_len,
        )

    monkeypatch.setattr(cx, "tokens", stripped)
    return cx.compute(kit)


def clipping_off(kit, expected, theirs, monkeypatch):
    clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, _: clip(params, math.inf))
    return cx.compute(kit)


def clipping_off_for_four_steps(kit, expected, theirs, monkeypatch):
    """Clipping off in the first four optimizer steps (the SFTMix run's: cx.compute trains it
    first), on after."""
    clip, calls = torch.nn.utils.clip_grad_norm_, []

    def late(params, max_norm):
        calls.append(params)
        return clip(params, math.inf if len(calls) <= 4 else max_norm)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", late)
    return cx.compute(kit)


def patched(name, make_wrong):
    def submission(kit, expected, theirs, monkeypatch):
        monkeypatch.setattr(cx, name, make_wrong(getattr(cx, name)))
        return cx.compute(kit)

    return submission


def scheduled(kind):
    return patched("lr_at", lambda _: lambda *args: schedule(kind, *args))


@pytest.mark.parametrize(
    "mistake,submission,stage,names",
    [
        (
            "newline after <|im_end|> trained",
            patched("trained_spans", extend_to_the_newline),
            1,
            [
                "labels[",
                "the token after the end-of-turn token <|im_end|> (its newline) is trained",
            ],
        ),
        (
            "a token straddling prompt and reply not trained",
            patched("tokens", starting_inside_the_reply),
            1,
            [
                'labels["leading-space-and-newline"]',
                "one that straddles the prompt and the reply is",
            ],
        ),
        (
            "perplexity over the whole sequence",
            whole_sequence_nll,
            2,
            ["n_tokens[", "the perplexity is over the whole sequence"],
        ),
        ("split halves swapped", halves_swapped, 3, ["split[", "halves swapped"]),
        (
            "mean of per-example means",
            patched("ntp_loss", lambda _: mean_of_example_means),
            3,
            ["perplexities[", "the values of: a mean of per-example means"],
        ),
        (
            "lambda on the wrong member",
            patched("mixup_loss", lambda _: wrong_mixup("lambda")),
            4,
            ["sftmix_steps[0].mixup_loss", "lambda applied to the unconfident member"],
        ),
        (
            "unaligned Mixup positions",
            patched("mixup_loss", lambda _: wrong_mixup("unaligned")),
            4,
            ["sftmix_steps[0].mixup_loss", "Mixup over unaligned positions"],
        ),
        (
            "gradient entries read after clipping",
            entries_after_clipping,
            4,
            ["sftmix_steps[0].grad_entries[0]", "gradient entries read after clipping"],
        ),
        (
            "warm-up from lr 0 (transformers' cosine schedule)",
            scheduled("warm-up from 0"),
            5,
            ["sftmix_steps[0].lr", "warm-up from lr 0"],
        ),
        (
            "linear decay",
            scheduled("linear"),
            5,
            ["sftmix_steps[3].lr", "linear decay after the warm-up"],
        ),
        ("gradient clipping off", clipping_off, 3, ["the values of: gradient clipping off"]),
        (
            "each tensor clipped on its own",
            clipping_per_tensor,
            3,
            ["the values of: each tensor clipped to grad_clip on its own"],
        ),
    ],
)
def test_wrong_submission_fails_at_the_stage_of_its_mistake_and_is_named(
    mistake, submission, stage, names, kit, expected, theirs, tmp_path, monkeypatch
):
    status, lines = run_check(kit, submission(kit, expected, theirs, monkeypatch), tmp_path)
    table = stage_lines(lines)
    assert status == 1, lines
    for n in range(1, stage):
        assert " agrees " in table[n], lines
    assert " differs " in table[stage], lines
    for name in names:
        assert name in table[stage], (name, table[stage])
    assert lines[-1] == f"first difference at stage {stage}"


@pytest.mark.parametrize(
    "submission,closest_at",
    [(stripped_responses, []), (clipping_per_tensor, []), (clipping_off_for_four_steps, [5])],
)
def test_a_mistake_is_named_only_where_it_gives_every_differing_value(
    submission, closest_at, kit, expected, theirs, tmp_path, monkeypatch
):
    """Submissions that give some or none of clipping off's values: no stage names clipping off.
    Clipping off for the first four of the SFTMix run's six steps gives stage 5's values of steps
    1 to 4, not those of step 5: stage 5 alone says "closest to" it, its share at least half and
    below 1."""
    status, lines = run_check(kit, submission(kit, expected, theirs, monkeypatch), tmp_path)
    assert status == 1, lines
    table = stage_lines(lines)
    assert not any("the values of: gradient clipping off" in line for line in table.values()), lines
    closest = {n: line for n, line in table.items() if "closest to: gradient clipping off" in line}
    assert list(closest) == closest_at, lines
    for line in closest.values():
        k, n = map(int, re.search(r"\((\d+) of (\d+) values\)", line).groups())
        assert 2 * k >= n and k < n, line


@pytest.mark.parametrize(
    "content,message",
    [
        ("{not json", "invalid JSON"),
        ('{"input_ids": {}, "perplexity": {}}', "unknown keys ['perplexity']"),
        (
            '{"n_tokens": {"plain": 3}}',
            "n_tokens: expected one entry per example id of the kit; missing",
        ),
        (
            '{"sftmix_steps": [{"ntp_loss": 1.0, "grad_entries": [1.0]}]}',
            "sftmix_steps[0].grad_entries: expected a list of 5 numbers",
        ),
        ('{"sftmix_steps": [{"lr": "1e-2"}]}', "sftmix_steps[0].lr: expected a number"),
        ("[1, 2]", "expected a JSON object"),
        ("{}", "no key; expected one or more of ['input_ids', 'labels', "),
        (
            '{"split": {"confident": [1, 2], "unconfident": [3]}}',
            'split: expected {"confident": [ids], "unconfident": [ids]}, ids as strings',
        ),
        (
            '{"sftmix_steps_micro": [{"loss": null}]}',
            "sftmix_steps_micro[0].loss: expected a number",
        ),
    ],
)
def test_bad_submission_gets_one_line_and_exit_2(content, message, kit, tmp_path):
    path = tmp_path / "theirs.json"
    path.write_text(content)
    status, out, err = kit_command("check", kit, path)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith(f"error: {path}: "), err
    assert message in err, err


@pytest.mark.parametrize(
    "case", ["out is a file", "a file named model in out", "expected.json is a directory"]
)
def test_make_into_an_out_it_cannot_fill_gets_one_line_and_writes_nothing(case, tmp_path):
    out = tmp_path / "kit"
    if case == "out is a file":
        out.write_text("x")
        message = f"--out {out}: is a file; expected a directory to write the kit into"
    elif case == "a file named model in out":
        out.mkdir()
        (out / "model").write_text("x")
        message = (
            f"--out {out}: {out / 'model'} is a file; expected the kit's model directory, "
            f"or nothing"
        )
    else:
        (out / "expected.json").mkdir(parents=True)
        message = f"--out {out / 'expected.json'}: is a directory; expected a file to write"
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert kit_command("make", "--out", out) == (2, "", f"error: {message}\n")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("example", ["conformance_transformers.py", "conformance_trl.py"])
def test_worked_example_without_a_kit_gets_one_line_and_exit_2(
    example, tmp_path, monkeypatch, capsys
):
    """The script run as __main__ in this process (transformers and TRL already imported)."""
    script = ROOT / "scripts" / example
    monkeypatch.setattr(
        sys, "argv", [str(script), str(tmp_path), "--out", str(tmp_path / "t.json")]
    )
    with pytest.raises(SystemExit) as exit:
        runpy.run_path(str(script), run_name="__main__")
    out, err = capsys.readouterr()
    assert (exit.value.code, out) == (2, "") and err.count("\n") == 1, err
    assert err.startswith(f"error: {tmp_path}: no expected.json"), err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(
    "case,message",
    [
        ("no expected", "no expected; expected a kit of this version's make"),
        ("no known_mistakes", "no known_mistakes; expected a kit of this version's make"),
        ("no stage 7", "no expected.sftmix_steps_micro; expected a kit of this version's make"),
    ],
)
def test_check_on_a_kit_of_another_version_gets_one_line_and_exit_2(
    case, message, kit, expected, tmp_path
):
    old = tmp_path / "old-kit"
    old.mkdir()
    written = json.loads(json.dumps(expected))
    if case == "no expected":
        del written["expected"]
    elif case == "no known_mistakes":
        del written["known_mistakes"]
    else:
        del written["expected"]["sftmix_steps_micro"]
    (old / "expected.json").write_text(json.dumps(written))
    (tmp_path / "theirs.json").write_text('{"n_tokens": {}}')
    before = sorted(tmp_path.rglob("*"))
    status, out, err = kit_command("check", old, tmp_path / "theirs.json")
    assert (status, out) == (2, "") and err.count("\n") == 1, err
    assert err.startswith(f"error: {old / 'expected.json'}: {message}"), err
    assert sorted(tmp_path.rglob("*")) == before


def test_make_into_an_unwritable_model_dir_gets_one_line_and_writes_nothing(tmp_path):
    """model/ of --out not writable: read-only to its user, immutable where the tests run as root
    (who writes anywhere else)."""
    out = tmp_path / "kit"
    (out / "model").mkdir(parents=True)
    (out / "model" / "config.json").write_text("{}")
    lock, unlock = (
        (["chattr", "+i"], ["chattr", "-i"])
        if os.geteuid() == 0
        else (["chmod", "555"], ["chmod", "755"])
    )
    subprocess.run([*lock, str(out / "model")], check=True)
    try:
        before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
        status, stdout, stderr = kit_command("make", "--out", out)
        after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    finally:
        subprocess.run([*unlock, str(out / "model")], check=True)
    assert (status, stdout) == (2, ""), stderr
    assert stderr == (
        f"error: --out {out}: cannot write in {out / 'model'}; expected a writable directory\n"
    )
    assert after == before


def test_a_killed_make_leaves_no_kit_and_a_rerun_clears_its_leftover(smollm2_dir, tmp_path):
    """make builds beside --out and moves the kit in whole: killed midway (train.py's reference
    run under way), neither --out nor anything in TMPDIR; the next make removes the leftover."""
    tmp, out = tmp_path / "tmp", tmp_path / "kit"
    tmp.mkdir()
    env = {**os.environ, "TMPDIR": str(tmp), "OMP_NUM_THREADS": "1"}
    make = [sys.executable, str(KIT_TOOL), "make", "--out", str(out)]
    proc = subprocess.Popen(
        make, env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    leftover = tmp_path / ".kit.making"
    try:
        for _ in range(600):  # until the reference run has written its first file
            if list(leftover.glob("runs/ref/*")) or proc.poll() is not None:
                break
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # make and its train.py child
        proc.wait()
    assert leftover.is_dir() and not out.exists() and not list(tmp.iterdir())
    r = subprocess.run(make, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kit", "tmp"]
    assert sorted(p.name for p in out.iterdir()) == ["data.jsonl", "expected.json", "model"]
