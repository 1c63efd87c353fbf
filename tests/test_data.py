"""data.py against transformers' apply_chat_template, hand-written prompts and hand-computed
batches.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import cli
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import AutoTokenizer

import data as D

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import inspect_data  # noqa: E402

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]
# only its markers count
LLAMA3_TEMPLATE = "{{ bos_token }}{% for m in messages %}<|start_header_id|>...{% endfor %}"
# The instruct templates of the families, as their tokenizer_config.json files hold them (Jinja
# text):
GEMMA_TEMPLATE = (  # google/gemma-2b-it, gemma-7b-it, gemma-2-2b-it, gemma-2-9b-it
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}"
    "{% endif %}{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}"
)
MISTRAL_TEMPLATE = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""  # mistralai/Mistral-7B-Instruct-v0.1 and v0.2
QWEN25_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""  # Qwen/Qwen2.5-*-Instruct
# family: (template, special tokens added to SmolLM2's, tokenizer_config.json fields)
FAMILY_TOKENIZERS = {
    "gemma": (
        GEMMA_TEMPLATE,
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<eos>"},
    ),
    "mistral": (MISTRAL_TEMPLATE, ["<s>", "</s>"], {"bos_token": "<s>", "eos_token": "</s>"}),
    "qwen2.5": (QWEN25_TEMPLATE, [], {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}),
}
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# digits, unicode, leading and trailing whitespace: where tokenizing in pieces would differ
CONVERSATION = [
    {"role": "user", "content": "What is 12 + 30? Answer in one word, s'il vous plaît."},
    {"role": "assistant", "content": "42 🙂"},
    {"role": "user", "content": "  And in French?\n"},
    {"role": "assistant", "content": "\n\n  Quarante-deux.  \n"},
]


def write(path: Path, text) -> Path:
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def jsonl(path: Path, records) -> Path:
    return write(path, "".join(json.dumps(r) + "\n" for r in records))


def family_tokenizer_dir(smollm2_dir: Path, path: Path, family: str) -> Path:
    """SmolLM2's tokenizer.json with the family's special tokens added, and a tokenizer_config.json
    with the family's chat template: the template's behaviour on real BPE tokens, without the
    family's own vocabulary."""
    template, specials, config = FAMILY_TOKENIZERS[family]
    tok = Tokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, **config}))
    return path


def byte_tokenizer_dir(path: Path, specials, config: dict, bos=None) -> Path:
    """A byte-level tokenizer with no merges (one token per byte) and the given special tokens; its
    post-processor adds `bos` before every text, like base Llama-3's."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    path.mkdir()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return D.load_tokenizer(smollm2_dir)


@pytest.fixture(scope="module")
def hf_smol(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


@pytest.fixture(scope="module")
def llama3(tmp_path_factory):
    config = {
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>",
        "chat_template": LLAMA3_TEMPLATE,
    }
    path = tmp_path_factory.mktemp("llama3") / "tok"
    return D.load_tokenizer(
        byte_tokenizer_dir(path, LLAMA3_SPECIALS, config, bos="<|begin_of_text|>")
    )


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A base model's tokenizer: no chat template, BOS added by the tokenizer itself."""
    path = tmp_path_factory.mktemp("base") / "tok"
    config = {"bos_token": "<s>", "eos_token": "</s>"}
    return D.load_tokenizer(byte_tokenizer_dir(path, ["<s>", "</s>"], config, bos="<s>"))


def hf_ids(hf_tok, messages, **kw):
    return hf_tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kw)["input_ids"]


def trained_targets(sample):
    return [x for x in sample.labels if x != D.IGNORE]


# --- reading
# -------------------------------------------------------------------------------------------------


def test_alpaca_json_array_and_json_lines_read_the_same(tmp_path):
    records = [
        {"instruction": "Name a color.", "input": "", "output": "Blue."},
        {"instruction": "Add.", "input": "2 and 3", "output": "5"},
    ]
    array = D.read_examples(write(tmp_path / "a.json", json.dumps(records, indent=2)))
    lines = D.read_examples(jsonl(tmp_path / "a.jsonl", records))
    assert (
        [e.messages for e in array]
        == [e.messages for e in lines]
        == [
            [
                {"role": "user", "content": "Name a color."},
                {"role": "assistant", "content": "Blue."},
            ],
            [
                {
                    "role": "user",
                    "content": "Add.\n\n2 and 3",
                    "instruction": "Add.",
                    "input": "2 and 3",
                },
                {"role": "assistant", "content": "5"},
            ],
        ]
    )


