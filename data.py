"""Instruction data to token ids with response-only labels.

    file --read_examples--> Example(id, messages) --tokenize--> Sample(id, input_ids, labels)
    --pack--> row

Data formats (a JSON array, JSON lines, or a parquet file of such records, as UltraChat-200K and
Tulu 3's SFT mixture are published: read with pyarrow where it is installed), detected from the
first record's keys or forced with --format:
    alpaca    {"instruction", "input" (optional), "output"}
    sharegpt  {"conversations": [{"from": "system"|"human"|"gpt", "value"}, ...]}
    messages  {"messages": [{"role": "system"|"user"|"assistant", "content"}, ...]}
An optional system turn, then user and assistant turns in alternation, ending with an assistant
turn. Every example keeps one id through every stage of SFTMix (dynamics, split, mixing), whatever
the tokenizer: its own "id" field, else "<file name>:<record index>".

Prompt formats, detected from the tokenizer's chat template when not given:
    chatml   <|im_start|>role\\ncontent<|im_end|>\\n ...   (SmolLM2, Qwen2, Qwen2.5) no BOS; the
             template's default system prompt is added when a conversation has none, as it does.
    llama3   <|begin_of_text|><|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|> ...
             content stripped, as Llama-3's template does (3.1's dated system prompt is not added).
    gemma    <bos><start_of_turn>user\\ncontent<end_of_turn>\\n<start_of_turn>model\\ncontent<end_of_turn>\\n ...
             (Gemma, Gemma 2) content stripped, as the template does.
    mistral  <s> [INST] content [/INST] content</s> [INST] ...   (Mistral-7B-Instruct v0.1 and
             v0.2's template; v0.3's, with no space before [/INST], is not detected as it: pass
             --prompt-format to use this one). gemma and mistral have no system turn: its content
             goes before the first user turn's content, then a blank line, as Mistral's template
             and Gemma 3's do (Gemma 1 and 2's templates refuse one).
    alpaca   Stanford Alpaca's prompt (ending "### Response:\\n", as in its README), the response,
             EOS; for base models (no chat template); BOS only if the tokenizer itself adds one.
             One instruction and one response; a system turn, or more turns, need a chat format.

Labels. Every assistant turn is trained together with its end-of-turn token (<|im_end|>, <|eot_id|>,
<end_of_turn>, EOS), so the model learns to stop; all else is -100. The rendered text is tokenized
whole, as transformers' apply_chat_template does, and a token is trained when its characters overlap
an assistant turn (tokenizing turn by turn would differ where a response starts with whitespace: BPE
joins it with the header's newline). Labels are PRE-SHIFTED, so the loss needs no shift:

    x_0 .. x_L       the rendered conversation's tokens, truncated on the right to max_len + 1 tokens
    input_ids[t] = x_t                                        t = 0 .. L-1
    labels[t]    = x_{t+1} if x_{t+1} is trained, else -100   (the target for position t)
    loss         = cross_entropy(logits[t], labels[t], ignore_index=-100)

An example left with no trained token after truncation is dropped and counted, never trained on
nothing.
"""

import argparse
import codecs
import errno
import hashlib
import itertools
import json
import math
import os
import re
import shutil
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch

IGNORE = -100  # label of a position that is not trained (prompt, padding); PyTorch's ignore_index
MAX_LEN = 2048
FORMATS = ("alpaca", "sharegpt", "messages")
PROMPT_FORMATS = ("chatml", "llama3", "gemma", "mistral", "alpaca")
ROLES = ("system", "user", "assistant")
TURNS = {  # format: (list key, role key, text key, its names of ROLES)
    "sharegpt": ("conversations", "from", "value", ("system", "human", "gpt")),
    "messages": ("messages", "role", "content", ROLES),
}
NEXT_ROLES = {
    None: ("system", "user"),
    "system": ("user",),
    "user": ("assistant",),
    "assistant": ("user",),
}
# prompt format: (start of text, {role: (header, turn with {} for the content, after it)}, strip)
CHAT = {  # {bos}, {eos}: the tokenizer's; strip: the content is stripped
    "chatml": ("", {r: (f"<|im_start|>{r}\n", "{}<|im_end|>", "\n") for r in ROLES}, False),
    "llama3": (
        "<|begin_of_text|>",
        {r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "{}<|eot_id|>", "") for r in ROLES},
        True,
    ),
    "gemma": (
        "{bos}",
        {
            "user": ("<start_of_turn>user\n", "{}<end_of_turn>", "\n"),
            "assistant": ("<start_of_turn>model\n", "{}<end_of_turn>", "\n"),
        },
        True,
    ),
    "mistral": (
        "{bos}",
        {"user": (" [INST] ", "{} [/INST]", ""), "assistant": ("", " {}{eos}", "")},
        False,
    ),
}
ALPACA = (  # Stanford Alpaca's prompts without and with an input; the response and EOS follow
    "Below is an instruction that describes a task. Write a response that appropriately completes the request."
    "\n\n### Instruction:\n{instruction}\n\n### Response:\n",
    "Below is an instruction that describes a task, paired with an input that provides further context. Write a "
    "response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n### Input:\n{input}"
    "\n\n### Response:\n",
)


