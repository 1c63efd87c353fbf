"""eval.py's commands on the real SmolLM2-135M-Instruct (or a tiny random model where only formats
and flags matter), against transformers, the judges' own loaders (FastChat, alpaca_eval) and hand
calculations."""

import argparse
import ast
import contextlib
import inspect
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import cli
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, AutoTokenizer

import eval as E
import model as M

ROOT = Path(__file__).resolve().parent.parent
aten = torch.ops.aten

CONVERSATIONS = [
    {
        "id": "a",
        "messages": [
            {"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "The capital of France is Paris."},
        ],
    },
    {
        "id": "b",
        "messages": [
            {"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "Opposite of hot?"},
            {"role": "assistant", "content": "Cold."},
        ],
    },
    {
        "id": "c",
        "messages": [
            {"role": "user", "content": "Count to three."},
            {"role": "assistant", "content": "One, two, three."},
            {"role": "user", "content": "And backwards?"},
            {"role": "assistant", "content": "Three, two, one."},
        ],
    },
]
# option formats and answer kinds vary; each answer is one SmolLM2-135M-Instruct ranks first by a
# margin
MC = [
    {
        "question": "What is the capital of France?",
        "options": ["Berlin", "Paris", "Madrid"],
        "answer": "B",
    },
    {
        "id": "q2",
        "question": "What do bees make?",
        "options": {"A": "Steel", "B": "Glass", "C": "Honey"},
        "answer": 2,
    },
    {"question": "What is the capital of Italy?", "options": ["Rome", "Oslo", "Lima"], "answer": 0},
    # MedQA's layout: letter in answer_idx, text in answer
    {
        "question": "What is the largest ocean on Earth?",
        "options": {"A": "Lake Geneva", "B": "The Pacific Ocean", "C": "The Arctic Ocean"},
        "answer_idx": "B",
        "answer": "The Pacific Ocean",
    },
]
QUESTIONS = [
    {
        "question_id": 81,
        "category": "writing",
        "turns": ["Write a haiku about the sea.", "Now make it about snow."],
    },
    {
        "question_id": 82,
        "category": "stem",
        "turns": ["Why is the sky blue? Answer in one sentence."],
    },
]


# AlpacaEval's evaluation set as released: a reference output and its generator per instruction
ALPACA_EVAL = [
    {
        "dataset": "helpful_base",
        "instruction": "What are the names of some famous actors that started their careers on "
        "Broadway?",
        "output": "Some famous actors ...",
        "generator": "gpt4_1106_preview",
    },
    {
        "dataset": "koala",
        "instruction": "Give three tips for staying healthy.",
        "output": "1. Eat well ...",
        "generator": "gpt4_1106_preview",
    },
    {
        "dataset": "selfinstruct",
        "instruction": "Translate to French: good morning",
        "output": "Bonjour",
        "generator": "gpt4_1106_preview",
    },
]
HAND_MC = [  # (id, question, options, 0-based answer): what each MedMCQA file below must read as
    (
        "m1",
        "Deficiency of which vitamin causes scurvy?",
        ["Vitamin A", "Vitamin B12", "Vitamin C", "Vitamin D"],
        2,
    ),
    ("m2", "Which organ secretes insulin?", ["Liver", "Pancreas", "Kidney", "Spleen"], 1),
    (
        "m3",
        "Which is the longest bone of the human body?",
        ["Tibia", "Humerus", "Radius", "Femur"],
        3,
    ),
    (
        "m4",
        "Which blood cells carry oxygen?",
        ["Red blood cells", "Platelets", "Neutrophils", "Lymphocytes"],
        0,
    ),
]
HAND_PUBMEDQA = [  # (PMID, contexts, question, final_decision)
    (
        "21645374",
        [
            "Programmed cell death (PCD) is the regulated death of cells within an organism.",
            "The lace plant produces leaves with perforations through PCD.",
        ],
        "Do mitochondria play a role in remodelling lace plant leaves during programmed cell death?",
        "yes",
    ),
    (
        "16418930",
        ["Landolt C and Snellen E acuity were compared in 40 patients with amblyopia."],
        "Landolt C and snellen e acuity: differences in strabismus amblyopia?",
        "no",
    ),
    (
        "9488747",
        [
            "Dyschesia can be provoked by inappropriate defecation movements.",
            "Anorectal endosonography was performed in 20 patients.",
        ],
        "Is anorectal endosonography valuable in dyschesia?",
        "maybe",
    ),
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_main(main, *argv):
    """A command's main(ARGV) in this process, as `python SCRIPT ARGV` runs it: (exit code, stdout,
    stderr).
    """
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


def run_eval(*argv):
    """`python eval.py ARGV` in this process: (exit code, stdout, stderr)."""
    return run_main(E.main, *argv)


def medmcqa(first, questions=HAND_MC):
    """MedMCQA's records with "cop" counted from `first`: 1 in its release, 0 in the HF copy."""
    return [
        {
            "question": q,
            "exp": "",
            "cop": a + first,
            "opa": o[0],
            "opb": o[1],
            "opc": o[2],
            "opd": o[3],
            "subject_name": "Medicine",
            "topic_name": None,
            "id": i,
            "choice_type": "single",
        }
        for i, q, o, a in questions
    ]


def write_ori_pqal(path):
    """PubMedQA's ori_pqal.json: one indented object keyed by PMID."""
    path.write_text(
        json.dumps(
            {
                pmid: {
                    "QUESTION": q,
                    "CONTEXTS": c,
                    "LABELS": ["BACKGROUND"] * len(c),
                    "MESHES": ["Humans"],
                    "YEAR": "2011",
                    "reasoning_required_pred": d,
                    "reasoning_free_pred": d,
                    "final_decision": d,
                    "LONG_ANSWER": "Because.",
                }
                for pmid, c, q, d in HAND_PUBMEDQA
            },
            indent=4,
        )
    )
    return path


def accuracies(out):
    """{score kind: accuracy} from mc's summary line 'N questions: accuracy 0.5000 (summed), ...'."""
    line = next(line for line in out.splitlines() if "questions: accuracy" in line)
    return {kind: float(value) for value, kind in re.findall(r"([\d.]+) \(([\w-]+)\)", line)}


def table_cells(table):
    """{metric: [cells as numbers]} of a Markdown table printed by scripts/report.py compare or
    dynamics.
    """
    return {
        line.split(" | ")[0][2:]: [float(c) for c in line.strip("| ").split(" | ")[1:]]
        for line in table.splitlines()[2:]
    }


def fastchat_max_new_token():
    """The default of --max-new-token in FastChat's gen_model_answer.py, read from its source."""
    import fastchat

    tree = ast.parse(
        (Path(fastchat.__file__).parent / "llm_judge" / "gen_model_answer.py").read_text()
    )
    return next(
        ast.literal_eval(k.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and getattr(node.func, "attr", "") == "add_argument"
        and node.args
        and getattr(node.args[0], "value", "") == "--max-new-token"
        for k in node.keywords
        if k.arg == "default"
    )


@pytest.fixture
def generate_calls(monkeypatch):
    """Every model.generate call as (prompts, max_new_tokens, temperature); each runs for at most 3
    new tokens.
    """
    calls, real = [], M.generate
    signature = inspect.signature(real)

    def recording(*args, **kwargs):
        call = signature.bind(*args, **kwargs)
        call.apply_defaults()
        kw = call.arguments
        calls.append((kw["prompt_ids"], kw["max_new_tokens"], kw["temperature"]))
        kw["max_new_tokens"] = min(kw["max_new_tokens"], 3)
        return real(*call.args, **call.kwargs)

    monkeypatch.setattr(M, "generate", recording)
    return calls


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    """transformers' model and tokenizer of the same directory: the independent computation."""
    return (
        AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(),
        AutoTokenizer.from_pretrained(smollm2_dir),
    )


def hf_ids(tok, messages, generation=False):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return tok(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def hf_scored(hf):
    """Per conversation: transformers' logits (T, V) and the response positions t (predicted from t
    - 1), the spans found from the chat template's renderings up to each assistant turn; the '\n'
    after <|im_end|> is not a response token."""
    model, tok = hf
    scored = {}
    for c in CONVERSATIONS:
        messages, ids = c["messages"], hf_ids(tok, c["messages"])
        positions = [
            t
            for a, m in enumerate(messages)
            if m["role"] == "assistant"
            for t in range(
                len(hf_ids(tok, messages[:a], generation=True)),
                len(hf_ids(tok, messages[: a + 1])) - 1,
            )
        ]
        with torch.no_grad():
            scored[c["id"]] = (ids, positions, model(torch.tensor([ids])).logits[0].double())
    return scored


def response_nll(hf_scored, temperature=1.0):
    """{id: (-sum_t log p(y_t | x, y_<t), |y|)}, p = softmax(logits / temperature)."""
    out = {}
    for i, (ids, positions, logits) in hf_scored.items():
        logp = torch.log_softmax(logits / temperature, -1)  # (T, V)
        out[i] = (-sum(logp[t - 1, ids[t]].item() for t in positions), len(positions))
    return out


def hf_logliks(hf, prompt_ids, options_ids):
    """sum_t log p(y_t | prompt, y_<t) of each option with transformers, the options right-padded in
    one batch.
    """
    rows = [prompt_ids + o for o in options_ids]
    batch = torch.tensor([r + [0] * (max(map(len, rows)) - len(r)) for r in rows])  # (K, T)
    with torch.no_grad():
        logp = torch.log_softmax(hf[0](batch).logits.double(), -1)  # (K, T, V)
    return [
        sum(logp[k, t - 1, r[t]].item() for t in range(len(prompt_ids), len(r)))
        for k, r in enumerate(rows)
    ]


def test_ppl_is_token_weighted_response_perplexity_of_transformers_overall_per_example_and_per_half(
    smollm2_dir, hf_scored, tmp_path
):
    data_file = write_jsonl(tmp_path / "heldout.jsonl", CONVERSATIONS)
    (tmp_path / "split.json").write_text(
        json.dumps({"confident": ["a", "c"], "unconfident": ["b"]})
    )
    code, out, err = run_eval(
        "ppl",
        *cli(
            model=smollm2_dir,
            data=data_file,
            split=tmp_path / "split.json",
            out=tmp_path / "per_example.jsonl",
        ),
    )
    assert code == 0, err
    expected = response_nll(hf_scored)
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "per_example.jsonl")}
    # fp32 log-softmax over 49152 logits on CPU: up to ~2e-4 per token
    for i, (nll, n) in expected.items():
        assert rows[i]["tokens"] == n
        assert rows[i]["nll"] == pytest.approx(nll, abs=5e-4 * n)
        assert rows[i]["ppl"] == pytest.approx(math.exp(nll / n), rel=5e-4)
    assert [rows[i]["half"] for i in "abc"] == ["confident", "unconfident", "confident"]

    def ppl(ids):  # exp(sum nll / sum n): token-weighted, not a mean of per-example perplexities
        return math.exp(sum(expected[i][0] for i in ids) / sum(expected[i][1] for i in ids))

    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if "ppl " in line}
    for part, ids in (("all", "abc"), ("confident", "ac"), ("unconfident", "b")):
        assert float(lines[part].split("ppl ")[1].split()[0]) == pytest.approx(ppl(ids), rel=5e-4)


def test_mc_picks_the_known_answers_and_scores_options_as_transformers_does(
    smollm2_dir, hf, tmp_path
):
    code, out, err = run_eval(
        "mc",
        *cli(
            model=smollm2_dir,
            data=write_jsonl(tmp_path / "mc.jsonl", MC),
            out=tmp_path / "per_question.jsonl",
            batch_size=4,
        ),
    )
    assert code == 0, err
    rows = read_jsonl(tmp_path / "per_question.jsonl")
    assert [r["answer"] for r in rows] == ["B", "C", "A", "B"]
    assert [r["pred_summed"] for r in rows] == ["B", "C", "A", "B"]
    assert "accuracy 1.0000 (summed)" in out
    assert rows[1]["id"] == "q2" and rows[0]["id"] == "mc.jsonl:0"
    _, tok = hf
    for q, row in zip(MC, rows):
        options = list(q["options"].values()) if isinstance(q["options"], dict) else q["options"]
        user = q["question"] + "\n\n" + "\n".join(f"{'ABC'[k]}. {o}" for k, o in enumerate(options))
        prompt = hf_ids(tok, [{"role": "user", "content": user}], generation=True)
        options_ids = [tok(option, add_special_tokens=False).input_ids for option in options]
        assert row["tokens"] == [len(o) for o in options_ids]
        for ours, theirs, o in zip(row["loglik"], hf_logliks(hf, prompt, options_ids), options_ids):
            # fp32 log-softmax on CPU: ~2e-4 per token
            assert ours == pytest.approx(theirs, abs=5e-4 * len(o))
        assert row["chars"] == [len(o) for o in options]


class WeightCopies(TorchDispatchMode):
    """Counts the ops that copy or cast a weight: aten._to_copy (.to, .float(), an autocast cast),
    copy_ and clone whose source shares the storage of a parameter of a model given to `watch`."""

    COPIES = {aten._to_copy, aten._copy_from, aten.copy_, aten.clone}

    def __init__(self):
        super().__init__()
        self.storages, self.count = set(), 0

    def watch(self, model):
        self.storages |= {p.untyped_storage().data_ptr() for p in model.parameters()}
        return model

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in self.COPIES:
            source = args[1] if func.overloadpacket is aten.copy_ else args[0]
            self.count += source.untyped_storage().data_ptr() in self.storages
        return func(*args, **(kwargs or {}))


@pytest.fixture
def weight_copies(monkeypatch):
    """A WeightCopies mode watching every model eval.py loads; .models and .caches: those models and
    KV caches.
    """
    mode, load, cache = WeightCopies(), E.load_model, M.KVCache
    mode.models, mode.caches = [], []
    monkeypatch.setattr(
        E, "load_model", lambda *a: mode.models.append(mode.watch(load(*a))) or mode.models[-1]
    )
    monkeypatch.setattr(M, "KVCache", lambda *a: mode.caches.append(cache(*a)) or mode.caches[-1])
    return mode


def test_weight_copies_sees_each_cast_of_autocast(tiny_model_dir):
    model = M.load_pretrained(tiny_model_dir)
    with WeightCopies() as mode, torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        mode.watch(model)(torch.tensor([[1, 2, 3]]))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    # each layer's 7 projections and the (tied) LM head, once
    assert mode.count == len(linears) == 2 * 7 + 1


@pytest.mark.parametrize("command", ["ppl", "mc", "generate"])
def test_scoring_and_generation_compute_in_bf16_with_no_copy_of_a_weight(
    command, tiny_model_dir, weight_copies, tmp_path
):
    inputs = {
        "ppl": ["--data", write_jsonl(tmp_path / "heldout.jsonl", CONVERSATIONS)],
        "mc": ["--data", write_jsonl(tmp_path / "mc.jsonl", MC)],
        "generate": cli(
            questions=write_jsonl(tmp_path / "question.jsonl", QUESTIONS),
            out=tmp_path / "answers.jsonl",
            max_new_tokens=3,
            batch_size=2,
        ),
    }
    with weight_copies:
        code, _, err = run_eval(
            command, "--model", tiny_model_dir, "--dtype", "bf16", *inputs[command]
        )
    assert code == 0, err
    [model] = weight_copies.models
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert weight_copies.count == 0
    # turn 1: a batch per temperature
    assert len(weight_copies.caches) == (3 if command == "generate" else 0)
    assert all(c.k[0].dtype == c.v[0].dtype == torch.bfloat16 for c in weight_copies.caches)


def test_bf16_scores_are_transformers_fp32_scores_within_bf16_precision(
    smollm2_dir, hf, hf_scored, tmp_path
):
    """bf16 keeps 8 bits of mantissa: over 30 layers a response's NLL moves by a few hundredths of a
    nat per token (measured: up to 0.04), the token-weighted perplexity of the file by 0.3%, an
    option's log-likelihood by 0.12 on an AMD EPYC and by up to 0.38 on a Xeon, whose bf16 kernels
    round differently for each batch shape (there transformers in bf16 moves the same option by
    0.058 in a padded batch of three and by 0.38 alone, where its logits equal ours bitwise); the
    bounds are above those."""
    code, out, err = run_eval(
        "ppl",
        *cli(
            model=smollm2_dir,
            data=write_jsonl(tmp_path / "heldout.jsonl", CONVERSATIONS),
            dtype="bf16",
            out=tmp_path / "per_example.jsonl",
        ),
    )
    assert code == 0, err
    expected = response_nll(hf_scored)
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "per_example.jsonl")}
    for i, (nll, n) in expected.items():
        assert rows[i]["nll"] == pytest.approx(nll, abs=0.1 * n)
    ppl = math.exp(sum(nll for nll, _ in expected.values()) / sum(n for _, n in expected.values()))
    assert float(out.split("ppl ")[1].split()[0]) == pytest.approx(ppl, rel=0.02)
    code, out, err = run_eval(
        "mc",
        *cli(
            model=smollm2_dir,
            data=write_jsonl(tmp_path / "mc.jsonl", MC),
            dtype="bf16",
            out=tmp_path / "per_question.jsonl",
        ),
    )
    assert code == 0, err
    _, tok = hf
    for q, row in zip(MC, read_jsonl(tmp_path / "per_question.jsonl")):
        options = list(q["options"].values()) if isinstance(q["options"], dict) else q["options"]
        user = q["question"] + "\n\n" + "\n".join(f"{'ABC'[k]}. {o}" for k, o in enumerate(options))
        prompt = hf_ids(tok, [{"role": "user", "content": user}], generation=True)
        options_ids = [tok(option, add_special_tokens=False).input_ids for option in options]
        assert row["pred_summed"] == row["answer"]
        for ours, theirs in zip(row["loglik"], hf_logliks(hf, prompt, options_ids)):
            assert ours == pytest.approx(theirs, abs=0.5)