def test_sharegpt_and_messages_formats_read_to_the_same_roles(tmp_path):
    sharegpt = [
        {
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "Q"},
                {"from": "gpt", "value": "A"},
            ]
        }
    ]
    messages = [
        {
            "messages": [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Q"},
                {"role": "assistant", "content": "A"},
            ]
        }
    ]
    expected = [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert D.read_examples(jsonl(tmp_path / "s.jsonl", sharegpt))[0].messages == expected
    assert D.read_examples(jsonl(tmp_path / "m.jsonl", messages))[0].messages == expected


def test_id_is_the_id_field_else_file_name_and_record_index(tmp_path):
    records = [
        {"instruction": "a", "output": "b"},
        {"id": "x7", "instruction": "a", "output": "b"},
        {"id": 12, "instruction": "a", "output": "b"},
    ]
    path = write(
        tmp_path / "d.jsonl",
        "\n".join(json.dumps(r) for r in records[:1])
        + "\n\n"
        +
        # a blank line: indices count records, not lines
        "\n".join(json.dumps(r) for r in records[1:]),
    )
    assert [e.id for e in D.read_examples(path)] == ["d.jsonl:0", "x7", "12"]
    array = D.read_examples(write(tmp_path / "d.json", json.dumps(records[:1] * 2)))
    assert [e.id for e in array] == ["d.json:0", "d.json:1"]


def test_forced_format_overrides_detection(tmp_path):
    path = jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "instruction": "a",
                "output": "b",
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ],
            }
        ],
    )
    assert D.read_examples(path)[0].messages[0]["content"] == "Q"
    assert D.read_examples(path, fmt="alpaca")[0].messages[0]["content"] == "a"


# --- bad input: one line, exit 2, no traceback
# -------------------------------------------------------------