class InputError(Exception):
    """Bad input (a file, a field, a flag) in any of the five files, said in one line (reported):
    '<file>:<line or record>: <field>: <what was expected>'."""


@contextmanager
def reported():
    """Every command's main runs in this: an InputError is its message as one line on stderr ("error
    (rank R):" on the ranks after 0 under torchrun) and exit code 2; any other exception is a bug
    and keeps its traceback."""
    try:
        yield
    except InputError as e:
        rank = int(os.environ.get("RANK", 0))
        print(f"error: {e}" if rank == 0 else f"error (rank {rank}): {e}", file=sys.stderr)
        sys.exit(2)


RANGE = re.compile(r"(>=|>) (-?[\d.]+)|in ([\[(])(-?[\d.]+), (-?[\d.]+)([\])])")


def number(flag: str, kind, expected: str):
    """The argparse type of a numeric flag: kind (int or float) of text, finite (an integer below
    2**63: a 64-bit seed) and in the range that `expected` says (">= 1", "> 0 and finite", "in [0,
    1)", "in (0, 1]", words may follow), else an InputError '<flag>: expected <expected>, got
    <value>'. parse_args raises it: a command parses inside reported(), so a bad number is one line
    and exit 2, as any bad input."""
    op, low, left, a, b, right = RANGE.match(expected).groups()

    def within(v):
        if op:  # ">= low" or "> low"
            return v >= float(low) if op == ">=" else v > float(low)
        above = float(a) <= v if left == "[" else float(a) < v  # "in [a, b)", "in (a, b]", ...
        return above and (v <= float(b) if right == "]" else v < float(b))

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:  # not a number, or an integer of more than 4300 digits
            what = "an integer" if kind is int else "a number"
            raise InputError(f"{flag}: expected {what} {expected}, got {text[:60]!r}") from None
        got = str(value)[:60] + ("..." if len(str(value)) > 60 else "")
        if kind is int and within(value) and value >= 2**63:  # torch's seeds, numpy's integers
            raise InputError(f"{flag}: expected an integer {expected} (below 2**63), got {got}")
        if not (within(value) and math.isfinite(value)):  # within first: no float of a huge int
            raise InputError(f"{flag}: expected {expected}, got {got}")
        return value

    return parse


def add_number(parser, flag: str, kind, expected: str, default, help: str, **kw) -> None:
    """parser.add_argument for a numeric flag, its range checked by its type (number)."""
    parser.add_argument(flag, type=number(flag, kind, expected), default=default, help=help, **kw)


def read_json(path) -> dict:
    """The JSON object a file holds; unreadable, not JSON, or not an object: an InputError naming
    the file. Every command reads its JSON files (config.json, split.json, ...) through this, and
    names the key it then finds wrong (json_field)."""
    path = Path(path)
    try:
        obj = json.loads(path.read_bytes())
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    except (ValueError, RecursionError) as e:  # not UTF-8, not JSON, or more than Python reads
        why = _beyond(e) or f"not a JSON file ({e}); truncated or corrupted?"
        raise InputError(f"{path}: {why}") from None
    if not isinstance(obj, dict):
        raise InputError(f"{path}: expected a JSON object, got {_kind(obj)}")
    return obj


def _beyond(e) -> str:
    """What json.loads could not read of valid JSON, from what it raised: nesting deeper than
    Python's recursion limit, or an integer longer than its digit limit; "" for anything else."""
    if isinstance(e, RecursionError):
        return "unreadable JSON: nested too deeply"
    if type(e) is ValueError:  # int()'s, not a JSONDecodeError or UnicodeDecodeError
        return f"unreadable JSON: an integer of more than {sys.get_int_max_str_digits()} digits"
    return ""


def json_field(obj: dict, key: str, path, ok, expected: str):
    """obj[key] when ok(it), else an InputError '<path>: <key>: expected <expected>, got <it>'."""
    if key not in obj or not ok(obj[key]):
        got = json.dumps(obj[key])[:60] if key in obj else "nothing"
        raise InputError(f"{path}: {key}: expected {expected}, got {got}")
    return obj[key]


