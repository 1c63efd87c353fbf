"""eval.py's commands on the real SmolLM2-135M-Instruct, against transformers and hand calculations."""
import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import eval as E

ROOT = Path(__file__).resolve().parent.parent

CONVERSATIONS = [
    {"id": "a", "messages": [{"role": "user", "content": "What is the capital of France?"},
                             {"role": "assistant", "content": "The capital of France is Paris."}]},
    {"id": "b", "messages": [{"role": "system", "content": "You answer in one word."},
                             {"role": "user", "content": "Opposite of hot?"},
                             {"role": "assistant", "content": "Cold."}]},
    {"id": "c", "messages": [{"role": "user", "content": "Count to three."},
                             {"role": "assistant", "content": "One, two, three."},
                             {"role": "user", "content": "And backwards?"},
                             {"role": "assistant", "content": "Three, two, one."}]},
]
MC = [  # option formats and answer kinds vary; each answer is one SmolLM2-135M-Instruct ranks first by a margin
    {"question": "What is the capital of France?", "options": ["Berlin", "Paris", "Madrid"], "answer": "B"},
    {"id": "q2", "question": "What do bees make?", "options": {"A": "Steel", "B": "Glass", "C": "Honey"}, "answer": 2},
    {"question": "What is the capital of Italy?", "options": ["Rome", "Oslo", "Lima"], "answer": 0},
    {"question": "What is the largest ocean on Earth?",  # MedQA's layout: letter in answer_idx, text in answer
     "options": {"A": "Lake Geneva", "B": "The Pacific Ocean", "C": "The Arctic Ocean"}, "answer_idx": "B",
     "answer": "The Pacific Ocean"},
]
QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a haiku about the sea.", "Now make it about snow."]},
    {"question_id": 82, "category": "stem", "turns": ["Why is the sky blue? Answer in one sentence."]},
]


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def run_eval(*argv):
    """`python eval.py ARGV` in this process: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            E.main([str(a) for a in argv])
            code = 0
        except SystemExit as e:
            code = e.code
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def hf(smollm2_dir):
    """transformers' model and tokenizer of the same directory: the independent computation."""
    return (AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval(),
            AutoTokenizer.from_pretrained(smollm2_dir))


def hf_ids(tok, messages, generation=False):
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation)
    return tok(text, add_special_tokens=False).input_ids


@pytest.fixture(scope="module")
def hf_scored(hf):
    """Per conversation: transformers' logits (T, V) and the response positions t (predicted from t - 1), the
    spans found from the chat template's renderings up to each assistant turn; the '\n' after <|im_end|> is
    not a response token."""
    model, tok = hf
    scored = {}
    for c in CONVERSATIONS:
        messages, ids = c["messages"], hf_ids(tok, c["messages"])
        positions = [t for a, m in enumerate(messages) if m["role"] == "assistant" for t in range(
            len(hf_ids(tok, messages[:a], generation=True)), len(hf_ids(tok, messages[:a + 1])) - 1)]
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
    """sum_t log p(y_t | prompt, y_<t) of each option with transformers, the options right-padded in one batch."""
    rows = [prompt_ids + o for o in options_ids]
    batch = torch.tensor([r + [0] * (max(map(len, rows)) - len(r)) for r in rows])  # (K, T)
    with torch.no_grad():
        logp = torch.log_softmax(hf[0](batch).logits.double(), -1)  # (K, T, V)
    return [sum(logp[k, t - 1, r[t]].item() for t in range(len(prompt_ids), len(r))) for k, r in enumerate(rows)]


def test_ppl_is_token_weighted_response_perplexity_of_transformers_overall_per_example_and_per_half(
        smollm2_dir, hf_scored, tmp_path):
    data_file = write_jsonl(tmp_path / "heldout.jsonl", CONVERSATIONS)
    (tmp_path / "split.json").write_text(json.dumps({"confident": ["a", "c"], "unconfident": ["b"]}))
    code, out, err = run_eval("ppl", "--model", smollm2_dir, "--data", data_file, "--split", tmp_path / "split.json",
                              "--out", tmp_path / "per_example.jsonl")
    assert code == 0, err
    expected = response_nll(hf_scored)
    rows = {r["id"]: r for r in read_jsonl(tmp_path / "per_example.jsonl")}
    for i, (nll, n) in expected.items():  # fp32 log-softmax over 49152 logits on CPU: up to ~2e-4 per token
        assert rows[i]["tokens"] == n
        assert rows[i]["nll"] == pytest.approx(nll, abs=5e-4 * n)
        assert rows[i]["ppl"] == pytest.approx(math.exp(nll / n), rel=5e-4)
    assert [rows[i]["half"] for i in "abc"] == ["confident", "unconfident", "confident"]

    def ppl(ids):  # exp(sum nll / sum n): token-weighted, not a mean of per-example perplexities
        return math.exp(sum(expected[i][0] for i in ids) / sum(expected[i][1] for i in ids))
    lines = {line.split(":")[0].strip(): line for line in out.splitlines() if "ppl " in line}
    for part, ids in (("all", "abc"), ("confident", "ac"), ("unconfident", "b")):
        assert float(lines[part].split("ppl ")[1].split()[0]) == pytest.approx(ppl(ids), rel=5e-4)