def test_generate_at_temperature_0_is_transformers_greedy_turn_by_turn_in_fastchat_answer_format(
    smollm2_dir, hf, tmp_path
):
    out_file = tmp_path / "model_answer" / "smol.jsonl"
    code, _, err = run_eval(
        "generate",
        *cli(
            model=smollm2_dir,
            questions=write_jsonl(tmp_path / "question.jsonl", QUESTIONS),
            out=out_file,
            max_new_tokens=8,
            model_id="smol",
            temperature=0,
        ),
    )
    assert code == 0, err
    answers = read_jsonl(out_file)
    # FastChat's model-answer format
    assert [a["question_id"] for a in answers] == [81, 82]
    assert len({a["answer_id"] for a in answers}) == 2
    for a, q in zip(answers, QUESTIONS):
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert (
            a["model_id"] == "smol"
            and isinstance(a["answer_id"], str)
            and isinstance(a["tstamp"], float)
        )
        assert [set(c) for c in a["choices"]] == [{"index", "turns"}] and a["choices"][0][
            "index"
        ] == 0
        assert len(a["choices"][0]["turns"]) == len(q["turns"])
        assert all(isinstance(t, str) and t for t in a["choices"][0]["turns"])
    # each turn is what transformers' greedy generate gives for the conversation so far
    model, tok = hf
    for a, q in zip(answers, QUESTIONS):
        messages = []
        for user, answer in zip(q["turns"], a["choices"][0]["turns"]):
            messages.append({"role": "user", "content": user})
            prompt = hf_ids(tok, messages, generation=True)
            new = model.generate(
                torch.tensor([prompt]),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=2,
                pad_token_id=2,
            )[0, len(prompt) :].tolist()
            assert answer == tok.decode(new[:-1] if new[-1] == 2 else new).strip()
            messages.append({"role": "assistant", "content": answer})