@contextmanager
def atomic_path(path):
    """Yield PATH.tmp to write (its missing directories made); on success rename it to path, so a
    reader never sees a half-written file (a crash leaves at most PATH.tmp, removed here when the
    writer raised)."""
    tmp = Path(str(path) + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def check_output(path, flag="--out", inputs=None) -> Path:
    """An output file, checked before any work and nothing made: a directory in its place, a file
    where a directory of its path must be, a directory that cannot be written, or one of the
    command's inputs ({flag: path or None}) is an InputError. Its missing directories are made when
    it is written (atomic_path), so a refused command leaves none behind."""
    if path == "":
        raise InputError(f"{flag}: expected a file to write, got an empty path")
    path = Path(path)
    for given, input_path in (inputs or {}).items():
        if input_path and Path(input_path).resolve() == path.resolve():
            raise InputError(
                f"{flag} {path}: expected a file other than the inputs, got {given} {input_path}"
            )
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a directory; expected a file to write")
    there = next(d for d in path.absolute().parents if d.exists())  # the nearest that exists
    if not there.is_dir():  # what mkdir would say: the file is the directory, or is above it
        why = os.strerror(errno.EEXIST if there == path.parent.absolute() else errno.ENOTDIR)
        raise InputError(f"{flag} {path}: cannot make its directory {path.parent}: {why}")
    if not os.access(there, os.W_OK):
        raise InputError(f"{flag} {path}: cannot write in {there}")
    return path


def write_json(path, obj, lines=False) -> None:
    """Write JSON (JSON lines from a list with lines=True) atomically."""
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        if lines:
            f.writelines(json.dumps(o) + "\n" for o in obj)
        else:
            json.dump(obj, f, indent=1)
            f.write("\n")


@dataclass
class Example:
    """One conversation: messages = [{"role": "system"|"user"|"assistant", "content": str}, ...].
    An Alpaca user turn with an input has content instruction + "\\n\\n" + input, and also keeps
    "instruction" and "input" for the alpaca prompt's "### Input:" section."""

    id: str
    messages: list


@dataclass
class Sample:
    """Token ids of one example, labels pre-shifted (labels[t]: the target for position t, or -100):
    lists, or (train.py) int32 views into token_arrays' flat arrays, no Python object per token."""

    id: str
    input_ids: list
    labels: list


# --- reading --------------------------------------------------------------------------------------


def _kind(value) -> str:
    """How an error names a JSON value: "an object", "an empty array", "a number", "null", ..."""
    if value == []:
        return "an empty array"
    kinds = {dict: "an object", list: "an array", str: "a string", type(None): "null"}
    kinds |= {bool: "a boolean", int: "a number", float: "a number"}
    # a parquet column of a type JSON lacks (binary, timestamp, ...): its Python type
    return kinds.get(type(value), f"a value of type {type(value).__name__}")


def _text(obj: dict, key: str, where: str, field: str | None = None) -> str:
    if not isinstance(obj.get(key), str):
        got = _kind(obj[key]) if key in obj else "nothing"
        raise InputError(f"{where}: {field or json.dumps(key)}: expected a string, got {got}")
    return obj[key]


def read_records(path: Path) -> list:
    """[(where, record)] of a JSON array ('file:record i'), of JSON lines ('file:line') or of a
    parquet file's rows ('file:row i', read with pyarrow when it is installed)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e.strerror}") from None
    if raw[:4] == b"PAR1" or path.suffix == ".parquet":  # parquet's magic number
        try:
            import pyarrow.parquet
        except ImportError:
            raise InputError(
                f"{path}: a parquet file; reading it needs pyarrow: pip install pyarrow"
            ) from None
        try:  # a list of structs, as a messages column, becomes a list of dicts
            rows = pyarrow.parquet.read_table(pyarrow.BufferReader(raw)).to_pylist()
        except (pyarrow.ArrowException, OSError, ValueError) as e:
            raise InputError(
                f"{path}: not a readable parquet file ({e}); truncated or corrupted?"
            ) from None
        return [(f"{path}:row {i}", r) for i, r in enumerate(rows)]
    raw = raw.removeprefix(codecs.BOM_UTF8)  # a UTF-8 BOM is read past, as in JSON files
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise InputError(
            f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x}); expected UTF-8 JSON text"
        ) from None
    if not text.strip():
        raise InputError(
            f"{path}: empty file; expected a JSON array of records or one JSON object per line"
        )
    array = text.lstrip().startswith("[")
    records = []
    try:
        if array:
            records = [(f"{path}:record {i}", r) for i, r in enumerate(json.loads(text))]
        else:  # JSON lines; not splitlines(): JSON strings may hold U+2028
            for n, line in enumerate(text.split("\n"), 1):
                records += [(f"{path}:{n}", json.loads(line))] if line.strip() else []
    except json.JSONDecodeError as e:
        # "Unterminated string starting at" a position: its column instead
        why = f"{e.msg.removesuffix(' starting at')} at column {e.colno}"
        if array:
            ended = text.rstrip().endswith("]")
            cut = "" if ended else "; the file ends inside the array (truncated?)"
            raise InputError(f"{path}:{e.lineno}: invalid JSON array: {why}{cut}") from None
        raise InputError(f"{path}:{n}: invalid JSON: {why}; expected one object per line") from None
    except (ValueError, RecursionError) as e:
        raise InputError(f"{path if array else f'{path}:{n}'}: {_beyond(e)}") from None
    if re.search(r"\\u[dD][89a-fA-F]", text):  # only such an escape makes a lone surrogate
        for where, record in records:
            _check_utf8(record, where)
    return records


def _check_utf8(record, where: str) -> None:
    """Refuse a record whose strings UTF-8 cannot encode: a lone surrogate, from an escape such as
    \\ud800 with no pair (the tokenizer takes no such text); the field is named as '"a"[0].b'."""
    todo = [("", record)]
    while todo:
        field, value = todo.pop()
        if isinstance(value, dict):
            todo += reversed(
                [(f"{field}.{k}" if field else json.dumps(k), v) for k, v in value.items()]
            )
        elif isinstance(value, list):
            todo += reversed([(f"{field}[{i}]", v) for i, v in enumerate(value)])
        elif isinstance(value, str) and not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                got = json.dumps(value[e.start])  # escaped, so printable
                raise InputError(
                    f"{where}: {field or 'the record'}: expected UTF-8 text, got the lone surrogate "
                    f"{got} at character {e.start}"
                ) from None


def _check_order(roles: list, where: str, field: str, names: dict, last: str) -> None:
    """An optional system turn, then user and assistant in alternation, ending with `last`."""
    prev = None
    for i, role in enumerate(roles):
        if role not in NEXT_ROLES[prev]:
            expected = " or ".join(f'"{names.get(r, r)}"' for r in NEXT_ROLES[prev])
            after = f' after "{names.get(prev, prev)}"' if prev else " first"
            raise InputError(
                f'{where}: {field.format(i=i)}: expected {expected}{after}, got "{names.get(role, role)}"'
            )
        prev = role
    if prev != last:
        raise InputError(
            f"{where}: {field.format(i=len(roles) - 1)}: expected the last turn from "
            f'"{names.get(last, last)}", got "{names.get(prev, prev)}"'
        )


def _messages(record, fmt: str, where: str) -> list:
    if not isinstance(record, dict):
        raise InputError(f"{where}: expected a JSON object, got {_kind(record)}")
    if fmt == "alpaca":
        instruction, output = _text(record, "instruction", where), _text(record, "output", where)
        inp = _text(record, "input", where) if "input" in record else ""
        user = {"role": "user", "content": instruction}
        if inp:
            user |= {"content": f"{instruction}\n\n{inp}", "instruction": instruction, "input": inp}
        turns = [(user, '"instruction"'), ({"role": "assistant", "content": output}, '"output"')]
    else:
        key, role_key, text_key, theirs = TURNS[fmt]
        roles = dict(zip(theirs, ROLES))  # {role in the file: role here}
        if not isinstance(record.get(key), list) or not record[key]:
            got = _kind(record[key]) if key in record else "nothing"
            raise InputError(f'{where}: "{key}": expected a non-empty array of turns, got {got}')
        turns = []
        for i, turn in enumerate(record[key]):
            field = f'"{key}"[{i}]'
            if not isinstance(turn, dict):
                raise InputError(f"{where}: {field}: expected an object, got {_kind(turn)}")
            role = _text(turn, role_key, where, f"{field}.{role_key}")
            if role not in roles:
                raise InputError(
                    f"{where}: {field}.{role_key}: expected one of {', '.join(map(json.dumps, roles))}, "
                    f"got {json.dumps(role)}"
                )
            content = _text(turn, text_key, where, f"{field}.{text_key}")
            turns.append(({"role": roles[role], "content": content}, f"{field}.{text_key}"))
        names = dict(zip(ROLES, theirs))
        _check_order(
            [m["role"] for m, _ in turns], where, f'"{key}"[{{i}}].{role_key}', names, "assistant"
        )
    for m, field in turns:
        if m["role"] == "assistant" and not m["content"].strip():
            raise InputError(
                f"{where}: {field}: expected a non-empty response, got {json.dumps(m['content'])}"
            )
    return [m for m, _ in turns]


def _read(path, fmt: str | None) -> tuple:
    """(examples, format, how the format was chosen)."""
    if fmt is not None and fmt not in FORMATS:
        raise InputError(f'--format: expected one of {", ".join(FORMATS)}, got "{fmt}"')
    path = Path(path)
    records = read_records(path)
    if not records:
        raise InputError(f"{path}: no records; expected at least one")
    chosen = "--format" if fmt else "detected from the keys"
    where, first = records[0]
    keys = sorted(first) if isinstance(first, dict) else []
    marks = {"sharegpt": "conversations", "messages": "messages", "alpaca": "instruction"}
    fmt = fmt or next((f for f, key in marks.items() if key in keys), None)
    if fmt is None:
        raise InputError(
            f'{where}: cannot tell the format: expected key "instruction" (alpaca), "conversations" '
            f'(sharegpt) or "messages" (messages), got keys {keys}; or pass --format'
        )
    examples, seen = [], {}
    for i, (where, record) in enumerate(records):
        messages = _messages(record, fmt, where)
        id = record.get("id", f"{path.name}:{i}")
        if not isinstance(id, (str, int)) or isinstance(id, bool) or id == "":
            raise InputError(f'{where}: "id": expected a non-empty string, got {_kind(id)}')
        id = str(id)
        if id in seen:
            raise InputError(
                f'{where}: "id": duplicate id {json.dumps(id)[:60]} (first at {seen[id]})'
            )
        seen[id] = where
        examples.append(Example(id, messages))
    return examples, fmt, chosen


def read_examples(path, fmt: str | None = None) -> list:
    """Examples of a data file; fmt in FORMATS, or None to detect it from the first record's keys."""
    return _read(path, fmt)[0]


# --- tokenizer and prompt formats -----------------------------------------------------------------


@dataclass
class Tokenizer:
    """A tokenizers.Tokenizer, with its Hugging Face directory's special tokens and chat format."""

    hf: tokenizers.Tokenizer
    dir: Path
    bos_token: str | None
    eos_token: str | None
    bos_id: int | None
    eos_id: int | None
    # pad, else EOS, else 0: any id will do (right padding, causal attention, label -100)
    pad_id: int
    add_bos: bool  # tokenizer.json's post-processor puts BOS before a text (base Llama-3, Mistral)
    prompt_format: str | None  # from the chat template's markers; alpaca without a template
    default_system: str | None  # the system prompt a ChatML template adds if none (SmolLM2)

    def encode(self, text: str) -> list:
        """Token ids of text, special-token strings included, with nothing added."""
        return self.hf.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(dir) -> Tokenizer:
    """The tokenizer of a Hugging Face directory (tokenizer.json, tokenizer_config.json if any)."""
    d = Path(dir)
    if not (d / "tokenizer.json").is_file():
        raise InputError(f"{d}: no tokenizer.json; expected a Hugging Face tokenizer directory")
    try:
        hf = tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))
    except Exception as e:  # tokenizers raises a bare Exception
        raise InputError(f"{d / 'tokenizer.json'}: unreadable: {e}") from None
    model = read_json(d / "config.json") if (d / "config.json").is_file() else {}
    vocab_size = model.get("vocab_size")  # of another kind than an integer: model.py refuses it
    largest = max([hf.get_vocab_size(with_added_tokens=False) - 1, *hf.get_added_tokens_decoder()])
    if type(vocab_size) is int and largest >= vocab_size:
        raise InputError(
            f"{d / 'tokenizer.json'}: expected token ids below vocab_size {vocab_size} of "
            f"{d / 'config.json'}, got ids up to {largest}"
        )
    file = d / "tokenizer_config.json"
    config = read_json(file) if file.is_file() else {}
    specials = []
    for key in ("bos_token", "eos_token", "pad_token"):  # null or absent: none
        given = config.get(key)
        token = given.get("content") if isinstance(given, dict) else given  # HF's AddedToken
        if given is not None and not (isinstance(token, str) and hf.token_to_id(token) is not None):
            raise InputError(
                f"{file}: {key}: expected a token of {d / 'tokenizer.json'} (a string or "
                f'{{"content": string}}), got {json.dumps(given)[:60]}'
            )
        specials.append(token)
    bos, eos, pad = specials
    template = chat_template(config.get("chat_template"), file)
    jinja = d / "chat_template.jinja"
    if template is None and jinja.is_file():
        try:
            template = jinja.read_text("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{jinja}: cannot read it as UTF-8 text ({e})") from None
    # the first prompt format whose marker the template holds
    markers = dict(chatml="<|im_start|>", llama3="<|start_header_id|>", gemma="<start_of_turn>")
    markers["mistral"] = " [/INST]"  # Mistral v0.1 and v0.2's [INST] ... [/INST]
    found = next((f for f, m in markers.items() if m in (template or "")), None)
    prompt_format = "alpaca" if template is None else found
    if template and "<<SYS>>" in template:  # Llama 2's [INST] template: none of ours
        prompt_format = None
    system = re.search(r"<\|im_start\|>system(?:\n|\\n)([^'\"]+?)<\|im_end\|>", template or "")
    bos_id, eos_id = (hf.token_to_id(t) if t else None for t in (bos, eos))
    pad_id = next((hf.token_to_id(t) for t in (pad, eos) if t), 0)
    add_bos = bos_id is not None and hf.encode("a").ids[:1] == [bos_id]
    return Tokenizer(
        hf, d, bos, eos, bos_id, eos_id, pad_id, add_bos, prompt_format, system and system.group(1)
    )


