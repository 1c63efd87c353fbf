"""SFTMix end to end: reference NTP run with training dynamics -> confidence split -> SFTMix
training, and an NTP baseline beside it for comparison. Run as scripts/pipeline.sh:

    scripts/pipeline.sh MODEL DATA OUT [train.py flags for every stage, e.g. --lr 2e-6 --max-len
    2048]

MODEL is an HF directory or a run directory (its final/ is used); MODEL, DATA and OUT are paths from
the repository root. Environment: PYTHON (default python) runs every step; NPROC=8 launches each
training stage with torchrun on 8 processes (default 1: plain python); EPOCHS=3 sets the final runs'
epochs (the reference run is always 1 epoch, as in the paper); DYNAMICS=4 sets the checkpoints of
the training dynamics. With EPOCHS=1 the reference run *is* the NTP baseline (same data order, same
schedule; the dynamics pass changes nothing), so it is not trained twice.

Run it again to continue: a stage that is done (scripts/stages.py: a training stage's final/ written and no state/
left, the split newer than the dynamics, SFTMix newer than the split) is skipped, and an interrupted training stage
continues from its state/ (train.py --resume). A finished run deletes its state/ unless --keep-state is among the
flags. OUT/pipeline.args holds MODEL, DATA with its checksum, EPOCHS, DYNAMICS and the flags: run again with other
ones, it stops (remove OUT or choose another). Every stage's flags, MODEL, DATA and OUT are
checked before anything is written, and pipeline.args is written once the first stage has started, so a
refused start leaves nothing. Every train.py flag passes to each training stage (--shard fsdp,
--compile, --activation-checkpointing, --save-every, --heldout, --lora-rank, ...), except those the
pipeline sets per stage (--model, --data, --out, --mode, --split, --epochs, --dynamics,
--stop-at-step): those are refused.

Writes OUT/reference/ (dynamics.jsonl, final/), OUT/split.json, OUT/sftmix/final/, OUT/ntp/final/,
and OUT/times.tsv (stage, seconds, done or skipped) for this invocation.
"""

import os
import subprocess
import sys
from pathlib import Path

import stages

import data
import model as M
import train as T
from data import InputError

# what the pipeline gives each training stage itself: (train.py flag, its dest)
OWN = [
    ("--model", "model"),
    ("--data", "data"),
    ("--out", "out"),
    ("--mode", "mode"),
    ("--split", "split"),
    ("--epochs", "epochs"),
    ("--dynamics", "dynamics"),
    ("--stop-at-step", "stop_at_step"),
]


def setting(name, default) -> int:
    """A positive integer from the environment."""
    value = os.environ.get(name) or str(default)
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"{name}={value}: expected a positive integer")
    return int(value)


def check_stages(stage_argv: list, flags: list, nproc: int) -> None:
    """Each training stage's command line (stage_argv: the pipeline's own flags of each), with the
    flags given for every stage, parsed and checked as train.py checks them, before anything is
    written; a flag of OWN among them is refused (the pipeline sets it per stage), as is one that
    train.py would refuse."""
    for argv in stage_argv:
        args = T.parse_args([*map(str, argv), "--resume", *flags])
        ours = vars(T.parse_args([*map(str, argv), "--resume"]))
        for flag, dest in OWN:
            if vars(args)[dest] != ours[dest]:
                raise InputError(
                    f"{flag}: set by the pipeline for each stage (MODEL, DATA, OUT, "
                    f"EPOCHS, DYNAMICS); expected train.py's other flags after OUT"
                )
        T.check_args(args, nproc)