def test_generate_compile_compiles_the_decoding_step_and_changes_no_answer(
    tiny_model_dir, monkeypatch, tmp_path
):
    """--compile hands generate the inductor backend (run here as aot_eager: dynamo's graph on eager
    kernels, no C++ build); the answers, sampled (writing 0.7, stem 0.1), two turns, are eager's."""
    backends, compiled = [], M.compiled
    monkeypatch.setattr(
        M, "compiled", lambda fn, backend: backends.append(backend) or compiled(fn, "aot_eager")
    )
    questions = write_jsonl(tmp_path / "question.jsonl", QUESTIONS)
    answers = []
    for flags in ([], ["--compile"]):
        out = tmp_path / f"answers{len(flags)}.jsonl"
        code, _, err = run_eval(
            "generate",
            *cli(
                model=tiny_model_dir, questions=questions, out=out, max_new_tokens=6, batch_size=2
            ),
            *flags,
        )
        assert code == 0, err
        answers.append([a["choices"][0]["turns"] for a in read_jsonl(out)])
    assert backends == ["inductor"] * 3  # turn 1: a batch per temperature; then turn 2
    assert answers[0] == answers[1]


def test_mt_bench_answers_are_read_by_fastchat_and_decoded_as_its_gen_model_answer_does(
    tiny_model_dir, generate_calls, tmp_path
):
    from fastchat.llm_judge import common

    categories = list(common.temperature_config) + ["a category FastChat has no temperature for"]
    questions = [
        {
            "question_id": 100 + k,
            "category": c,
            "turns": [f"Question {k} of {c}?"] + [f"Next {k}?"] * (k % 2),
        }
        for k, c in enumerate(categories)
    ]
    answer_dir = tmp_path / "model_answer"  # made by generate
    code, _, err = run_eval(
        "generate",
        *cli(
            model=tiny_model_dir,
            questions=write_jsonl(tmp_path / "question.jsonl", questions),
            out=answer_dir / "tiny-run.jsonl",
            model_id="tiny-run",
        ),
    )
    assert code == 0, err
    # gen_model_answer: temperature_config[category], else 0.7; greedy below 1e-4; its
    # --max-new-token default
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    used = {}
    for prompts, max_new_tokens, temperature in generate_calls:
        for prompt in prompts:
            k = next(k for k, q in enumerate(questions) if q["turns"][0] in tok.decode(prompt))
            used.setdefault(k, []).append((max_new_tokens, temperature))
    for k, q in enumerate(questions):
        t = common.temperature_config.get(q["category"], 0.7)
        assert used[k] == [(fastchat_max_new_token(), t if t >= 1e-4 else 0.0)] * len(q["turns"]), (
            q["category"]
        )
    # FastChat's own reader, as its judge calls it
    answers = common.load_model_answers(str(answer_dir))
    assert list(answers) == ["tiny-run"] and sorted(answers["tiny-run"]) == [
        q["question_id"] for q in questions
    ]
    for q in questions:
        a = answers["tiny-run"][q["question_id"]]
        assert a["model_id"] == "tiny-run" and len(a["choices"][0]["turns"]) == len(q["turns"])
    # progress counts generated tokens, with a rate
    assert re.search(r"generate: \d+ tokens \[.* tokens/s", err)