def chat_template(template, file):
    """The chat template of tokenizer_config.json: a string, or HF's list of named templates
    [{"name", "template"}, ...], of which the one named "default" is used, as transformers'
    apply_chat_template does when given no name (a list without one: "", no prompt format, so
    --prompt-format must be given); None when absent."""
    named = isinstance(template, list) and all(
        isinstance(t, dict) and all(isinstance(t.get(k), str) for k in ("name", "template"))
        for t in template
    )
    if not (template is None or isinstance(template, str) or named):
        raise InputError(
            f'{file}: chat_template: expected a string or a list of {{"name", '
            f'"template"}} objects, got {json.dumps(template)[:60]}'
        )
    if named:
        return next((t["template"] for t in template if t["name"] == "default"), "")
    return template


def _resolve(tok: Tokenizer, prompt_format: str | None) -> str:
    """The prompt format given, else the tokenizer's, checked to have its special tokens."""
    prompt_format = prompt_format or tok.prompt_format
    if prompt_format is None:
        raise InputError(
            f"{tok.dir}: chat template: cannot tell the prompt format; pass --prompt-format "
            f"({', '.join(PROMPT_FORMATS)})"
        )
    if prompt_format not in PROMPT_FORMATS:
        raise InputError(
            f'--prompt-format: expected one of {", ".join(PROMPT_FORMATS)}, got "{prompt_format}"'
        )
    # alpaca's: EOS; a chat format's: its <...> tokens, and BOS or EOS where it says so
    marks = ["{eos}"]
    if prompt_format in CHAT:
        start, turns, _ = CHAT[prompt_format]
        text = start + "".join(map("".join, turns.values()))
        marks = re.findall(r"\{bos\}|\{eos\}|<[^<>\s{}]+>", text)
    named = {"{bos}": ("bos_token", tok.bos_token), "{eos}": ("eos_token", tok.eos_token)}
    for name, token in (named.get(m, (m, m)) for m in dict.fromkeys(marks)):
        if token is None or len(tok.encode(token)) != 1:
            raise InputError(
                f"{tok.dir}: prompt format {prompt_format} needs the special token {token or name}"
            )
    return prompt_format


