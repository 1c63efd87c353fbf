"""The command line of the conformance kit's worked examples: read a kit, write their answers.

    python scripts/conformance_transformers.py KIT/ --out theirs.json
    python scripts/conformance_trl.py KIT/ --out theirs.json

Standard library only, like the examples themselves: a copy of an example needs this file beside it
and nothing else of this project.
"""
import argparse
import json
from pathlib import Path


def main(compute, description):
    """Parse `KIT --out FILE`, check both, and write compute(KIT) to FILE as JSON."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("kit", help="kit directory written by `python scripts/conformance.py make`")
    p.add_argument("--out", required=True, help="JSON file to write, for `conformance.py check`")
    args = p.parse_args()
    if not (Path(args.kit) / "expected.json").is_file():
        p.exit(2, f"error: {args.kit}: no expected.json; expected a kit from conformance.py make\n")
    if Path(args.out).is_dir() or not Path(args.out).parent.is_dir():
        p.exit(2, f"error: --out {args.out}: expected a file in an existing directory\n")
    Path(args.out).write_text(json.dumps(compute(args.kit), indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