ALPACA_OK = '{"instruction": "a", "output": "b"}'
BAD_INPUT = {  # name: (file name, content, extra arguments, message after "error: <dir>/")
    "invalid JSON on a line": (
        "d.jsonl",
        ALPACA_OK + '\n{"instruction": "a", "output": }\n',
        [],
        "d.jsonl:2: invalid JSON: Expecting value at column 32; expected one object per line",
    ),
    "truncated JSON array": (
        "d.json",
        f'[\n  {ALPACA_OK},\n  {{"instruction": "a", "outp',
        [],
        "d.json:3: invalid JSON array: Unterminated string at column 24; "
        "the file ends inside the array (truncated?)",
    ),
    "empty file": (
        "d.jsonl",
        "\n  \n",
        [],
        "d.jsonl: empty file; expected a JSON array of records or one JSON object per line",
    ),
    "empty JSON array": ("d.json", "[]", [], "d.json: no records; expected at least one"),
    "unknown format": (
        "d.jsonl",
        '{"prompt": "a", "completion": "b"}',
        [],
        'd.jsonl:1: cannot tell the format: expected key "instruction" (alpaca), "conversations" '
        "(sharegpt) or \"messages\" (messages), got keys ['completion', 'prompt']; or pass --format",
    ),
    "unknown --format": (
        "d.jsonl",
        ALPACA_OK,
        ["--format", "xml"],
        '--format: expected one of alpaca, sharegpt, messages, got "xml"',
    ),
    "record not an object": (
        "d.jsonl",
        ALPACA_OK + "\n[1, 2]",
        [],
        "d.jsonl:2: expected a JSON object, got an array",
    ),
    "missing field": (
        "d.jsonl",
        ALPACA_OK + '\n{"instruction": "a"}',
        [],
        'd.jsonl:2: "output": expected a string, got nothing',
    ),
    "non-string field": (
        "d.json",
        '[{"instruction": "a", "input": 3, "output": "b"}]',
        [],
        'd.json:record 0: "input": expected a string, got a number',
    ),
    "non-string turn": (
        "d.jsonl",
        json.dumps(
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": None}]}
        ),
        [],
        'd.jsonl:1: "conversations"[1].value: expected a string, got null',
    ),
    "empty response": (
        "d.jsonl",
        '{"instruction": "a", "output": " \\n"}',
        [],
        'd.jsonl:1: "output": expected a non-empty response, got " \\n"',
    ),
    "empty turn list": (
        "d.jsonl",
        '{"messages": []}',
        [],
        'd.jsonl:1: "messages": expected a non-empty array of turns, got an empty array',
    ),
    "no assistant turn": (
        "d.jsonl",
        '{"conversations": [{"from": "human", "value": "Q"}]}',
        [],
        'd.jsonl:1: "conversations"[0].from: expected the last turn from "gpt", got "human"',
    ),
    "roles out of order": (
        "d.jsonl",
        json.dumps(
            {
                "conversations": [
                    {"from": "human", "value": "Q"},
                    {"from": "gpt", "value": "A"},
                    {"from": "system", "value": "S"},
                ]
            }
        ),
        [],
        'd.jsonl:1: "conversations"[2].from: expected "human" after "gpt", got "system"',
    ),
    "assistant first": (
        "d.jsonl",
        '{"messages": [{"role": "assistant", "content": "A"}]}',
        [],
        'd.jsonl:1: "messages"[0].role: expected "system" or "user" first, got "assistant"',
    ),
    "unknown role": (
        "d.jsonl",
        '{"conversations": [{"from": "bing", "value": "Q"}]}',
        [],
        'd.jsonl:1: "conversations"[0].from: expected one of "system", "human", "gpt", got "bing"',
    ),
    "duplicate id": (
        "d.jsonl",
        '{"id": "a", "instruction": "a", "output": "b"}\n' * 2,
        [],
        'd.jsonl:2: "id": duplicate id "a" (first at {dir}/d.jsonl:1)',
    ),
    "non-UTF-8 file": (
        "d.jsonl",
        ALPACA_OK.encode() + b'\n{"instruction": "caf\xe9", "output": "b"}',
        [],
        "d.jsonl:2: not UTF-8 (byte 0xe9); expected UTF-8 JSON text",
    ),
    "multi-turn in alpaca prompt format": (
        "d.jsonl",
        json.dumps(
            {
                "id": "c1",
                "messages": [
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ]
                * 2,
            }
        ),
        ["--prompt-format", "alpaca"],
        "c1: messages: the alpaca prompt format holds one instruction and one response, got turns "
        "['user', 'assistant', 'user', 'assistant']; use a chat format: --prompt-format chatml, llama3, gemma "
        "or mistral",
    ),
}


@pytest.mark.parametrize("name", BAD_INPUT)
def test_bad_input_is_one_clear_line_and_exit_2(name, tmp_path, base, capsys):
    file_name, content, extra, message = BAD_INPUT[name]
    path = write(tmp_path / file_name, content)
    with pytest.raises(SystemExit) as exit:
        inspect_data.main(["--data", str(path), "--tokenizer", str(base.dir), *extra])
    assert exit.value.code == 2
    prefix = "" if message.startswith(("--", "c1:")) else f"{tmp_path}/"
    assert capsys.readouterr().err == f"error: {prefix}{message.format(dir=tmp_path)}\n"


def test_tokenizer_directory_without_tokenizer_json_is_an_error(tmp_path):
    message = f"^{tmp_path}: no tokenizer.json; expected a Hugging Face tokenizer directory$"
    with pytest.raises(D.InputError, match=message):
        D.load_tokenizer(tmp_path)


def test_command_line_error_has_no_traceback(tmp_path, base):
    path = write(tmp_path / "d.jsonl", '{"instruction": "a", "output": ""}\n')
    run = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "inspect_data.py"),
            *cli(data=path, tokenizer=base.dir),
        ],
        capture_output=True,
        text=True,
    )
    assert (run.returncode, run.stdout) == (2, "")
    assert run.stderr == f'error: {path}:1: "output": expected a non-empty response, got ""\n'


# --- prompt formats and labels
# -------------------------------------------------------------------------------