def render(messages: list, tok: Tokenizer, prompt_format: str, generation=False, where="") -> list:
    """The conversation as [(text, trained)]; generation=True ends with the assistant's header."""
    if prompt_format == "alpaca":
        roles = [m["role"] for m in messages]
        if roles != (["user"] if generation else ["user", "assistant"]):
            raise InputError(
                f"{where}: messages: the alpaca prompt format holds one instruction and one response, "
                f"got turns {roles}; use a chat format: --prompt-format chatml, llama3, gemma or mistral"
            )
        user = messages[0]
        if user.get("input"):
            prompt = ALPACA[1].format(**user)
        else:
            prompt = ALPACA[0].format(instruction=user["content"])
        bos = tok.bos_token if tok.add_bos else ""
        responses = [(m["content"] + tok.eos_token, True) for m in messages[1:]]
        return [(bos + prompt, False)] + responses
    start, turns, strip = CHAT[prompt_format]
    special = {"bos": tok.bos_token, "eos": tok.eos_token}
    system = tok.default_system if prompt_format == "chatml" else None
    if system is not None and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system}] + messages
    prefix = ""  # a format without a system turn puts its content before the first user content
    if messages[0]["role"] == "system" and "system" not in turns:
        prefix, messages = messages[0]["content"] + "\n\n", messages[1:]
    pieces = [(start.format(**special), False)]
    for i, m in enumerate(messages):
        header, turn, after = turns[m["role"]]
        content = (prefix if i == 0 else "") + (m["content"].strip() if strip else m["content"])
        trained = m["role"] == "assistant"
        pieces += [(header, False), (turn.format(content, **special), trained), (after, False)]
    return pieces + [(turns["assistant"][0], False)] * generation