def saved_settings(out: Path, settings: str) -> bool:
    """Whether OUT/pipeline.args holds these settings (False: none yet); other ones stop the
    pipeline, naming each that differs."""
    path = out / "pipeline.args"
    if not path.exists():
        return False
    saved = path.read_text(errors="replace").rstrip("\n")
    if saved != settings:
        there, now = (
            dict(line.partition(" ")[::2] for line in text.splitlines())
            for text in (saved, settings)
        )
        changed = [
            f"{key}: {there.get(key)!r} there, {now[key]!r} now"
            for key in now
            if there.get(key) != now[key]
        ]
        raise InputError(
            f"{path}: {out} holds a pipeline run with other settings "
            f"({'; '.join(changed)}); remove {out} or choose another OUT"
        )
    return True


def pipeline(model, data_file, out: Path, flags) -> None:
    """Every stage's flags, the model and the data file checked; then the stages. OUT/pipeline.args
    is written once the first stage has started cleanly (train.py makes OUT/reference only after
    checking every input), so a start refused for bad input leaves nothing that stops the corrected
    one."""
    nproc, epochs, dynamics = setting("NPROC", 1), setting("EPOCHS", 1), setting("DYNAMICS", 4)
    if not Path(data_file).is_file():
        raise InputError(f"{data_file}: not found (DATA: a training data file)")
    base = ["--model", model, "--data", data_file]
    reference = [
        *base,
        "--out",
        out / "reference",
        "--mode",
        "ntp",
        "--epochs",
        1,
        "--dynamics",
        dynamics,
    ]
    sftmix = [
        *base,
        "--out",
        out / "sftmix",
        "--mode",
        "sftmix",
        "--split",
        out / "split.json",
        "--epochs",
        epochs,
    ]
    ntp = [*base, "--out", out / "ntp", "--mode", "ntp", "--epochs", epochs]
    check_stages([reference, sftmix] + [ntp] * (epochs > 1), flags, nproc)
    M.checked_model(model)
    data.load_tokenizer(M.model_dir(model))
    with open(data_file, "rb") as f:  # POSIX cksum, as earlier versions of this script wrote it
        checksum = subprocess.run(
            ["cksum"], stdin=f, capture_output=True, text=True, check=True
        ).stdout.strip()
    settings = "\n".join(
        [
            f"MODEL {model}",
            f"DATA {data_file} {checksum}",
            f"EPOCHS {epochs}",
            f"DYNAMICS {dynamics}",
            "flags " + " ".join(flags),
        ]
    )
    for name in ("times.tsv", "pipeline.args"):  # OUT a file, or a directory in their place
        data.check_output(out / name, flag="OUT")
    locked = saved_settings(out, settings)
    (out / "times.tsv").unlink(missing_ok=True)
    run = stages.Stages(out / "times.tsv").run

    def train(name, argv, after=()):
        run_dir = Path(argv[argv.index("--out") + 1])
        run(
            name,
            run_dir / "final" / "config.json",
            "train.py",
            *argv,
            "--resume",
            *flags,
            run=run_dir,
            after=after,
            ranks=nproc,
        )

    try:
        train(f"reference NTP run, perplexities at {dynamics} checkpoints", reference)
    finally:
        if not locked and (out / "reference").is_dir():
            with data.atomic_path(out / "pipeline.args") as tmp:
                tmp.write_text(settings + "\n")
    dynamics_file, split = out / "reference" / "dynamics.jsonl", out / "split.json"
    run(
        "confidence split",
        split,
        "sftmix.py",
        "split",
        "--dynamics",
        dynamics_file,
        "--out",
        split,
        after=[dynamics_file],
    )
    train("SFTMix from the base model", sftmix, after=[split])
    if epochs == 1:
        link = out / "ntp"
        if link.is_symlink():
            link.unlink()
        link.symlink_to("reference")
        print(f"== NTP baseline: the reference run ({link} -> reference)")
    else:
        train("NTP baseline from the base model", ntp)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return
    if len(argv) < 3:
        print("usage: scripts/pipeline.sh MODEL DATA OUT [train.py flags]", file=sys.stderr)
        sys.exit(2)
    os.chdir(stages.ROOT)
    with stages.reported():
        pipeline(argv[0], argv[1], Path(argv[2]), argv[3:])


if __name__ == "__main__":
    main()