def test_prompt_format_is_detected_from_the_chat_template(smol, llama3, base, tmp_path):
    assert (smol.prompt_format, llama3.prompt_format, base.prompt_format) == (
        "chatml",
        "llama3",
        "alpaca",
    )
    assert smol.default_system == SMOL_SYSTEM
    # Llama 2's markers: none of ours
    llama2 = "{{ bos_token + '[INST] <<SYS>>' + s + '<</SYS>>' + m + ' [/INST]' }}"
    # Mistral v0.3's: no space before [/INST]
    mistral3 = "{{ bos_token + '[INST] ' + m + '[/INST]' }}"
    for template in (llama2, mistral3):
        other = D.load_tokenizer(
            byte_tokenizer_dir(tmp_path / str(len(template)), [], {"chat_template": template})
        )
        with pytest.raises(
            D.InputError, match="cannot tell the prompt format; pass --prompt-format"
        ):
            D.encode_prompt([{"role": "user", "content": "Q"}], other)


@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_smollm2_ids_equal_apply_chat_template(smol, hf_smol, system):
    messages = ([{"role": "system", "content": system}] if system else []) + CONVERSATION
    sample = D.tokenize(D.Example("c", messages), smol, max_len=10_000)
    ref = hf_ids(hf_smol, messages)
    # the last token, "\n" after <|im_end|>, is only ever a target
    assert sample.input_ids == ref[:-1]
    assert smol.decode(ref[-1:]) == "\n"


def test_smollm2_trains_each_assistant_turn_with_its_im_end_and_nothing_else(smol, hf_smol):
    """Trained targets are the tokens from just after each assistant header to its <|im_end|>, where
    transformers puts them: [len(prompt up to the turn + generation header), len(conversation up to
    the turn) - 1)."""
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 6 x 7?"},
        {"role": "assistant", "content": "It is 42."},
    ]
    sample = D.tokenize(D.Example("c", messages), smol)
    ref = hf_ids(hf_smol, messages)
    expected = [D.IGNORE] * (len(ref) - 1)
    for k in (1, 3):
        start = len(hf_ids(hf_smol, messages[:k], add_generation_prompt=True))
        stop = len(hf_ids(hf_smol, messages[: k + 1])) - 1
        # labels[t] is the target of position t: token t + 1
        expected[start - 1 : stop - 1] = ref[start:stop]
        assert hf_smol.decode(ref[start:stop]) == messages[k]["content"] + "<|im_end|>"
    assert sample.labels == expected


@pytest.fixture(scope="module")
def family(smollm2_dir, tmp_path_factory, request):
    """(name, our Tokenizer, transformers' tokenizer) of a family's template over SmolLM2's tokens."""
    path = family_tokenizer_dir(
        smollm2_dir, tmp_path_factory.mktemp(request.param) / "tok", request.param
    )
    return request.param, D.load_tokenizer(path), AutoTokenizer.from_pretrained(path)


FAMILY_FORMATS = {"gemma": "gemma", "mistral": "mistral", "qwen2.5": "chatml"}


@pytest.mark.parametrize("family", FAMILY_FORMATS, indirect=True)
def test_family_template_is_detected_and_ids_equal_apply_chat_template(family):
    """Token ids of the whole conversation, and the trained targets: each assistant turn with its
    end-of-turn token, exactly where transformers' rendering puts them (from the generation prompt
    to the end-of-turn token)."""
    name, tok, hf_tok = family
    assert tok.prompt_format == FAMILY_FORMATS[name]
    assert (
        D.tokenize(D.Example("c", CONVERSATION), tok, max_len=10_000).input_ids
        == hf_ids(hf_tok, CONVERSATION)[:-1]
    )
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "What is 6 x 7?"},
        {"role": "assistant", "content": "It is 42."},
    ]
    sample, ref = D.tokenize(D.Example("c", messages), tok), hf_ids(hf_tok, messages)
    expected = [D.IGNORE] * (len(ref) - 1)
    for k in (1, 3):
        start = len(hf_ids(hf_tok, messages[:k], add_generation_prompt=True))
        # its end-of-turn, included
        stop = next(i for i in range(start, len(ref)) if ref[i] in D.stop_ids(tok)) + 1
        # labels[t] is the target of position t: token t + 1
        expected[start - 1 : stop - 1] = ref[start:stop]
        content = messages[k]["content"]
        assert (
            hf_tok.decode(ref[start:stop])
            == {
                "gemma": f"{content}<end_of_turn>",
                "mistral": f" {content}</s>",
                "qwen2.5": f"{content}<|im_end|>",
            }[name]
        )
    assert sample.input_ids == ref[:-1] and sample.labels == expected
    assert D.encode_prompt(CONVERSATION[:3], tok) == hf_ids(
        hf_tok, CONVERSATION[:3], add_generation_prompt=True
    )


