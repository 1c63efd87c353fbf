"""Bad input through every command's one checked path: each case is exit code 2, one line naming the
file, field or flag, and nothing written; a list of named chat templates reads as transformers reads
it."""

import json
import shutil
import sys
from datetime import datetime
from pathlib import Path

import pytest
import torch
from conftest import TINY
from safetensors.torch import load_file, save_file
from test_data import CONVERSATION, FAMILY_TOKENIZERS, hf_ids
from test_eval import CONVERSATIONS, MC, run_main, write_jsonl
from test_model import HeadersOnly
from test_train import cli
from transformers import AutoTokenizer

import data as D
import eval as E
import model as M
import train as T

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import inspect_data  # noqa: E402
import pipeline  # noqa: E402
import report  # noqa: E402


def one_line(code, out, err):
    """The error line of a command that exited 2 and printed nothing else."""
    assert code == 2 and out == "" and err.startswith("error: "), (code, out, err)
    assert err.count("\n") == 1, err
    return err.strip()


def run_command(command, argv):
    """train.py or eval.py ppl with argv, in this process: (exit code, stdout, stderr)."""
    return run_main(T.main, *argv) if command == "train" else run_main(E.main, "ppl", *argv)


def model_copy(src: Path, dst: Path, config=None, add=None) -> Path:
    """A copy of a model directory with config.json fields changed and checkpoint tensors added."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **(config or {})}))
    if add:
        tensors = load_file(dst / "model.safetensors")
        save_file({**tensors, **add}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ------------------------------------------------------------------------ config.json, checkpoint


@pytest.mark.parametrize(
    "change, named",
    [
        ({"head_dim": "8"}, 'head_dim: expected an integer >= 1, got "8"'),
        ({"num_key_value_heads": 0}, "num_key_value_heads: expected an integer >= 1, got 0"),
        ({"hidden_size": None}, "hidden_size: expected an integer >= 1, got null"),
        ({"num_hidden_layers": 2.0}, "num_hidden_layers: expected an integer >= 1, got 2.0"),
        ({"rms_norm_eps": -1e-5}, "rms_norm_eps: expected a finite number > 0, got -1e-05"),
        ({"rope_theta": "10000"}, 'rope_theta: expected a finite number > 0, got "10000"'),
        (
            {"rope_parameters": {"rope_type": "default", "rope_theta": 0}},
            "rope_parameters.rope_theta: expected a finite number > 0, got 0",
        ),
        (
            {
                "rope_parameters": {
                    "rope_type": "llama3",
                    "factor": -8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 64,
                }
            },
            "rope_parameters.factor: expected a finite number > 0, got -8.0",
        ),
        (
            {"tie_word_embeddings": "true"},
            'tie_word_embeddings: expected true or false, got "true"',
        ),
        (
            {"eos_token_id": -1},
            "eos_token_id: expected a token id (an integer >= 0) or a list of them, got -1",
        ),
        ({"head_dim": 7, "num_attention_heads": 4}, "head_dim: expected an even integer, got 7"),
    ],
)
@pytest.mark.parametrize("command", ["train", "eval ppl"])
def test_a_config_field_of_the_wrong_kind_is_one_line_naming_config_json_and_the_field(
    command, change, named, tiny_model_dir, chat_data, tmp_path, capsys
):
    bad = model_copy(tiny_model_dir, tmp_path / "model", change)
    out = tmp_path / ("run" if command == "train" else "ppl.jsonl")
    argv = cli(model=bad, data=chat_data, out=out)
    code, stdout, err = run_command(command, argv)
    assert one_line(code, stdout, err) == f"error: {bad / 'config.json'}: {named}"
    assert not out.exists()


@pytest.mark.parametrize(
    "case", ["attention_bias without biases", "untied without lm_head", "a stray tensor"]
)
@pytest.mark.parametrize("command", ["train", "eval ppl"])
def test_a_checkpoint_unlike_config_json_is_one_line_naming_file_and_tensor_before_anything(
    command, case, tiny_model_dir, chat_data, tmp_path, monkeypatch
):
    change, tensor, reason = {
        "attention_bias without biases": (
            {"attention_bias": True},
            "model.layers.0.self_attn.q_proj.bias",
            ": missing (config.json: attention_bias or mlp_bias",
        ),
        "untied without lm_head": (
            {"tie_word_embeddings": False},
            "lm_head.weight",
            ": missing (config.json: tie_word_embeddings false",
        ),
        "a stray tensor": (
            {},
            "model.extra.weight",
            ": not a parameter of the model config.json describes",
        ),
    }[case]
    add = {"model.extra.weight": torch.zeros(2, 2)} if case == "a stray tensor" else None
    bad = model_copy(tiny_model_dir, tmp_path / "model", change, add=add)
    monkeypatch.setattr(M, "safe_open", HeadersOnly)
    out = tmp_path / ("run" if command == "train" else "ppl.jsonl")
    argv = cli(model=bad, data=chat_data, out=out)
    code, stdout, err = run_command(command, argv)
    assert one_line(code, stdout, err).startswith(
        f"error: {bad / 'model.safetensors'}: {tensor}{reason}"
    )
    assert not out.exists()


# ------------------------------------------------------------------------------- chat templates


@pytest.fixture
def named_templates(smollm2_dir, tmp_path):
    """SmolLM2's tokenizer with its chat template as the "default" entry of HF's list of named
    templates, after another (Gemma's) that would render otherwise."""

    def make(names):
        path = tmp_path / "-".join(names)
        path.mkdir()
        shutil.copy(smollm2_dir / "tokenizer.json", path)
        config = json.loads((smollm2_dir / "tokenizer_config.json").read_text())
        templates = {"default": config["chat_template"], "gemma": FAMILY_TOKENIZERS["gemma"][0]}
        config["chat_template"] = [{"name": n, "template": templates[n]} for n in names]
        (path / "tokenizer_config.json").write_text(json.dumps(config))
        return path

    return make


def test_a_list_of_named_chat_templates_renders_its_default_as_transformers_does(named_templates):
    path = named_templates(["gemma", "default"])
    hf = AutoTokenizer.from_pretrained(path)
    tok = D.load_tokenizer(path)
    assert tok.prompt_format == "chatml"
    sample = D.tokenize(D.Example("c", CONVERSATION), tok, max_len=10_000)
    assert sample.input_ids == hf_ids(hf, CONVERSATION)[:-1]
    prompt = CONVERSATION[:1]
    assert D.encode_prompt(prompt, tok) == hf_ids(hf, prompt, add_generation_prompt=True)


def test_a_list_of_named_chat_templates_without_default_needs_prompt_format_as_in_transformers(
    named_templates,
):
    path = named_templates(["gemma"])
    with pytest.raises(ValueError):  # transformers: no template to choose without a name
        hf_ids(AutoTokenizer.from_pretrained(path), CONVERSATION)
    tok = D.load_tokenizer(path)
    with pytest.raises(D.InputError, match="cannot tell the prompt format; pass --prompt-format"):
        D.tokenize(D.Example("c", CONVERSATION), tok)
    sample = D.tokenize(D.Example("c", CONVERSATION), tok, "chatml")
    user = CONVERSATION[0]["content"]
    assert tok.decode(sample.input_ids).startswith(f"<|im_start|>user\n{user}<|im_end|>")


@pytest.mark.parametrize("template", [42, [{"name": "default"}], ["{{ messages }}"]])
def test_a_chat_template_of_another_kind_is_one_line_naming_the_file(
    template, smollm2_dir, tmp_path
):
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    expected = f"^{tmp_path / 'tokenizer_config.json'}: chat_template: expected a string or a list"
    with pytest.raises(D.InputError, match=expected):
        D.load_tokenizer(tmp_path)


# ---------------------------------------------------------------------- numeric flags, JSON files


@pytest.mark.parametrize(
    "flags, message",
    [
        (["-n", "-1"], "-n: expected >= 0, got -1"),
        (["--max-len", "-5"], "--max-len: expected >= 2, got -5"),
        (["--batch-size", "0"], "--batch-size: expected >= 1, got 0"),
        (["--batch-size", "eight"], "--batch-size: expected an integer >= 1, got 'eight'"),
        (
            ["-n", f"{10**400}"],
            f"-n: expected an integer >= 0 (below 2**63), got {'1' + '0' * 59}...",
        ),
        (["-n", f"1{'0' * 5000}"], f"-n: expected an integer >= 0, got '{'1' + '0' * 59}'"),
    ],
)
def test_inspect_data_numbers_out_of_range_are_one_line(flags, message, smollm2_dir, chat_data):
    out = run_main(inspect_data.main, "--data", chat_data, "--tokenizer", smollm2_dir, *flags)
    assert one_line(*out) == f"error: {message}"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "-1"], "--lr: expected > 0 and finite, got -1.0"),
        (["--betas", "0.9", "1.5"], "--betas: expected in [0, 1), got 1.5"),
        (["--grad-clip", "inf"], "--grad-clip: expected >= 0 and finite (0 = off), got inf"),
        (["--global-batch", "8.5"], "--global-batch: expected an integer >= 1, got '8.5'"),
        (["--seed", f"{2**64}"], f"--seed: expected an integer >= 0 (below 2**63), got {2**64}"),
    ],
)
def test_train_numbers_are_checked_as_they_are_parsed(flags, message, tmp_path):
    out = run_main(
        T.main,
        *cli(model=tmp_path / "m", data=tmp_path / "d", out=tmp_path / "run"),
        *flags,
    )
    assert one_line(*out) == f"error: {message}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "text, message",
    [
        ('{"confident": ["a"]', "not a JSON file"),
        ('["a", "b"]', "expected a JSON object, got an array"),
        ('{"confident": ["a"]}', "unconfident: expected a list of example ids, got nothing"),
        (
            '{"confident": ["a"], "unconfident": "b"}',
            'unconfident: expected a list of example ids, got "b"',
        ),
        ("[" * 100_000 + "]" * 100_000, "unreadable JSON: nested too deeply"),
        ('{"confident": [' + "9" * 5000 + "]}", "unreadable JSON: an integer of more than 4300"),
    ],
)
def test_a_split_file_is_read_by_the_one_json_reader_naming_the_file_and_key(
    text, message, tiny_model_dir, chat_data, tmp_path
):
    split = tmp_path / "split.json"
    split.write_text(text)
    out = run_main(
        E.main,
        "ppl",
        *cli(model=tiny_model_dir, data=chat_data, split=split, out=tmp_path / "ppl.jsonl"),
    )
    assert one_line(*out).startswith(f"error: {split}: {message}")
    assert not (tmp_path / "ppl.jsonl").exists()


