"""Reports on several runs: Markdown tables side by side, and pictures (matplotlib).

    python scripts/report.py compare  RUN_A RUN_B ... [--data heldout.jsonl] [--mc MedQA=medqa.jsonl ...]
    python scripts/report.py dynamics RUN_A/dynamics.jsonl RUN_B/dynamics.jsonl [--out table.md]
    python scripts/report.py curves   RUN_A RUN_B ... --out curves.png [--names A B ...]
    python scripts/report.py datamap  --dynamics dynamics.jsonl --out datamap.png [--split split.json]

compare   eval.py's ppl and mc of several runs in one table, each against the first; with several --mc, their mean.
dynamics  Confidence mean and spread (std over examples) of dynamics files side by side: the paper's comparison.
curves    NTP loss, Mixup loss, learning rate and held-out perplexity against step (train.py's metrics.jsonl).
datamap   Confidence vs variability of every training example, coloured by split.

compare loads each model as eval.py does (--dtype, no autocast; under torchrun its passes are
sharded over ranks and rank 0 writes). The tables go to stdout, and to --out when given.
"""

import argparse
import contextlib
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import eval as E  # noqa: E402
import model as M  # noqa: E402
import sftmix  # noqa: E402
from data import InputError  # noqa: E402

NAMES_HELP = "one name per run (default: the directories' names)"


# ----------------------------------------------------------------------------- reading runs


def run_file(path, name) -> tuple:
    """(file, display name) of a run directory's file, or of a file given directly (named after its
    folder).
    """
    path = Path(path)
    return (
        (path / name, path.resolve().name) if path.is_dir() else (path, path.resolve().parent.name)
    )


def run_names(args, defaults) -> list:
    names = args.names or defaults
    if len(names) != len(defaults):
        raise InputError(f"--names: expected {len(defaults)} names, one per run, got {len(names)}")
    return names


CURVES = {
    "ntp_loss": "NTP loss",
    "mixup_loss": "Mixup loss",
    "lr": "learning rate",
    "heldout_ppl": "held-out perplexity (per epoch)",
}


def read_metrics(path) -> list:
    """metrics.jsonl -> its records; each an object with an integer "step" and numbers (or null)
    under CURVES' keys.
    """
    records = data.read_records(Path(path))
    for where, r in records:
        if not isinstance(r, dict) or type(r.get("step")) is not int:
            raise InputError(
                f'{where}: "step": expected an object with an integer "step" '
                f"(train.py's metrics.jsonl)"
            )
        for key in CURVES:
            if not isinstance(r.get(key), (int, float, type(None))) or isinstance(r.get(key), bool):
                raise InputError(f'{where}: "{key}": expected a number, got {json.dumps(r[key])}')
    return [r for _, r in records]


# ----------------------------------------------------------------------------- tables


def markdown_lines(head, rows) -> list:
    """The lines of a Markdown table of text cells: the head, the rule, one line per row."""
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def markdown_table(names, metrics) -> str:
    """| metric | A | B | B − A | B ÷ A |, and for each further run X: X − A, X ÷ A."""
    head = ["metric", *names] + [
        h for n in names[1:] for h in (f"{n} − {names[0]}", f"{n} ÷ {names[0]}")
    ]
    rows = []
    for metric, values in metrics.items():
        a = values[0]
        diffs = [c for v in values[1:] for c in (f"{v - a:+.4f}", f"{v / a:.4f}" if a else "—")]
        rows.append([metric, *(f"{v:.4f}" for v in values), *diffs])
    return "\n".join(markdown_lines(head, rows)) + "\n"


def show_table(out, table) -> None:
    """The table on stdout alone (so `> table.md` works), and in out when given."""
    if out:
        with data.atomic_path(out) as tmp:
            tmp.write_text(table, "utf-8")
    print(table, end="")