@pytest.mark.parametrize("family", ["mistral", "qwen2.5"], indirect=True)
def test_family_system_turn_equals_apply_chat_template(family):
    """Mistral's template puts a system turn before the first user turn's content; Qwen's replaces
    its default.
    """
    _, tok, hf_tok = family
    messages = [{"role": "system", "content": "Be brief. "}] + CONVERSATION
    assert D.tokenize(D.Example("c", messages), tok).input_ids == hf_ids(hf_tok, messages)[:-1]


@pytest.mark.parametrize("family", ["gemma"], indirect=True)
def test_gemma_puts_a_system_turn_before_the_first_user_turn_which_its_template_refuses(family):
    """Gemma 1 and 2's templates raise on a system turn; here it goes before the first user turn's
    content with a blank line between, as Gemma 3's template does (the system text as it is, the
    user's stripped)."""
    _, tok, hf_tok = family
    messages = [{"role": "system", "content": " Be brief."}] + CONVERSATION[:2]
    with pytest.raises(Exception, match="System role not supported"):
        hf_tok.apply_chat_template(messages, tokenize=False)
    sample = D.tokenize(D.Example("c", messages), tok)
    # the last token, "\n" after <end_of_turn>, is only ever a target
    assert tok.decode(sample.input_ids) == (
        "<bos><start_of_turn>user\n Be brief.\n\nWhat is 12 + 30? Answer in one word, s'il vous plaît.<end_of_turn>\n"
        "<start_of_turn>model\n42 🙂<end_of_turn>"
    )
    assert tok.decode(trained_targets(sample)) == "42 🙂<end_of_turn>"


def test_labels_are_the_next_token_or_ignored(smol, hf_smol):
    """labels[t], where trained, is token t + 1 of the conversation transformers renders, up to the
    last label (its last token); some are trained."""
    sample = D.tokenize(D.Example("c", CONVERSATION), smol)
    ref = hf_ids(hf_smol, CONVERSATION)
    assert len(sample.labels) == len(sample.input_ids) == len(ref) - 1
    trained = [t for t, label in enumerate(sample.labels) if label != D.IGNORE]
    assert trained and [sample.labels[t] for t in trained] == [ref[t + 1] for t in trained]