def test_mc_picks_the_known_answers_and_scores_options_as_transformers_does(smollm2_dir, hf, tmp_path):
    code, out, err = run_eval("mc", "--model", smollm2_dir, "--data", write_jsonl(tmp_path / "mc.jsonl", MC),
                              "--out", tmp_path / "per_question.jsonl", "--batch-size", 4)
    assert code == 0, err
    rows = read_jsonl(tmp_path / "per_question.jsonl")
    assert [r["answer"] for r in rows] == ["B", "C", "A", "B"]
    assert [r["pred_sum"] for r in rows] == ["B", "C", "A", "B"]
    assert "accuracy 1.0000 (summed log-likelihood)" in out
    assert rows[1]["id"] == "q2" and rows[0]["id"] == "mc.jsonl:0"
    _, tok = hf
    for q, row in zip(MC, rows):
        options = list(q["options"].values()) if isinstance(q["options"], dict) else q["options"]
        user = q["question"] + "\n\n" + "\n".join(f"{'ABC'[k]}. {o}" for k, o in enumerate(options))
        prompt = hf_ids(tok, [{"role": "user", "content": user}], generation=True)
        options_ids = [tok(option, add_special_tokens=False).input_ids for option in options]
        assert row["tokens"] == [len(o) for o in options_ids]
        for ours, theirs, o in zip(row["loglik"], hf_logliks(hf, prompt, options_ids), options_ids):
            assert ours == pytest.approx(theirs, abs=5e-4 * len(o))  # fp32 log-softmax on CPU: ~2e-4 per token
        normed = [ll / n for ll, n in zip(row["loglik"], row["tokens"])]
        assert row["pred_norm"] == "ABC"[normed.index(max(normed))]


def test_generate_is_transformers_greedy_turn_by_turn_in_fastchat_answer_format(smollm2_dir, hf, tmp_path):
    out_file = tmp_path / "model_answer" / "smol.jsonl"
    code, _, err = run_eval("generate", "--model", smollm2_dir, "--questions",
                            write_jsonl(tmp_path / "question.jsonl", QUESTIONS), "--out", out_file,
                            "--max-new-tokens", 8, "--model-id", "smol")
    assert code == 0, err
    answers = read_jsonl(out_file)
    # FastChat's model-answer format
    assert [a["question_id"] for a in answers] == [81, 82]
    assert len({a["answer_id"] for a in answers}) == 2
    for a, q in zip(answers, QUESTIONS):
        assert set(a) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert a["model_id"] == "smol" and isinstance(a["answer_id"], str) and isinstance(a["tstamp"], float)
        assert [set(c) for c in a["choices"]] == [{"index", "turns"}] and a["choices"][0]["index"] == 0
        assert len(a["choices"][0]["turns"]) == len(q["turns"])
        assert all(isinstance(t, str) and t for t in a["choices"][0]["turns"])
    # each turn is what transformers' greedy generate gives for the conversation so far
    model, tok = hf
    for a, q in zip(answers, QUESTIONS):
        messages = []
        for user, answer in zip(q["turns"], a["choices"][0]["turns"]):
            messages.append({"role": "user", "content": user})
            prompt = hf_ids(tok, messages, generation=True)
            new = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=2,
                                 pad_token_id=2)[0, len(prompt):].tolist()
            assert answer == tok.decode(new[:-1] if new[-1] == 2 else new).strip()
            messages.append({"role": "assistant", "content": answer})