def named_files(values) -> dict:
    """--mc [NAME=]FILE, repeated -> {NAME: FILE}; NAME defaults to the file's name without its
    suffix.
    """
    named = {}
    for v in values or []:
        name, file = v.split("=", 1) if "=" in v else (Path(v).stem, v)
        if not name or name in named:
            raise InputError(f"--mc {v}: expected NAME=FILE with a name no other --mc has")
        if not file:
            raise InputError(f"--mc {v}: {name}: expected NAME=FILE, got no FILE")
        named[name] = file
    return named


def compare(args, rt) -> str:
    """Each run's ppl on --data (per half with --split) and accuracy on each --mc benchmark, with
    the benchmarks' mean when there are several, as one Markdown table."""
    dirs = [M.checked_model(r)[0] for r in args.runs]  # every run's config and weights, none read
    names = run_names(args, [Path(r).resolve().name for r in args.runs])
    if not args.data and not args.mc:
        raise InputError("compare: expected --data, --mc or both")
    split = E.read_split(args.split) if args.split else None
    benchmarks = {
        name: E.read_mc(file, args.cop_base) for name, file in named_files(args.mc).items()
    }
    runs = []  # each run's config.json, tokenizer and data read and checked before any model loads
    for d in dirs:
        tok = data.load_tokenizer(d)
        samples, stats = None, None
        if args.data:
            samples, stats = data.load_dataset(
                args.data, tok, args.prompt_format, args.max_len, verbose=False
            )
            E.split_members(split, samples)
        runs.append((d, tok, samples, stats))
    metrics = {}

    def add(metric, value):
        metrics.setdefault(metric, []).append(value)

    for d, tok, samples, stats in runs:
        model = E.load_model(d, rt)
        if samples:
            rt.say(data.summary(stats))
            summary, _ = E.evaluate_ppl(model, samples, rt, args.batch_size, split)
            for part, s in summary.items():
                suffix = "" if part == "all" else f" ({part})"
                add(f"ppl{suffix} ↓", s["ppl"])
                add(f"NLL per token{suffix} ↓", s["nll_per_token"])
        accuracy = {}
        for name, questions in benchmarks.items():
            logliks = E.option_logliks(
                model, tok, questions, rt, args.prompt_format, args.batch_size
            )
            accuracy[name] = E.mc_accuracy(questions, logliks)[0]["accuracy"]
        for kind in args.mc_score:
            for name in benchmarks:
                add(f"{name} accuracy, {kind} ↑", accuracy[name][kind])
            if len(benchmarks) > 1:
                mean = sum(accuracy[name][kind] for name in benchmarks) / len(benchmarks)
                add(f"mean of {', '.join(benchmarks)}, {kind} ↑", mean)
        del model
    return markdown_table(names, metrics)


def cmd_compare(args, rt):
    with contextlib.redirect_stdout(sys.stderr):  # progress and loading messages stay off stdout
        table = compare(args, rt)
    if rt.rank == 0:
        show_table(args.out, table)


def dynamics_table(paths, names) -> str:
    """Per dynamics file: mean and spread (population std over the N examples) of Conf = -mean_c
    Perp_c, and the mean variability, side by side; the spread's ratio B ÷ A is the paper's
    comparison."""
    metrics = {
        "confidence mean": [],
        "confidence spread (std over examples)": [],
        "variability mean": [],
    }
    for path in paths:
        _, perplexities = sftmix.read_dynamics(path)  # (N, C)
        conf = sftmix.confidence(perplexities)  # (N,)
        metrics["confidence mean"].append(conf.mean())
        metrics["confidence spread (std over examples)"].append(conf.std())
        metrics["variability mean"].append(sftmix.variability(perplexities).mean())
    return markdown_table(names, metrics)


def cmd_dynamics(args):
    files, defaults = zip(*(run_file(r, "dynamics.jsonl") for r in args.runs))
    show_table(args.out, dynamics_table(files, run_names(args, list(defaults))))


# ----------------------------------------------------------------------------- pictures