def encode_prompt(messages: list, tok: Tokenizer, prompt_format=None, where="prompt") -> list:
    """Token ids of a conversation that ends with a user turn, then the assistant's header (for
    generation); `where` names the conversation in an error."""
    prompt_format = _resolve(tok, prompt_format)
    _check_order([m["role"] for m in messages], where, "messages[{i}].role", {}, "user")
    pieces = render(messages, tok, prompt_format, generation=True, where=where)
    return tok.encode("".join(text for text, _ in pieces))


def stop_ids(tok: Tokenizer, prompt_format: str | None = None) -> list:
    """Ids that end an assistant turn: the format's end-of-turn token, and EOS."""
    prompt_format = _resolve(tok, prompt_format)
    turn = CHAT[prompt_format][1]["assistant"][1] if prompt_format in CHAT else ""
    ends = [turn.format("", eos=tok.eos_token).strip()] if turn else []  # the end-of-turn token
    ids = [tok.encode(t)[0] for t in ends if t] + [tok.eos_id]  # _resolve: each t is one token
    return list(dict.fromkeys(i for i in ids if i is not None))


def _sample(id: str, encoding, pieces: list, max_len: int) -> Sample | None:
    """Pre-shifted Sample from the whole rendered text's encoding; None if no token is trained."""
    trained_chars = np.concatenate([np.full(len(text), t) for text, t in pieces])  # (characters,)
    before = np.concatenate([[0], np.cumsum(trained_chars)])  # before[c] = trained chars before c
    offsets = np.array(encoding.offsets, dtype=np.int64).reshape(-1, 2)  # (L + 1, 2) char spans
    trained = (before[offsets[:, 1]] > before[offsets[:, 0]])[: max_len + 1]
    ids = encoding.ids[: max_len + 1]
    labels = [x if t else IGNORE for x, t in zip(ids[1:], trained[1:])]
    return Sample(id, ids[:-1], labels) if any(x != IGNORE for x in labels) else None