# ------------------------------------------------------------------------------------ data files

DEEP = "[" * 100_000 + "]" * 100_000
SURROGATE = {"messages": [{"role": "user", "content": "hi \ud800"}, CONVERSATION[1]]}


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("deep.json", DEEP, "{f}: unreadable JSON: nested too deeply"),
        ("deep.jsonl", f'{{"messages": {DEEP}}}', "{f}:1: unreadable JSON: nested too deeply"),
        (
            "long.jsonl",
            f'{{"id": {"9" * 5000}, "messages": []}}',
            "{f}:1: unreadable JSON: an integer of more than 4300 digits",
        ),
        (
            "surrogate.jsonl",
            json.dumps(SURROGATE),  # "\ud800": an escape with no pair, which UTF-8 cannot encode
            '{f}:1: "messages"[0].content: expected UTF-8 text, got the lone surrogate "\\ud800" '
            "at character 3",
        ),
        (
            "same-ids.jsonl",
            "\n".join(
                json.dumps({"id": "x" * 100_000, "messages": CONVERSATION[:2]}) for _ in range(2)
            ),
            f'{{f}}:2: "id": duplicate id "{"x" * 59} (first at {{f}}:1)',
        ),
    ],
)
def test_a_data_file_python_cannot_read_is_one_line_naming_file_and_line(
    name, text, message, smollm2_dir, tmp_path
):
    file = tmp_path / name
    file.write_text(text)
    out = run_main(inspect_data.main, "--data", file, "--tokenizer", smollm2_dir)
    assert one_line(*out) == f"error: {message.format(f=file)}"