def pyplot(command):
    """matplotlib's pyplot on the Agg backend (files, no display), imported only by the commands
    that draw.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError(f"{command} needs matplotlib: pip install matplotlib") from None
    return plt


def save_figure(plt, fig, out) -> None:
    """The figure as a PNG at out, written atomically, then closed."""
    with data.atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def smooth(values, window):
    """Moving average over `window` steps (shorter at the ends): (S,) -> (S,)."""
    kernel = np.ones(window)
    return np.convolve(values, kernel, "same") / np.convolve(np.ones(len(values)), kernel, "same")


def curves(runs, names, out):
    """One panel per quantity of CURVES that some run recorded, against step; run k is colour C<k>
    and line style k. A loss is drawn raw (faint) and as its moving average over 1/25 of the steps
    (the labelled line). An NTP run records mixup_loss 0 at every step: it has no Mixup line."""
    series = [read_metrics(run_file(run, "metrics.jsonl")[0]) for run in runs]
    lines = {key: [] for key in CURVES}  # key -> [(run k, steps, values)]
    for k, records in enumerate(series):
        for key in CURVES:
            points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
            if points and not (key == "mixup_loss" and all(v == 0 for _, v in points)):
                lines[key].append((k, *map(np.array, zip(*points))))
    panels = [key for key in CURVES if lines[key]]
    if not panels:
        raise InputError(f"{', '.join(map(str, runs))}: no {', '.join(CURVES)} recorded")
    plt = pyplot("curves")
    cols = min(len(panels), 2)
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(6 * cols, 3.6 * rows), layout="constrained", squeeze=False
    )
    style = ["-", "--", "-.", ":"]
    for ax, key in zip(axes.flat, panels):
        for k, steps, values in lines[key]:
            drawn = dict(color=f"C{k}", linestyle=style[k % 4], linewidth=1.5, label=names[k])
            if key.endswith("_loss"):
                ax.plot(steps, values, color=f"C{k}", linewidth=0.6, alpha=0.3)
                values = smooth(values, max(1, len(values) // 25))
            ax.plot(steps, values, marker="o" if key == "heldout_ppl" else None, **drawn)
        ax.set(title=CURVES[key], xlabel="step")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels) :]:
        ax.set_axis_off()
    handles = [
        plt.Line2D([], [], color=f"C{k}", linestyle=style[k % 4], label=n)
        for k, n in enumerate(names)
    ]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(names), 6))
    save_figure(plt, fig, out)


def datamap(dynamics, out, split_path=None):
    """Scatter of confidence Conf = -mean_c Perp_c (y-axis) against variability std_c Perp_c
    (x-axis), coloured by half, with the median confidence drawn: the split is the line through the
    cloud.

    Perplexities span orders of magnitude, so both axes are logarithmic and every point lies inside
    the frame: y is -Conf (the mean perplexity) on a log axis, drawn downwards and labelled with
    Conf's values, so that the confident examples are on top; x is symlog, linear below the decade
    of the 1st percentile of the nonzero variabilities, so that 0 is shown.
    """
    ids, perps = sftmix.read_dynamics(dynamics)
    conf, var = sftmix.confidence(perps), sftmix.variability(perps)  # (N,), (N,)
    if split_path:
        halves = E.read_split(split_path)
        missing = [i for i in ids if i not in halves["confident"] | halves["unconfident"]]
        if missing:
            raise InputError(
                f"{split_path}: id {json.dumps(missing[0])} of {dynamics} is in neither half"
            )
    else:
        confident, unconfident = sftmix.split_by_confidence(ids, conf)
        halves = {"confident": set(confident), "unconfident": set(unconfident)}
    plt = pyplot("datamap")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    for half, colour in (("confident", "tab:blue"), ("unconfident", "tab:orange")):
        mask = np.array([i in halves[half] for i in ids])
        ax.scatter(
            var[mask], -conf[mask], s=10, alpha=0.6, color=colour, label=f"{half} ({mask.sum()})"
        )
    ax.axhline(
        -np.median(conf), color="black", linestyle="--", linewidth=1, label="median confidence"
    )
    low = np.percentile(var[var > 0], 1) if (var > 0).any() else 1.0  # below it, linear down to 0
    ax.set_xscale("symlog", linthresh=10 ** np.floor(np.log10(low)))
    ax.set_yscale("log")
    ax.invert_yaxis()  # higher confidence (lower perplexity) on top
    decades = np.log10(-conf.min() / -conf.max())
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0,) if decades > 3 else (1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"−{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.margins(0.05)
    ax.set(
        xlabel="variability: std over checkpoints of Perp(y|x) (symlog scale)",
        ylabel="confidence: −mean over checkpoints of Perp(y|x) (log scale)",
        title=f"Data map: {len(ids)} examples, {perps.shape[1]} checkpoints",
    )
    ax.legend()
    save_figure(plt, fig, out)


def cmd_curves(args):
    curves(
        args.runs, run_names(args, [run_file(r, "metrics.jsonl")[1] for r in args.runs]), args.out
    )
    print(f"wrote {args.out}")


def cmd_datamap(args):
    datamap(args.dynamics, args.out, args.split)
    print(f"wrote {args.out}")


# ----------------------------------------------------------------------------- command line


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    s = E.command(sub, "compare", cmd_compare, "Markdown table of several runs side by side")
    s.add_argument("runs", nargs="+", help="model or run directories; the first is the baseline A")
    s.add_argument("--names", nargs="+", help=NAMES_HELP)
    s.add_argument("--data", help="held-out conversations; adds ppl rows")
    s.add_argument("--split", help="split.json; adds ppl per half")
    text = "tokens per example; longer cut on the right"
    data.add_number(s, "--max-len", int, ">= 2", data.MAX_LEN, text)
    s.add_argument(
        "--mc",
        action="append",
        metavar="[NAME=]FILE",
        help="multiple-choice benchmark, repeated for several (NAME defaults to the file's stem); "
        "adds accuracy rows, and their mean with several, e.g. --mc MedQA=medqa.jsonl --mc "
        "MedQA-5=medqa5.jsonl --mc PubMedQA=ori_pqal.json --mc MedMCQA=dev.json",
    )
    s.add_argument(
        "--mc-score",
        nargs="+",
        choices=E.SCORES,
        default=list(E.SCORES),
        metavar="SCORE",
        help=f"accuracy by these scores, of {', '.join(E.SCORES)} (default: all three)",
    )
    s.add_argument("--cop-base", type=int, choices=(0, 1), help=E.COP_BASE_HELP)
    E.model_flags(s)
    s.add_argument("--out", help="Markdown file for the table")

    s = E.command(sub, "dynamics", cmd_dynamics, "confidence mean and spread of dynamics files")
    s.add_argument(
        "runs",
        nargs="+",
        help="dynamics.jsonl files (or run directories holding one); the first is A",
    )
    s.add_argument("--names", nargs="+", help=NAMES_HELP)
    s.add_argument("--out", help="Markdown file for the table")

    s = E.command(sub, "curves", cmd_curves, "training curves of several runs")
    s.add_argument("runs", nargs="+", help="run directories (or their metrics.jsonl files)")
    s.add_argument("--names", nargs="+", help=NAMES_HELP)
    s.add_argument("--out", required=True, help="PNG to write")

    s = E.command(sub, "datamap", cmd_datamap, "confidence vs variability picture")
    s.add_argument("--dynamics", required=True, help="dynamics.jsonl of the reference run")
    s.add_argument(
        "--split", help="split.json to colour by (default: the median split of the dynamics)"
    )
    s.add_argument("--out", required=True, help="PNG to write")
    return p


def main(argv=None):
    E.run(parser(), argv)


if __name__ == "__main__":
    main()