def test_sampling_is_reproducible_by_seed_and_differs_between_seeds(tiny_model_dir, tmp_path):
    questions = write_jsonl(
        tmp_path / "question.jsonl",
        [{"question_id": 1, "category": "writing", "turns": ["Write a poem about rain."]}],
    )

    def answer(seed):
        out = tmp_path / "answers.jsonl"
        code, _, err = run_eval(
            "generate",
            *cli(model=tiny_model_dir, questions=questions, out=out, max_new_tokens=6, seed=seed),
        )
        assert code == 0, err
        return read_jsonl(out)[0]["choices"][0]["turns"]

    assert answer(0) == answer(0) != answer(1)


def test_alpaca_eval_outputs_are_read_by_alpaca_eval_with_the_run_as_generator(
    tiny_model_dir, generate_calls, tmp_path
):
    from alpaca_eval import utils

    eval_set = tmp_path / "alpaca_eval.json"
    eval_set.write_text(json.dumps(ALPACA_EVAL, indent=2))
    out = tmp_path / "tiny-sftmix" / "model_outputs.json"
    code, _, err = run_eval(
        "generate",
        *cli(model=tiny_model_dir, questions=eval_set, out=out, model_id="tiny-sftmix"),
    )
    assert code == 0, err
    # what alpaca_eval's evaluate() does with model_outputs
    outputs = utils.load_or_convert_to_dataframe(out)
    assert utils.get_generator_name(None, outputs) == "tiny-sftmix"
    assert set(outputs.columns) == {"instruction", "output", "generator", "dataset"}
    assert list(outputs["instruction"]) == [r["instruction"] for r in ALPACA_EVAL]
    assert list(outputs["dataset"]) == [r["dataset"] for r in ALPACA_EVAL]
    assert all(isinstance(o, str) for o in outputs["output"])
    # the documented AlpacaEval decoding
    assert {(n, t) for _, n, t in generate_calls} == {(2048, 0.7)}