def test_a_lone_surrogate_in_a_question_is_refused_before_the_model_loads(tmp_path):
    questions = write_jsonl(tmp_path / "question.jsonl", [{"question_id": 1, "turns": ["\ud800"]}])
    out = tmp_path / "answers.jsonl"
    code, stdout, err = run_main(
        E.main, "generate", *cli(model=tmp_path / "no-model", questions=questions, out=out)
    )
    assert one_line(code, stdout, err) == (
        f'error: {questions}:1: "turns"[0]: expected UTF-8 text, got the lone surrogate "\\ud800" '
        "at character 0"
    )
    assert not out.exists()


@pytest.mark.parametrize(
    "column, value, message",
    [
        (
            "id",
            datetime(2020, 1, 1),
            '"id": expected a non-empty string, got a value of type datetime',
        ),
        (
            "messages",
            [{"role": "user", "content": b"hi"}, {"role": "assistant", "content": b"ok"}],
            '"messages"[0].content: expected a string, got a value of type bytes',
        ),
    ],
)
def test_a_parquet_column_of_a_type_json_lacks_is_named_by_its_type(
    column, value, message, smollm2_dir, tmp_path
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = tmp_path / "data.parquet"
    pq.write_table(pa.table({"messages": [CONVERSATION[:2]], column: [value]}), file)
    out = run_main(inspect_data.main, "--data", file, "--tokenizer", smollm2_dir)
    assert one_line(*out) == f"error: {file}:row 0: {message}"


def test_a_utf8_bom_before_a_data_file_is_read_past_as_before_a_json_file(tmp_path):
    array, lines = tmp_path / "a.json", tmp_path / "a.jsonl"
    array.write_text(json.dumps(CONVERSATIONS), encoding="utf-8-sig")
    write_jsonl(lines, CONVERSATIONS)
    lines.write_bytes(b"\xef\xbb\xbf" + lines.read_bytes())
    assert (
        D.read_examples(array)
        == D.read_examples(lines)
        == D.read_examples(write_jsonl(tmp_path / "plain.jsonl", CONVERSATIONS))
    )


# ------------------------------------------------------------------------------------ tokenizers


@pytest.mark.parametrize(
    "key, value",
    [
        ("bos_token", {"__type": "AddedToken"}),
        ("bos_token", 1),
        ("eos_token", {"content": 5}),
        ("eos_token", "<nope>"),  # not in the vocabulary: "<" would end every answer
        ("pad_token", "<nope>"),
    ],
)
def test_a_special_token_not_in_the_vocabulary_is_one_line_naming_the_file_and_field(
    key, value, smollm2_dir, chat_data, tmp_path
):
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path)
    config = tmp_path / "tokenizer_config.json"
    config.write_text(json.dumps({key: value}))
    out = run_main(inspect_data.main, "--data", chat_data, "--tokenizer", tmp_path)
    assert one_line(*out) == (
        f"error: {config}: {key}: expected a token of {tmp_path / 'tokenizer.json'} (a string or "
        f'{{"content": string}}), got {json.dumps(value)}'
    )