def test_compare_puts_runs_side_by_side_with_difference_and_ratio(smollm2_dir, hf_scored, tmp_path):
    run_b = tmp_path / "sftmix_run" / "final"  # a run directory; its model's logits are 0.8 times the first's
    run_b.mkdir(parents=True)
    state = load_file(smollm2_dir / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"] * 0.8  # logits = W (0.8 w * x / rms(x)), W linear
    save_file(state, run_b / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (run_b / name).write_bytes((smollm2_dir / name).read_bytes())
    code, table, err = run_eval("compare", smollm2_dir, tmp_path / "sftmix_run", "--names", "ntp", "sftmix",
                                "--data", write_jsonl(tmp_path / "heldout.jsonl", CONVERSATIONS),
                                "--mc", write_jsonl(tmp_path / "mc.jsonl", MC[:2]), "--out", tmp_path / "table.md")
    assert code == 0, err
    assert (tmp_path / "table.md").read_text() == table  # stdout holds the table alone
    lines = table.splitlines()
    assert lines[0] == "| metric | ntp | sftmix | sftmix − ntp | sftmix ÷ ntp |"
    cells = {line.split(" | ")[0][2:]: [float(c) for c in line.strip("| ").split(" | ")[1:]] for line in lines[2:]}
    assert set(cells) == {"ppl ↓", "NLL per token ↓",
                          "mc accuracy, summed log-lik ↑", "mc accuracy, length-normalised ↑"}
    for temperature, column in ((1.0, 0), (1 / 0.8, 1)):
        expected = response_nll(hf_scored, temperature)
        nll_per_token = sum(nll for nll, _ in expected.values()) / sum(n for _, n in expected.values())
        assert cells["NLL per token ↓"][column] == pytest.approx(nll_per_token, abs=5e-4)
        assert cells["ppl ↓"][column] == pytest.approx(math.exp(nll_per_token), rel=5e-4)
    for a, b, diff, ratio in cells.values():  # from the rounded cells: within the rounding
        assert diff == pytest.approx(b - a, abs=2e-4) and ratio == pytest.approx(b / a, abs=2e-4 * (1 + b / a))
    assert cells["mc accuracy, summed log-lik ↑"][0] == 1.0


def write_dynamics(path, n=24):
    records = [{"id": f"ex{i}", "perplexities": [2 + i % 7 + c * (i % 3) for c in range(4)]} for i in range(n)]
    return write_jsonl(path, records)


def test_datamap_writes_a_png(tmp_path):
    dynamics = write_dynamics(tmp_path / "dynamics.jsonl")
    code, _, err = run_eval("datamap", "--dynamics", dynamics, "--out", tmp_path / "map.png")
    assert code == 0, err
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "map.png").stat().st_size > 1000
    (tmp_path / "split.json").write_text(json.dumps({"confident": [f"ex{i}" for i in range(12)],
                                                     "unconfident": [f"ex{i}" for i in range(12, 24)]}))
    code, _, err = run_eval("datamap", "--dynamics", dynamics, "--split", tmp_path / "split.json",
                            "--out", tmp_path / "split_map.png")
    assert code == 0, err
    assert (tmp_path / "split_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_datamap_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    code, _, err = run_eval("datamap", "--dynamics", write_dynamics(tmp_path / "d.jsonl"), "--out", tmp_path / "m.png")
    assert (code, err) == (2, "error: datamap needs matplotlib: pip install matplotlib\n")
    assert not (tmp_path / "m.png").exists()


@pytest.mark.parametrize("command, records, message", [
    ("mc", MC[:1] + [{"question": "2 + 2?", "options": ["3", "4"], "answer": "C"}],
     'mc.jsonl:2: "answer": expected one of A, B or an index 0..1, got "C"'),
    ("mc", [{"question": "2 + 2?", "options": {"A": "3", "C": "4"}, "answer": "A"}], 'mc.jsonl:1: "options": expected'),
    ("generate", QUESTIONS[:1] + [{"question_id": 9, "category": "math"}], 'question.jsonl:2: "turns": expected'),
    ("generate", [{"question_id": 9, "turns": []}], 'question.jsonl:1: "turns": expected a non-empty list'),
])
def test_bad_input_is_one_clear_line_and_exit_2_before_the_model_loads(command, records, message, tmp_path):
    file = write_jsonl(tmp_path / ("mc.jsonl" if command == "mc" else "question.jsonl"), records)
    flag = "--data" if command == "mc" else "--questions"
    code, _, err = run_eval(command, "--model", tmp_path / "no_model_here", flag, file, "--out", tmp_path / "out.jsonl")
    assert code == 2
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.jsonl").exists()


def test_missing_model_directory_is_one_line_without_traceback(tmp_path):
    data_file = write_jsonl(tmp_path / "heldout.jsonl", CONVERSATIONS)
    result = subprocess.run([sys.executable, str(ROOT / "eval.py"), "ppl", "--model", str(tmp_path / "nope"),
                             "--data", str(data_file)], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr == f"error: {tmp_path / 'nope'}: config.json: not found; expected an HF model directory " \
                            f"or a run directory with final/\n"