def test_llama3_rendering_equals_the_hand_written_prompt_with_one_bos(llama3):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi \n"},
        {"role": "assistant", "content": "Hello!\n"},
    ]
    sample = D.tokenize(D.Example("c", messages), llama3)
    # the last token, <|eot_id|>, is trained: it is the last label
    full = sample.input_ids + sample.labels[-1:]
    assert llama3.decode(full) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    )
    # the post-processor's BOS is not added again
    assert full.count(llama3.bos_id) == 1 and full[0] == llama3.bos_id
    assert llama3.decode(trained_targets(sample)) == "Hello!<|eot_id|>"
    assert llama3.decode(D.encode_prompt(messages[:2], llama3)).endswith(
        "Hi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("with_input", [False, True])
def test_alpaca_rendering_equals_the_stanford_template(base, smol, with_input, tmp_path):
    record = {
        "instruction": "Add the numbers.",
        "input": "2 and 3" if with_input else "",
        "output": "5",
    }
    example = D.read_examples(jsonl(tmp_path / "a.jsonl", [record]))[0]
    if with_input:
        prompt = (
            "Below is an instruction that describes a task, paired with an input that provides further context. "
            "Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nAdd the numbers.\n\n### Input:\n2 and 3\n\n### Response:\n"
        )
    else:
        prompt = (
            "Below is an instruction that describes a task. Write a response that appropriately completes the "
            "request.\n\n### Instruction:\nAdd the numbers.\n\n### Response:\n"
        )
    # base: the tokenizer adds <s>, so the prompt starts with it, once
    sample = D.tokenize(example, base)
    assert base.decode(sample.input_ids + sample.labels[-1:]) == "<s>" + prompt + "5</s>"
    assert base.decode(trained_targets(sample)) == "5</s>"
    sample = D.tokenize(example, smol, "alpaca")  # SmolLM2's tokenizer adds no BOS
    assert smol.decode(sample.input_ids + sample.labels[-1:]) == prompt + "5<|im_end|>"


def test_encode_prompt_equals_apply_chat_template_with_generation_prompt(smol, hf_smol):
    messages = CONVERSATION[:3]
    assert D.encode_prompt(messages, smol) == hf_ids(hf_smol, messages, add_generation_prompt=True)
    with pytest.raises(D.InputError, match='expected the last turn from "user", got "assistant"'):
        D.encode_prompt(CONVERSATION, smol)


def test_stop_ids_are_the_end_of_turn_token_and_eos(smol, llama3, base, smollm2_dir, tmp_path):
    assert D.stop_ids(smol) == [smol.encode("<|im_end|>")[0]] == [2]
    assert D.stop_ids(llama3) == llama3.encode("<|eot_id|><|end_of_text|>")
    assert D.stop_ids(base) == base.encode("</s>")
    gemma, mistral = (
        D.load_tokenizer(family_tokenizer_dir(smollm2_dir, tmp_path / f, f))
        for f in ("gemma", "mistral")
    )
    assert D.stop_ids(gemma) == gemma.encode("<end_of_turn><eos>")
    assert D.stop_ids(mistral) == mistral.encode("</s>")  # the end of a turn is EOS


def test_truncation_keeps_the_left_part(smol, hf_smol):
    sample = D.tokenize(D.Example("c", CONVERSATION), smol, max_len=60)
    full = D.tokenize(D.Example("c", CONVERSATION), smol)
    assert sample.input_ids == hf_ids(hf_smol, CONVERSATION)[:60]
    assert sample.labels == full.labels[:60]


def test_example_with_no_trained_token_left_is_dropped_and_counted(smol, tmp_path, capsys):
    long_question = {
        "messages": [
            {"role": "user", "content": "word " * 100},
            {"role": "assistant", "content": "Ok."},
        ]
    }
    short = {
        "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    }
    path = jsonl(tmp_path / "d.jsonl", [long_question, short])
    prompt_len = len(
        smol.encode(
            f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\n{'word ' * 100}"
            "<|im_end|>\n<|im_start|>assistant\n"
        )
    )
    # the first response token would be the target
    samples, stats = D.load_dataset(path, smol, max_len=prompt_len - 1)
    # of position prompt_len - 1: cut
    assert [s.id for s in samples] == ["d.jsonl:1"]
    assert (stats["dropped"], stats["dropped_ids"], stats["truncated"]) == (1, ["d.jsonl:0"], 1)
    assert "1 dropped (no trained token left)" in capsys.readouterr().out
    samples, stats = D.load_dataset(path, smol, max_len=prompt_len)
    assert len(samples) == 2 and trained_targets(samples[0]) == smol.encode("Ok.")[:1]
    with pytest.raises(D.InputError, match="no example keeps a trained token within max_len 5"):
        D.load_dataset(path, smol, max_len=5)


# --- batching
# ------------------------------------------------------------------------------------------------


def test_collate_pads_on_the_right_with_labels_ignored():
    batch = D.collate([D.Sample("a", [5, 6, 7], [6, 7, -100]), D.Sample("b", [8], [9])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[6, 7, -100], [9, -100, -100]]
    assert (
        batch["ids"] == ["a", "b"]
        and batch["input_ids"].dtype == batch["labels"].dtype == torch.long
    )


def test_shuffled_order_is_a_permutation_fixed_by_seed_and_epoch():
    orders = {(s, e): D.shuffled_order(100, s, e) for s in (0, 1) for e in (0, 1)}
    assert all(sorted(o) == list(range(100)) for o in orders.values())
    assert orders[0, 0] == D.shuffled_order(100, 0, 0)
    # seed 0 epoch 1 differs from seed 1 epoch 0
    assert len({tuple(o) for o in orders.values()}) == 4


def test_length_grouped_batches_cover_each_index_once_and_cut_padding():
    lengths = [1, 9, 2, 8, 3]
    batches = D.length_grouped_batches(lengths, 2)
    assert batches == [[1, 3], [4, 2], [0]]
    assert inspect_data.padding_waste(lengths, batches) == pytest.approx(
        1 - 23 / (2 * 9 + 2 * 3 + 1)
    )
    assert inspect_data.padding_waste(lengths, [[0, 1], [2, 3], [4]]) == pytest.approx(
        1 - 23 / (2 * 9 + 2 * 8 + 3)
    )


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_hold_every_example_once_with_its_id(world_size):
    samples = [D.Sample(f"id{i}", [i], [i]) for i in range(10)]
    shards = [D.shard(samples, rank, world_size) for rank in range(world_size)]
    gathered = [s.id for part in shards for s in part]
    assert sorted(gathered) == sorted(s.id for s in samples) and len(set(gathered)) == 10
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


# --- scripts/inspect_data.py
# -------------------------------------------------------------------------------------------------


def test_inspect_marks_the_trained_spans_and_reports_stats(smol, tmp_path, capsys):
    path = jsonl(
        tmp_path / "d.jsonl",
        [
            {
                "id": "q1",
                "conversations": [
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello!"},
                    {"from": "human", "value": "Bye"},
                    {"from": "gpt", "value": "Goodbye."},
                ],
            }
        ],
    )
    inspect_data.main(["--data", str(path), "--tokenizer", str(smol.dir), "-n", "1"])
    out = capsys.readouterr().out
    assert (
        f"<|im_start|>system\n{SMOL_SYSTEM}<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n[[Hello!<|im_end|>]]\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n[[Goodbye.<|im_end|>]]"
    ) in out
    assert "format: sharegpt (detected from the keys)" in out
    assert f"prompt format: chatml (detected from {smol.dir})" in out
    assert (
        "examples: 1, samples: 1, truncated to max_len 2048: 0, dropped (no trained token left): 0"
        in out
    )


# --- parquet
# -------------------------------------------------------------------------------------------------

# the columns of the paper's parquet sets; messages a list of {content, role} structs, as published
LAYOUTS = {
    "UltraChat-200K": lambda i, m: {"prompt": m[0]["content"], "prompt_id": f"p{i}", "messages": m},
    "Tulu 3 SFT mixture": lambda i, m: {"id": f"tulu-{i}", "messages": m, "source": "oasst"},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parquet_of_messages_reads_to_the_token_ids_of_the_same_records_in_json_lines(
    layout, smol, hf_smol, tmp_path
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    system = [{"content": "Be brief.", "role": "system"}]
    turns = [{"content": m["content"], "role": m["role"]} for m in CONVERSATION]
    records = [LAYOUTS[layout](i, m) for i, m in enumerate([turns, system + turns[:2], turns[2:]])]
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "d.parquet")
    assert pq.read_schema(tmp_path / "d.parquet").field("messages").type == pa.list_(
        pa.struct([("content", pa.string()), ("role", pa.string())])
    )
    from_parquet, stats = D.load_dataset(tmp_path / "d.parquet", smol, verbose=False)
    from_json, _ = D.load_dataset(jsonl(tmp_path / "d.jsonl", records), smol, verbose=False)
    assert stats["format"] == "messages" and len(from_parquet) == 3
    assert [(s.input_ids, s.labels) for s in from_parquet] == [
        (s.input_ids, s.labels) for s in from_json
    ]
    assert [s.id.replace("d.jsonl", "d.parquet") for s in from_json] == [s.id for s in from_parquet]
    # and both are transformers' tokens of the conversation
    for sample, r in zip(from_parquet, records):
        messages = [{"role": m["role"], "content": m["content"]} for m in r["messages"]]
        # input_ids end one token before the text
        assert sample.input_ids == hf_ids(hf_smol, messages)[:-1]


@pytest.mark.parametrize("fault", ["pyarrow missing", "truncated"])
def test_a_parquet_file_that_cannot_be_read_is_one_line(fault, smol, tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "messages": [
                        {"content": "Hi", "role": "user"},
                        {"content": "Hello", "role": "assistant"},
                    ]
                }
            ]
        ),
        path,
    )
    if fault == "pyarrow missing":
        monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow raises ImportError
        expected = f"error: {path}: a parquet file; reading it needs pyarrow: pip install pyarrow"
    else:
        path.write_bytes(path.read_bytes()[:-20])
        expected = f"error: {path}: not a readable parquet file ("
    with pytest.raises(SystemExit) as e:
        inspect_data.main(["--data", str(path), "--tokenizer", str(smol.dir)])
    out, err = capsys.readouterr()
    assert (
        e.value.code == 2 and out == "" and len(err.splitlines()) == 1 and err.startswith(expected)
    ), err