def test_a_chat_template_file_not_utf8_is_one_line_naming_it(smollm2_dir, chat_data, tmp_path):
    shutil.copy(smollm2_dir / "tokenizer.json", tmp_path)
    (tmp_path / "chat_template.jinja").write_bytes(b"caf\xe9")
    out = run_main(inspect_data.main, "--data", chat_data, "--tokenizer", tmp_path)
    assert one_line(*out).startswith(
        f"error: {tmp_path / 'chat_template.jinja'}: cannot read it as UTF-8 text ('utf-8' codec"
    )


@pytest.mark.parametrize("command", ["train", "eval ppl"])
def test_a_tokenizer_with_ids_beyond_vocab_size_is_refused_before_the_model_loads(
    command, smollm2_dir, chat_data, tmp_path, monkeypatch
):
    small = tmp_path / "model"
    M.save_pretrained(M.Transformer(M.ModelArgs(**TINY, vocab_size=1000)), small, smollm2_dir)
    monkeypatch.setattr(M, "safe_open", HeadersOnly)  # a weight read fails the test
    out = tmp_path / ("run" if command == "train" else "ppl.jsonl")
    code, stdout, err = run_command(command, cli(model=small, data=chat_data, out=out))
    assert one_line(code, stdout, err) == (
        f"error: {small / 'tokenizer.json'}: expected token ids below vocab_size 1000 of "
        f"{small / 'config.json'}, got ids up to 49151"
    )
    assert not out.exists()


