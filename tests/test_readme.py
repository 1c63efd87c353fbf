"""The README's runnable snippets, and those of docs/*.md, work as written, run in order as a new
user types them after the demo.

Mechanism. Every fenced block whose info string is `bash tested` or `python tested` is a snippet a
user runs; blocks marked plain `bash` or `python` are not run here (torchrun on 8 GPUs, the full
demo, the test command itself). The tested blocks are joined, in README order, into one bash script
(`set -e -o pipefail`), a python block becoming `python - <<'PY' ... PY`, so state carries from
block to block as in one terminal: files written, `cd`, variables, an activated environment. Each
document (README.md, then docs/*.md by name) is one such script. The scripts run in one scratch copy
of the repository (the user's runs/ is never touched), after `bash scripts/demo.sh` has run there at
the CI size DEMO_SIZE below (tens of seconds instead of minutes), so runs/demo/ holds every file the
snippets read. In the copy, .assets is the repository's (the smollm2_dir fixture converts the model
into it) and .venv is the environment running this test, so the README's `. .venv/bin/activate`
activates it; the demo is run with VENV= (the python on PATH, nothing installed).
"""

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# 8 conversations of at most 96 tokens, steps of 2 (one confident-unconfident pair), 2 epochs of NTP
# and of SFTMix, perplexities at 2 checkpoints, 2 held out
DEMO_SIZE = {
    "TRAIN": "8",
    "HELDOUT": "2",
    "MAX_CHARS": "400",
    "MAX_LEN": "96",
    "BATCH": "2",
    "MICRO": "2",
    "EPOCHS": "2",
    "DYNAMICS": "2",
}
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv", ".assets", "runs", ".ci", "__pycache__", ".pytest_cache"
)
FENCE = re.compile(
    r"^([ \t]*)```(\S*)[ \t]*(\S*)[ \t]*\n(.*?)^\1```[ \t]*$", re.MULTILINE | re.DOTALL
)


def blocks(readme: str) -> list[tuple[int, str, bool, str]]:
    """Every fenced block, indented ones (in a list item) too: (line of its opening fence, language,
    tested, body).
    """
    return [
        (
            readme.count("\n", 0, m.start()) + 1,
            m.group(2),
            m.group(3) == "tested",
            textwrap.dedent(m.group(4)),
        )
        for m in FENCE.finditer(readme)
    ]


def documents() -> list[Path]:
    """The Markdown files whose tested blocks run: README.md, then docs/*.md by name."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def script(readme: str, marker: Path, name: str = "README.md") -> str:
    """The tested blocks as one bash script; before each block, its README line is written to
    marker.
    """
    parts = ["set -e -o pipefail"]
    for line, language, tested, body in blocks(readme):
        if not tested:
            continue
        if language not in ("bash", "python"):
            raise ValueError(
                f"{name}:{line}: a tested block must be bash or python, not {language!r}"
            )
        parts.append(f"echo {line} > '{marker}'")
        parts.append(body if language == "bash" else f"python - <<'PY'\n{body}PY")
    parts.append(f"echo done > '{marker}'")
    return "\n".join(parts) + "\n"


def activation(venv: Path) -> None:
    """venv/bin/activate for the python running these tests: its own environment, else one that puts
    it first.
    """
    if sys.prefix != sys.base_prefix:
        venv.symlink_to(sys.prefix)
    else:
        (venv / "bin").mkdir(parents=True)
        (venv / "bin" / "activate").write_text(
            f'export PATH="{Path(sys.executable).parent}:$PATH"\n'
        )


def run_readme(readme: str, cwd: Path, timeout: int, name: str = "README.md") -> None:
    """Run the tested blocks of readme (the text of the document name) in cwd; fail naming the line
    of the block that failed."""
    marker = cwd / ".readme-block"
    marker.unlink(missing_ok=True)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(
        ["bash", "-c", script(readme, marker, name)],
        cwd=cwd,
        env=env,
        timeout=timeout,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    where = marker.read_text().strip() if marker.exists() else "?"
    if result.returncode != 0 or where != "done":
        pytest.fail(
            f"{name}:{where}: this tested block failed (exit {result.returncode}):\n"
            f"{result.stdout[-4000:]}",
            pytrace=False,
        )


def test_every_tested_snippet_of_the_readme_runs_after_the_demo(smollm2_dir, tmp_path):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert any(tested for _, _, tested, _ in blocks(readme)), (
        "README.md: no `bash tested` / `python tested` block"
    )
    repo = tmp_path / "repo"
    shutil.copytree(ROOT, repo, ignore=NOT_COPIED, symlinks=True)
    (repo / ".assets").symlink_to(smollm2_dir.parent)
    activation(repo / ".venv")
    env = {
        **os.environ,
        **DEMO_SIZE,
        "VENV": "",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    demo = subprocess.run(
        ["bash", "scripts/demo.sh"],
        cwd=repo,
        env=env,
        timeout=900,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.returncode == 0, f"scripts/demo.sh at {DEMO_SIZE} failed:\n{demo.stdout[-4000:]}"
    for doc in documents():  # each document from where the one before left the terminal's files
        run_readme(
            doc.read_text(encoding="utf-8"), repo, timeout=900, name=str(doc.relative_to(ROOT))
        )


def test_every_python_snippet_of_the_readme_is_tested():
    """Python snippets need no GPU and no full-size run, so none is exempt."""
    for doc in documents():
        untested = [
            line
            for line, language, tested, _ in blocks(doc.read_text(encoding="utf-8"))
            if language == "python" and not tested
        ]
        assert not untested, (
            f"{doc.name}: ```python blocks at lines {untested} should be ```python tested"
        )


SAMPLE = textwrap.dedent("""\
    Text.

    ```bash tested
    echo 41 > n.txt
    ```

    ```bash
    exit 7
    ```

    ```python tested
    n = int(open("n.txt").read())
    open("n.txt", "w").write(str(n + 1))
    ```

    ```bash tested
    test "$(cat n.txt)" = 42
    ```
    """)


def test_the_snippet_runner_runs_tested_blocks_in_order_and_skips_plain_ones(tmp_path):
    # the plain block's `exit 7` would stop the script; the last block checks the python block ran
    # after the first
    assert [(line, language, tested) for line, language, tested, _ in blocks(SAMPLE)] == [
        (3, "bash", True),
        (7, "bash", False),
        (11, "python", True),
        (16, "bash", True),
    ]
    run_readme(SAMPLE, tmp_path, timeout=60)
    assert (tmp_path / "n.txt").read_text() == "42"


def test_a_broken_snippet_fails_naming_its_readme_line(tmp_path):
    broken = SAMPLE.replace('open("n.txt", "w")', 'open("no/such/dir/n.txt", "w")')
    with pytest.raises(pytest.fail.Exception, match=r"README.md:11: this tested block failed"):
        run_readme(broken, tmp_path, timeout=60)
    assert (tmp_path / "n.txt").read_text() == "41\n"  # the block after it did not run
