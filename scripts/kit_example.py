"""The command line of the conformance kit's worked examples: read a kit, write their answers.

    python scripts/conformance_transformers.py KIT/ --out theirs.json
    python scripts/conformance_trl.py KIT/ --out theirs.json

Standard library only, like the examples themselves: a copy of an example needs this file beside it
and nothing else of this project.
"""

import argparse
import json
import os
from pathlib import Path


def main(compute, description, micro_batch=None):
    """Parse `KIT --out FILE` (and `--micro-batch N` where micro_batch gives its default), check
    them, and write compute(KIT[, micro_batch]) to FILE as JSON (by rank 0 under torchrun)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("kit", help="kit directory written by `python scripts/conformance.py make`")
    p.add_argument("--out", required=True, help="JSON file to write, for `conformance.py check`")
    if micro_batch:
        p.add_argument(
            "--micro-batch",
            type=int,
            default=micro_batch,
            help=f"rows a forward in stage 7's run, an even divisor of the global batch "
            f"per rank (default {micro_batch})",
        )
    args = p.parse_args()
    if not (Path(args.kit) / "expected.json").is_file():
        p.exit(2, f"error: {args.kit}: no expected.json; expected a kit from conformance.py make\n")
    if Path(args.out).is_dir() or not Path(args.out).parent.is_dir():
        p.exit(2, f"error: --out {args.out}: expected a file in an existing directory\n")
    theirs = compute(args.kit, args.micro_batch) if micro_batch else compute(args.kit)
    if os.environ.get("RANK", "0") == "0":
        Path(args.out).write_text(json.dumps(theirs, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}")