# ----------------------------------------------------------------------------- report.py compare


def test_compare_checks_every_run_before_loading_the_first(tiny_model_dir, tmp_path, monkeypatch):
    weightless = model_copy(tiny_model_dir, tmp_path / "b")
    (weightless / "model.safetensors").unlink()
    monkeypatch.setattr(E, "load_model", lambda *a: pytest.fail("loaded before all were checked"))
    heldout = write_jsonl(tmp_path / "heldout.jsonl", CONVERSATIONS)
    code, stdout, err = run_main(
        report.main,
        "compare",
        tiny_model_dir,
        weightless,
        *cli(data=heldout, out=tmp_path / "table.md"),
    )
    assert (
        one_line(code, stdout, err) == f"error: {weightless}: no model.safetensors or "
        f"model.safetensors.index.json"
    )
    assert not (tmp_path / "table.md").exists()


def test_compare_mc_with_an_empty_path_names_the_flag_and_the_benchmark(tiny_model_dir, tmp_path):
    write_jsonl(tmp_path / "mc.jsonl", MC)
    out = run_main(
        report.main, "compare", tiny_model_dir, "--mc", "MedQA=", "--out", tmp_path / "table.md"
    )
    assert one_line(*out) == "error: --mc MedQA=: MedQA: expected NAME=FILE, got no FILE"
    assert not (tmp_path / "table.md").exists()


# ----------------------------------------------------------------------------- pipeline


@pytest.mark.parametrize(
    "case", ["MODEL missing", "--lr -1", "--epochs 3", "--stop-at-step 2", "bad data"]
)
def test_a_refused_pipeline_start_leaves_no_lock_and_writes_nothing(
    case, tiny_model_dir, chat_data, tmp_path, monkeypatch, capfd
):
    model, data_file, flags = tiny_model_dir, chat_data, ["--global-batch", "8"]
    if case == "MODEL missing":
        model = tmp_path / "no-model"
    elif case == "bad data":  # refused by train.py itself, in the first stage
        data_file = write_jsonl(tmp_path / "bad.jsonl", [{"text": "no format"}])
    else:
        flags += case.split()
    monkeypatch.chdir(ROOT)  # pipeline.main moves there; put back after the test
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        pipeline.main([str(model), str(data_file), str(out), *flags])
    err = capfd.readouterr().err.strip().splitlines()
    expected = {
        "MODEL missing": f"error: {model}: config.json: not found",
        "--lr -1": "error: --lr: expected > 0 and finite, got -1.0",
        "--epochs 3": "error: --epochs: set by the pipeline for each stage",
        "--stop-at-step 2": "error: --stop-at-step: set by the pipeline for each stage",
        "bad data": f"error: {data_file}:1: cannot tell the format",
    }[case]
    assert e.value.code == 2 and err[0].startswith(expected), err
    assert len(err) == (2 if case == "bad data" else 1)  # train.py's line, then which stage failed
    assert not out.exists()


# ----------------------------------------------------------------------------------------- outputs


@pytest.mark.parametrize("command", ["ppl", "mc"])
def test_a_refused_command_makes_no_directory_of_its_out(command, chat_data, tmp_path):
    """--out's missing directories are made when it is written, not when it is checked."""
    data_file = chat_data if command == "ppl" else write_jsonl(tmp_path / "mc.jsonl", MC)
    out = tmp_path / "new" / "deeper" / "out.jsonl"
    code, stdout, err = run_main(
        E.main, command, *cli(model=tmp_path / "no-model", data=data_file, out=out)
    )
    assert one_line(code, stdout, err).startswith(f"error: {tmp_path / 'no-model'}: config.json")
    assert not (tmp_path / "new").exists()