def test_medmcqa_as_released_and_as_the_hf_copy_read_as_the_same_questions(tmp_path):
    for first in (1, 0):  # MedMCQA's release counts cop from 1; the HF copy from 0
        questions = E.read_mc(write_jsonl(tmp_path / f"dev{first}.json", medmcqa(first)))
        assert [(q.id, q.question, q.options, q.answer) for q in questions] == HAND_MC
    # a file with no 0 and no 4 cannot tell: refused, unless --cop-base says it
    ambiguous = write_jsonl(tmp_path / "mc.jsonl", medmcqa(1, HAND_MC[:2]))
    code, _, err = run_eval("mc", "--model", tmp_path / "no_model_here", "--data", ambiguous)
    assert code == 2 and err.count("\n") == 1
    assert (
        err.startswith(f'error: {ambiguous}: "cop": neither 0 nor 4 among its values')
        and "--cop-base" in err
    )
    assert [q.answer for q in E.read_mc(ambiguous, cop_base=1)] == [a for *_, a in HAND_MC[:2]]


def test_pubmedqa_ori_pqal_and_hf_layout_read_as_the_same_questions_with_their_contexts(tmp_path):
    expected = [
        (
            pmid,
            "\n".join(contexts) + "\n\n" + question,
            ["yes", "no", "maybe"],
            ["yes", "no", "maybe"].index(decision),
        )
        for pmid, contexts, question, decision in HAND_PUBMEDQA
    ]
    hf_layout = [
        {
            "pubid": int(pmid),
            "question": q,
            "context": {
                "contexts": c,
                "labels": ["BACKGROUND"] * len(c),
                "meshes": ["Humans"],
                "reasoning_required_pred": [d],
                "reasoning_free_pred": [d],
            },
            "long_answer": "Because.",
            "final_decision": d,
        }
        for pmid, c, q, d in HAND_PUBMEDQA
    ]
    for path in (
        write_ori_pqal(tmp_path / "ori_pqal.json"),
        write_jsonl(tmp_path / "pqa_labeled.jsonl", hf_layout),
    ):
        assert [(q.id, q.question, q.options, q.answer) for q in E.read_mc(path)] == expected, (
            path.name
        )


