"""Pictures of the runs (matplotlib): training curves, and the data map of the reference run's dynamics.

    python scripts/plots.py curves  RUN_A RUN_B ... --out curves.png [--names A B ...]
    python scripts/plots.py datamap --dynamics dynamics.jsonl --out datamap.png [--split split.json]

curves    NTP loss, Mixup loss, learning rate and held-out perplexity against step (train.py's metrics.jsonl).
datamap   Confidence vs variability of every training example, coloured by split.
"""
import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402
import sftmix  # noqa: E402
from data import InputError  # noqa: E402
from eval import NAMES_HELP, read_split, run_file, run_names  # noqa: E402


def pyplot(command):
    """matplotlib's pyplot on the Agg backend (files, no display), imported only by the commands that draw."""
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


CURVES = {"ntp_loss": "NTP loss", "mixup_loss": "Mixup loss", "lr": "learning rate",
          "heldout_ppl": "held-out perplexity (per epoch)"}


def read_metrics(path) -> list:
    """metrics.jsonl -> its records; each an object with an integer "step" and numbers (or null) under CURVES' keys."""
    records = data.read_records(Path(path))
    for where, r in records:
        if not isinstance(r, dict) or type(r.get("step")) is not int:
            raise InputError(f'{where}: "step": expected an object with an integer "step" '
                             f"(train.py's metrics.jsonl)")
        for key in CURVES:
            if not isinstance(r.get(key), (int, float, type(None))) or isinstance(r.get(key), bool):
                raise InputError(f'{where}: "{key}": expected a number, got {json.dumps(r[key])}')
    return [r for _, r in records]


def smooth(values, window):
    """Moving average over `window` steps (shorter at the ends): (S,) -> (S,)."""
    kernel = np.ones(window)
    return np.convolve(values, kernel, "same") / np.convolve(np.ones(len(values)), kernel, "same")


def curves(runs, names, out):
    """One panel per quantity of CURVES that some run recorded, against step; run k is colour C<k> and
    line style k. A loss is drawn raw (faint) and as its moving average over 1/25 of the steps (the
    labelled line). An NTP run records mixup_loss 0 at every step: it has no Mixup line."""
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
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), layout="constrained", squeeze=False)
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
    for ax in axes.flat[len(panels):]:
        ax.set_axis_off()
    handles = [plt.Line2D([], [], color=f"C{k}", linestyle=style[k % 4], label=n) for k, n in enumerate(names)]
    fig.legend(handles=handles, loc="outside upper center", ncols=min(len(names), 6))
    save_figure(plt, fig, out)


def datamap(dynamics, out, split_path=None):
    """Scatter of confidence Conf = -mean_c Perp_c (y-axis) against variability std_c Perp_c (x-axis),
    coloured by half, with the median confidence drawn: the split is the line through the cloud.

    Perplexities span orders of magnitude, so both axes are logarithmic and every point lies inside
    the frame: y is -Conf (the mean perplexity) on a log axis, drawn downwards and labelled with Conf's
    values, so that the confident examples are on top; x is symlog, linear below the decade of the 1st
    percentile of the nonzero variabilities, so that 0 is shown.
    """
    ids, perps = sftmix.read_dynamics(dynamics)
    conf, var = sftmix.confidence(perps), sftmix.variability(perps)  # (N,), (N,)
    if split_path:
        halves = read_split(split_path)
        missing = [i for i in ids if i not in halves["confident"] | halves["unconfident"]]
        if missing:
            raise InputError(f'{split_path}: id {json.dumps(missing[0])} of {dynamics} is in neither half')
    else:
        confident, unconfident = sftmix.split_by_confidence(ids, conf)
        halves = {"confident": set(confident), "unconfident": set(unconfident)}
    plt = pyplot("datamap")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
    fig, ax = plt.subplots(figsize=(7, 5), layout="constrained")
    for half, colour in (("confident", "tab:blue"), ("unconfident", "tab:orange")):
        mask = np.array([i in halves[half] for i in ids])
        ax.scatter(var[mask], -conf[mask], s=10, alpha=0.6, color=colour, label=f"{half} ({mask.sum()})")
    ax.axhline(-np.median(conf), color="black", linestyle="--", linewidth=1, label="median confidence")
    low = np.percentile(var[var > 0], 1) if (var > 0).any() else 1.0  # below it, linear down to 0
    ax.set_xscale("symlog", linthresh=10 ** np.floor(np.log10(low)))
    ax.set_yscale("log")
    ax.invert_yaxis()  # higher confidence (lower perplexity) on top
    decades = np.log10(-conf.min() / -conf.max())
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0,) if decades > 3 else (1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"−{v:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.margins(0.05)
    ax.set(xlabel="variability: std over checkpoints of Perp(y|x) (symlog scale)",
           ylabel="confidence: −mean over checkpoints of Perp(y|x) (log scale)",
           title=f"Data map: {len(ids)} examples, {perps.shape[1]} checkpoints")
    ax.legend()
    save_figure(plt, fig, out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("curves", formatter_class=data.Help, help="training curves of several runs")
    s.add_argument("runs", nargs="+", help="run directories (or their metrics.jsonl files)")
    s.add_argument("--names", nargs="+", help=NAMES_HELP)
    s.add_argument("--out", required=True, help="PNG to write")
    s = sub.add_parser("datamap", formatter_class=data.Help, help="confidence vs variability picture")
    s.add_argument("--dynamics", required=True, help="dynamics.jsonl of the reference run")
    s.add_argument("--split", help="split.json to colour by (default: the median split of the dynamics)")
    s.add_argument("--out", required=True, help="PNG to write")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        data.check_output(args.out)
        if args.command == "curves":
            curves(args.runs, run_names(args, [run_file(r, "metrics.jsonl")[1] for r in args.runs]), args.out)
        else:
            datamap(args.dynamics, args.out, args.split)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