def tokenize(example: Example, tok: Tokenizer, prompt_format=None, max_len=MAX_LEN):
    """Sample of one example, or None if truncation to max_len left no trained token."""
    pieces = render(example.messages, tok, _resolve(tok, prompt_format), where=example.id)
    encoding = tok.hf.encode("".join(text for text, _ in pieces), add_special_tokens=False)
    return _sample(example.id, encoding, pieces, max_len)


def load_dataset(
    path, tok: Tokenizer, prompt_format=None, max_len=MAX_LEN, fmt=None, verbose=True
) -> tuple:
    """(samples, stats) of a data file; prints (if verbose) its summary line."""
    examples, fmt, fmt_chosen = _read(path, fmt)
    prompt_chosen = "given" if prompt_format else f"detected from {tok.dir}"
    prompt_format = _resolve(tok, prompt_format)
    rendered = [render(e.messages, tok, prompt_format, where=e.id) for e in examples]
    texts = ["".join(text for text, _ in pieces) for pieces in rendered]
    encodings = tok.hf.encode_batch(texts, add_special_tokens=False)
    samples = [_sample(e.id, enc, p, max_len) for e, p, enc in zip(examples, rendered, encodings)]
    dropped = [e.id for e, s in zip(examples, samples) if s is None]
    samples = [s for s in samples if s is not None]
    if not samples:
        raise InputError(f"{path}: no example keeps a trained token within max_len {max_len}")
    lengths = np.array([len(s.input_ids) for s in samples])
    stats = {
        "path": str(path),
        "max_len": max_len,
        "format": fmt,
        "format_from": fmt_chosen,
        "prompt_format": prompt_format,
        "prompt_format_from": prompt_chosen,
        "examples": len(examples),
        "samples": len(samples),
        "truncated": sum(len(e.ids) > max_len + 1 for e in encodings),
        "dropped": len(dropped),
        "dropped_ids": dropped,
        "tokens": int(lengths.sum()),
        "trained_tokens": sum(sum(x != IGNORE for x in s.labels) for s in samples),
        "length_percentiles": {p: int(np.percentile(lengths, p)) for p in (50, 90, 99, 100)},
    }
    if verbose:
        print(summary(stats))
    return samples, stats


CACHE_VERSION = 1  # bump when tokenization changes what a file gives


def token_arrays(samples: list) -> dict:
    """The token ids and labels of samples as flat int32 arrays (ids, labels (S,), offsets (n + 1,):
    sample i is [offsets[i], offsets[i + 1])): about 8 bytes a token, against a Python int object
    per token in lists."""
    return {
        "ids": np.concatenate([np.asarray(s.input_ids, dtype=np.int32) for s in samples]),
        "labels": np.concatenate([np.asarray(s.labels, dtype=np.int32) for s in samples]),
        "offsets": np.cumsum([0] + [len(s.input_ids) for s in samples]),
    }


def array_samples(ids: list, arrays: dict) -> list:
    """Samples whose input_ids and labels view token_arrays' arrays (memory-mapped or not)."""
    o = arrays["offsets"]
    spans = [slice(o[k], o[k + 1]) for k in range(len(ids))]
    return [Sample(i, arrays["ids"][span], arrays["labels"][span]) for i, span in zip(ids, spans)]


def cached_dataset(path, tok, prompt_format, max_len, fmt, cache, tokenize_here, barrier) -> tuple:
    """load_dataset's (samples, stats), tokenized once for the ranks of a node: the rank with
    tokenize_here (each node's local rank 0) reads and tokenizes the file and writes CACHE/KEY/
    (KEY hashes the file's bytes, the tokenizer's files, the settings and CACHE_VERSION): ids.npy,
    labels.npy, offsets.npy and meta.json (sample ids, stats), as a folder renamed into place
    whole; barrier() then lets the other ranks memory-map the arrays (the page cache holds one copy
    a node). barrier(failed) returns whether any rank failed before it, so a rank whose reader
    raised does not leave the others waiting."""
    key = hashlib.sha256(json.dumps([CACHE_VERSION, prompt_format, max_len, fmt]).encode())
    for file in [Path(path)] + sorted(tok.dir.glob("tokenizer*")) + sorted(tok.dir.glob("*.jinja")):
        key.update(file.name.encode() + file.read_bytes())
    folder = Path(cache) / key.hexdigest()[:32]
    try:
        if tokenize_here and not (folder / "meta.json").exists():
            samples, stats = load_dataset(path, tok, prompt_format, max_len, fmt, verbose=False)
            # nodes may share the file system
            tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")
            tmp.mkdir(parents=True, exist_ok=True)
            for name, array in token_arrays(samples).items():
                np.save(tmp / f"{name}.npy", array)
            write_json(tmp / "meta.json", {"ids": [s.id for s in samples], "stats": stats})
            try:
                os.replace(tmp, folder)
            except OSError:  # another node's is already in place, the same
                shutil.rmtree(tmp)
    except OSError as e:
        barrier(True)
        raise InputError(f"{cache}: cannot write the token cache there ({e.strerror})") from None
    except InputError:
        barrier(True)
        raise
    if barrier(False):
        raise InputError(f"{path}: another rank could not read it (its line says why)")
    meta = json.loads((folder / "meta.json").read_text())
    arrays = {k: np.load(folder / f"{k}.npy", mmap_mode="r") for k in ("ids", "labels", "offsets")}
    return array_samples(meta["ids"], arrays), meta["stats"]


