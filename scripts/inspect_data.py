"""What a data file becomes for the model: rendered examples with the trained spans marked, and
statistics.

    python scripts/inspect_data.py --data train.jsonl --tokenizer MODEL_DIR [--max-len 2048] [-n 3]

Each shown example is its tokens decoded, the trained ones (data.py's labels: every assistant turn with its
end-of-turn token) between [[ and ]]. Then: the format and prompt format and where each was detected,
truncated and dropped examples, tokens per sample, the trained share, and the padding that batches of
--batch-size would hold in random order and grouped by length. Bad input is one line and exit 2.
"""

import argparse
import itertools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402


def padding_waste(lengths: list, batches: list) -> float:
    """Share of the padded batches' positions that are padding: 1 - sum(lengths) / sum(B * T)."""
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def show(sample: data.Sample, tok: data.Tokenizer) -> str:
    """The sample's text with each trained span between [[ and ]]."""
    tokens = sample.input_ids + [x for x in sample.labels[-1:] if x != data.IGNORE]
    # token t + 1 is trained iff labels[t] is not -100
    trained = [False] + [x != data.IGNORE for x in sample.labels]
    runs = [
        (t, [x for x, _ in run])
        for t, run in itertools.groupby(zip(tokens, trained), key=lambda p: p[1])
    ]
    return "".join(f"[[{tok.decode(ids)}]]" if t else tok.decode(ids) for t, ids in runs)


def inspect(args) -> None:
    """The first -n samples with their trained spans marked, then the file's statistics."""
    tok = data.load_tokenizer(args.tokenizer)
    samples, stats = data.load_dataset(
        args.data, tok, args.prompt_format, args.max_len, args.format
    )
    for s in samples[: args.n]:
        trained = sum(x != data.IGNORE for x in s.labels)
        print(
            f"\n--- {s.id}: {len(s.input_ids)} tokens, {trained} trained [[between brackets]] ---\n{show(s, tok)}"
        )
    lengths, B = [len(s.input_ids) for s in samples], args.batch_size
    shuffled = data.shuffled_order(len(lengths), seed=0, epoch=0)
    waste_random = padding_waste(lengths, [shuffled[i : i + B] for i in range(0, len(lengths), B)])
    waste_grouped = padding_waste(lengths, data.length_grouped_batches(lengths, B))
    p = stats["length_percentiles"]
    print(
        f"\nformat: {stats['format']} ({stats['format_from']})\n"
        f"prompt format: {stats['prompt_format']} ({stats['prompt_format_from']})\n"
        f"examples: {stats['examples']}, samples: {stats['samples']}, truncated to max_len {args.max_len}: "
        f"{stats['truncated']}, dropped (no trained token left): {stats['dropped']} {stats['dropped_ids'][:5]}\n"
        f"tokens per sample: p50 {p[50]}, p90 {p[90]}, p99 {p[99]}, max {p[100]}; "
        f"trained: {stats['trained_tokens'] / stats['tokens']:.1%} of {stats['tokens']}\n"
        f"padding at batch size {B}: {waste_random:.1%} in random order, {waste_grouped:.1%} length-grouped"
    )


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.Help)
    p.add_argument("--data", required=True, help="data file: a JSON array, JSON lines or parquet")
    p.add_argument(
        "--tokenizer",
        required=True,
        help="directory with tokenizer.json (and tokenizer_config.json)",
    )
    p.add_argument(
        "--format", help=f"one of {', '.join(data.FORMATS)}; detected from the keys if not given"
    )
    p.add_argument(
        "--prompt-format",
        help=f"one of {', '.join(data.PROMPT_FORMATS)}; from the tokenizer if not given",
    )
    text = "tokens per sample; longer cut on the right"
    data.add_number(p, "--max-len", int, ">= 2", data.MAX_LEN, text)
    data.add_number(p, "-n", int, ">= 0", 3, "examples to show")
    data.add_number(p, "--batch-size", int, ">= 1", 8, "batch size for the padding figures")
    with data.reported():
        inspect(p.parse_args(argv))


if __name__ == "__main__":
    main()