# options of very different lengths; on the tiny random model the scores pick differently, and the
# answers are set so that their accuracies differ (by hand: summed 4/6, per-token 5/6, per-character 2/6)
MIXED_LENGTHS = [
    {
        "question": "Pick one.",
        "options": ["Yes", "Absolutely, without any doubt whatsoever", "No"],
        "answer": 2,
    },
    {
        "question": "Pick the fruit.",
        "options": ["A red apple from the orchard", "Rock", "Sand"],
        "answer": 0,
    },
    {
        "question": "Which is a colour?",
        "options": ["Table", "Blue", "An extraordinarily long chair"],
        "answer": 1,
    },
    {
        "question": "Which is a number?",
        "options": ["Seven", "Tree", "A very small house by the lake"],
        "answer": 0,
    },
    {
        "question": "Which is a city?",
        "options": ["Paris", "The city of Rio de Janeiro", "Rome"],
        "answer": 1,
    },
    {
        "question": "Which is a planet?",
        "options": ["Mars", "Jupiter", "A sandwich with cheese and ham"],
        "answer": 0,
    },
]


def test_mc_accuracy_by_summed_per_token_and_per_character_score_equals_a_hand_computation(
    tiny_model_dir, tmp_path
):
    out_file = tmp_path / "mc" / "per_question.jsonl"  # its directory is made
    code, out, err = run_eval(
        "mc",
        *cli(
            model=tiny_model_dir,
            data=write_jsonl(tmp_path / "mc.jsonl", MIXED_LENGTHS),
            out=out_file,
        ),
    )
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    predicted, correct = {kind: [] for kind in E.SCORES}, {kind: 0 for kind in E.SCORES}
    for q in MIXED_LENGTHS:
        user = (
            q["question"]
            + "\n\n"
            + "\n".join(f"{'ABC'[k]}. {o}" for k, o in enumerate(q["options"]))
        )
        options_ids = [tok(o, add_special_tokens=False).input_ids for o in q["options"]]
        ll = hf_logliks(
            (model, tok),
            hf_ids(tok, [{"role": "user", "content": user}], generation=True),
            options_ids,
        )
        scores = {
            "summed": ll,
            "per-token": [v / len(o) for v, o in zip(ll, options_ids)],
            # lm-eval's acc_norm
            "per-character": [v / len(text) for v, text in zip(ll, q["options"])],
        }
        for kind, s in scores.items():
            predicted[kind].append("ABC"[s.index(max(s))])
            correct[kind] += s.index(max(s)) == q["answer"]
    rows = read_jsonl(out_file)
    for kind in E.SCORES:
        assert [r[f"pred_{kind.replace('-', '_')}"] for r in rows] == predicted[kind], kind
        assert accuracies(out)[kind] == pytest.approx(correct[kind] / len(MIXED_LENGTHS), abs=5e-5)
    assert len(set(correct.values())) == 3  # the set tells the three scores apart