def summary(stats: dict) -> str:
    """The line that says what load_dataset made of a file: formats, what was truncated, dropped."""
    return (
        f"data: {stats['path']}: format {stats['format']} ({stats['format_from']}), prompt format "
        f"{stats['prompt_format']} ({stats['prompt_format_from']}); {stats['samples']} samples, "
        f"{stats['truncated']} truncated to max_len {stats['max_len']}, {stats['dropped']} dropped "
        f"(no trained token left)"
    )


# --- batching -------------------------------------------------------------------------------------


def collate(samples: list, pad_id: int) -> dict:
    """Right-padded batch: input_ids (B, T) padded with pad_id, labels (B, T) with -100 on the pads."""
    T = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(samples), T), IGNORE, dtype=torch.long)  # (B, T)
    for i, s in enumerate(samples):
        input_ids[i, : len(s.input_ids)] = torch.tensor(s.input_ids)
        labels[i, : len(s.labels)] = torch.tensor(s.labels)
    return {"input_ids": input_ids, "labels": labels, "ids": [s.id for s in samples]}


def pack(samples: list) -> dict:
    """Samples end to end in one row, no padding, laid out on the host (no device work, so no sync):
    input_ids             (1, S), S = sum of lengths
    seqs                  where each sample lies in the row (packing): the model's positions and attention
    trained               (N,) flat indices of the positions with a label (the LM head runs there only)
    targets, sample       (N,) those labels, and the sample each position belongs to
    ids                   the samples' ids, in row order
    """
    labels = np.concatenate([np.asarray(s.labels, dtype=np.int64) for s in samples])  # (S,)
    trained = np.flatnonzero(labels != IGNORE)  # (N,)
    row = np.concatenate([np.asarray(s.input_ids, dtype=np.int64) for s in samples])
    counts = [int((np.asarray(s.labels) != IGNORE).sum()) for s in samples]
    sample = np.repeat(np.arange(len(samples), dtype=np.int64), counts)  # (N,)
    return {
        "input_ids": torch.from_numpy(row)[None],  # (1, S)
        "seqs": packing([len(s.input_ids) for s in samples]),
        "trained": torch.from_numpy(trained),  # (N,)
        "targets": torch.from_numpy(labels[trained]),  # (N,)
        "sample": torch.from_numpy(sample),  # (N,)
        "ids": [s.id for s in samples],
    }


def packing(lengths: list) -> tuple:
    """Sequences of these lengths end to end in a row of S = sum(lengths) tokens, seen as n
    right-padded sequences of the longest length L (model.unpack):
        index    (n, L) long, the row position of sequence i's t-th token; 0 at the padding places
        inverse  (S,) long, the place of each row position among the flattened (n * L) padded places
    """
    L, start = max(lengths), itertools.accumulate([0, *lengths])
    index = torch.zeros(len(lengths), L, dtype=torch.long)  # (n, L)
    for i, (first, n) in enumerate(zip(start, lengths)):
        index[i, :n] = torch.arange(first, first + n)
    inverse = torch.cat([torch.arange(i * L, i * L + n) for i, n in enumerate(lengths)])  # (S,)
    return index, inverse


def to_device(batch: dict, device) -> dict:
    """The batch's tensors (and tuples of them) on the device, copied asynchronously from pinned
    memory on CUDA (no stream sync)."""

    def move(v):
        if isinstance(v, tuple):
            return tuple(move(t) for t in v)
        if torch.is_tensor(v) and device.type == "cuda":
            return v.pin_memory().to(device, non_blocking=True)
        return v.to(device) if torch.is_tensor(v) else v

    return {k: move(v) for k, v in batch.items()}


def shuffled_order(n: int, seed: int, epoch: int) -> list:
    """A permutation of range(n), the same for the same (seed, epoch) on every rank and machine."""
    return np.random.default_rng([seed, epoch]).permutation(n).tolist()


def length_grouped_batches(lengths: list, batch_size: int) -> list:
    """Batches of indices for forward-only passes, longest first: little of a batch is padding."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def shard(items: list, rank: int, world_size: int) -> list:
    """This rank's items: every world_size-th from rank on. Each item goes to exactly one rank
    (counts may differ by one: nothing is repeated to even them out), so a gathered per-example
    result has no duplicate."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    return items[rank::world_size]


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """The --help of every command: each flag's default, except for a flag that is required or has
    none, or that says its default in words."""

    def _get_help_string(self, action):
        if action.required or action.default is None or "(default:" in action.help:
            return action.help
        return super()._get_help_string(action)