def write_dynamics(path, n=24):
    records = [
        {"id": f"ex{i}", "perplexities": [2 + i % 7 + c * (i % 3) for c in range(4)]}
        for i in range(n)
    ]
    return write_jsonl(path, records)


# every command with --out; its other inputs do not exist, so an error about --out came first
COMMANDS = {
    "ppl": ["ppl", "--model", "nope", "--data", "nope.jsonl"],
    "mc": ["mc", "--model", "nope", "--data", "nope.jsonl"],
    "generate": ["generate", "--model", "nope", "--questions", "nope.jsonl"],
}


def check_unwritable_out(run, argv, where, tmp_path):
    """run(*argv, "--out", OUT) with an OUT that is a directory, under a file, (an input) the
    command's input file argv[-1] spelled otherwise, or empty: one line, exit 2."""
    (tmp_path / "file").write_text("x")
    out = tmp_path / "out" if where == "a directory" else tmp_path / "file" / "out"
    if where == "a directory":
        out.mkdir()
    if where == "an input":
        out = Path.cwd() / argv[-1]
    expected = {
        "a directory": f"--out {out}: is a directory; expected a file to write",
        "under a file": f"--out {out}: cannot make its directory {out.parent}:",
        "an input": f"--out {out}: expected a file other than the inputs, got {argv[-2]} {argv[-1]}",
        "empty": "--out: expected a file to write, got an empty path",
    }[where]
    code, _, err = run(*argv, "--out", "" if where == "empty" else out)
    expected = "error: " + expected
    assert code == 2 and err.startswith(expected) and err.count("\n") == 1, err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("where", ["a directory", "under a file", "an input", "empty"])
def test_an_out_that_cannot_be_written_is_one_line_before_any_work(command, where, tmp_path):
    check_unwritable_out(run_eval, COMMANDS[command], where, tmp_path)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["ppl", "--batch-size", 0], "--batch-size: expected >= 1, got 0"),
        (["ppl", "--batch-size", "two"], "--batch-size: expected an integer >= 1, got 'two'"),
        (["ppl", "--max-len", 1], "--max-len: expected >= 2, got 1"),
        (["mc", "--batch-size", -3], "--batch-size: expected >= 1, got -3"),
        (["generate", "--max-new-tokens", -5], "--max-new-tokens: expected >= 1, got -5"),
        (["generate", "--temperature", -0.5], "--temperature: expected >= 0 and finite, got -0.5"),
        (["generate", "--temperature", "nan"], "--temperature: expected >= 0 and finite, got nan"),
        (["generate", "--top-p", 0], "--top-p: expected in (0, 1], got 0.0"),
        (["generate", "--top-p", 1.5], "--top-p: expected in (0, 1], got 1.5"),
        (["generate", "--seed", -1], "--seed: expected >= 0, got -1"),
    ],
)
def test_a_numeric_flag_out_of_range_is_one_line_before_any_work(flags, message, tmp_path):
    command, *flag = flags
    code, _, err = run_eval(*COMMANDS[command], *flag, "--out", tmp_path / "out.jsonl")
    assert (code, err) == (2, f"error: {message}\n")
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default_and_none_for_required_flags_or_flags_without_one(command):
    code, out, _ = run_eval(command, "--help")
    assert code == 0 and "default: None" not in out
    sub = next(a for a in E.parser()._actions if isinstance(a, argparse._SubParsersAction)).choices[
        command
    ]
    text = "".join(out.split())  # as printed, wrapped at spaces and hyphens
    for action in sub._actions:  # a default the help says in words is shown as written
        if (
            action.option_strings
            and action.default not in (None, argparse.SUPPRESS)
            and not action.required
        ):
            shown = (
                action.help
                if "(default:" in action.help
                else f"{action.help} (default: {action.default})"
            )
            assert "".join(shown.split()) in text, action.dest


@pytest.mark.parametrize(
    "command, records, message",
    [
        (
            "mc",
            MC[:1] + [{"question": "2 + 2?", "options": ["3", "4"], "answer": "C"}],
            'mc.jsonl:2: "answer": expected one of A, B or an index 0..1, got "C"',
        ),
        (
            "mc",
            [{"question": "2 + 2?", "options": {"A": "3", "C": "4"}, "answer": "A"}],
            'mc.jsonl:1: "options": expected',
        ),
        (
            "generate",
            QUESTIONS[:1] + [{"question_id": 9, "category": "math"}],
            'question.jsonl:2: "turns": expected',
        ),
        (
            "generate",
            [{"question_id": 9, "turns": []}],
            'question.jsonl:1: "turns": expected a non-empty list',
        ),
        (
            "generate",
            ALPACA_EVAL[:1] + [{"dataset": "koala", "output": "x"}],
            'question.jsonl:2: "instruction": expected',
        ),
        (
            "generate",
            ALPACA_EVAL,
            "--out {out}: expected a .json file for alpaca_eval (what its judge reads)",
        ),
        ("mc", medmcqa(0)[3:] + medmcqa(1)[2:3], 'mc.jsonl: "cop": both 0 and 4 among its values'),
        (
            "mc",
            medmcqa(1)[2:3]
            + [{"question": "x", "opa": "a", "opb": "b", "opc": "c", "opd": "d", "cop": 7}],
            'mc.jsonl:2: "cop": expected the correct option\'s number (this file counts from 1), got 7',
        ),
        (
            "mc",
            [
                {
                    "question": "Is it?",
                    "context": {"contexts": ["It is."]},
                    "final_decision": "perhaps",
                }
            ],
            'mc.jsonl:1: "final_decision": expected yes, no or maybe, got "perhaps"',
        ),
        ("mc", "[]", "mc.jsonl: no questions"),
        ("mc", "[" * 100000 + "]" * 100000, "mc.jsonl: unreadable JSON: nested too deeply"),
        (
            "generate",
            [{"question_id": [1], "turns": ["Hi"]}],
            'question.jsonl:1: "question_id": expected a string or an integer, got [1]',
        ),
        (
            "generate",
            [{"question_id": 1, "category": ["writing"], "turns": ["Hi"]}],
            'question.jsonl:1: "category": expected a string, got ["writing"]',
        ),
        (
            "ppl",
            '{"confident": ["a", "b"], "unconfident": ["b"]}',
            "split.json: ids must be in one half: 1 in both halves ['b']",
        ),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2_before_the_model_loads(
    command, records, message, tmp_path
):
    name, flag = {
        "mc": ("mc.jsonl", "--data"),
        "generate": ("question.jsonl", "--questions"),
        "ppl": ("split.json", "--split"),
    }[command]
    file = tmp_path / name  # records as they are, or as JSON lines
    file.write_text(records) if isinstance(records, str) else write_jsonl(file, records)
    # COMMANDS' model and data do not exist: the file (a later --data wins) is what fails
    code, _, err = run_eval(*COMMANDS[command], flag, file, "--out", tmp_path / "out.jsonl")
    assert code == 2
    assert (
        err.startswith("error: ")
        and message.format(out=tmp_path / "out.jsonl") in err
        and err.count("\n") == 1
    ), err
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_model_directory_is_one_line_without_traceback(tmp_path):
    data_file = write_jsonl(tmp_path / "heldout.jsonl", CONVERSATIONS)
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "eval.py"),
            "ppl",
            *cli(model=tmp_path / "nope", data=data_file),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == f"error: {tmp_path / 'nope'}: config.json: not found; expected an HF model directory "
        f"or a run directory with final/\n"
    )
