"""SFTMix end to end: reference NTP run with training dynamics -> confidence split -> SFTMix training, and an NTP
baseline beside it for comparison. Run as scripts/pipeline.sh:

    scripts/pipeline.sh MODEL DATA OUT [train.py flags for every stage, e.g. --lr 2e-6 --max-len 2048]

MODEL is an HF directory or a run directory (its final/ is used); MODEL, DATA and OUT are paths from the repository
root. Environment: PYTHON (default python) runs every step; NPROC=8 launches each training stage with torchrun on 8
processes (default 1: plain python); EPOCHS=3 sets the final runs' epochs (the reference run is always 1 epoch, as in
the paper); DYNAMICS=4 sets the checkpoints of the training dynamics. With EPOCHS=1 the reference run *is* the NTP
baseline (same data order, same schedule; the dynamics pass changes nothing), so it is not trained twice.

Run it again to continue: a stage that is done (scripts/stages.py: a training stage's final/ written and no state/
left, the split newer than the dynamics, SFTMix newer than the split) is skipped, and an interrupted training stage
continues from its state/ (train.py --resume). A finished run deletes its state/ unless --keep-state is among the
flags. OUT/pipeline.args holds MODEL, DATA with its checksum, EPOCHS, DYNAMICS and the flags: run again with other
ones, it stops (remove OUT or choose another).

Writes OUT/reference/ (dynamics.jsonl, final/), OUT/split.json, OUT/sftmix/final/, OUT/ntp/final/, and
OUT/times.tsv (stage, seconds, done or skipped) for this invocation.
"""
import os
import subprocess
import sys
from pathlib import Path

import stages
from stages import InputError


def setting(name, default) -> int:
    """A positive integer from the environment."""
    value = os.environ.get(name) or str(default)
    if not value.isdigit() or int(value) < 1:
        raise InputError(f"{name}={value}: expected a positive integer")
    return int(value)


def lock(out: Path, settings: str) -> None:
    """Write OUT/pipeline.args, unless it holds other settings: then stop, naming each that differs."""
    path = out / "pipeline.args"
    saved = path.read_text().rstrip("\n") if path.exists() else settings
    if saved != settings:
        there, now = (dict(line.split(" ", 1) for line in text.splitlines()) for text in (saved, settings))
        changed = [f"{key}: {there.get(key)!r} there, {now[key]!r} now" for key in now if there.get(key) != now[key]]
        raise InputError(f"{path}: {out} holds a pipeline run with other settings ({'; '.join(changed)}); remove {out} "
                         f"or choose another OUT")
    path.write_text(settings + "\n")


def pipeline(model, data, out: Path, flags) -> None:
    nproc, epochs, dynamics = setting("NPROC", 1), setting("EPOCHS", 1), setting("DYNAMICS", 4)
    if not Path(data).is_file():
        raise InputError(f"{data}: not found (DATA: a training data file)")
    out.mkdir(parents=True, exist_ok=True)
    with open(data, "rb") as f:  # POSIX cksum, as earlier versions of this script wrote it
        checksum = subprocess.run(["cksum"], stdin=f, capture_output=True, text=True, check=True).stdout.strip()
    lock(out, "\n".join([f"MODEL {model}", f"DATA {data} {checksum}", f"EPOCHS {epochs}", f"DYNAMICS {dynamics}",
                         "flags " + " ".join(flags)]))
    (out / "times.tsv").write_text("")
    run = stages.Stages(out / "times.tsv").run

    def train(name, run_dir: Path, *argv, after=()):
        run(name, run_dir / "final" / "config.json", "train.py", "--model", model, "--data", data, "--out", run_dir,
            *argv, "--resume", *flags, run=run_dir, after=after, ranks=nproc)

    train(f"reference NTP run, perplexities at {dynamics} checkpoints", out / "reference", "--mode", "ntp",
          "--epochs", 1, "--dynamics", dynamics)
    dynamics_file, split = out / "reference" / "dynamics.jsonl", out / "split.json"
    run("confidence split", split, "sftmix.py", "split", "--dynamics", dynamics_file, "--out", split,
        after=[dynamics_file])
    train("SFTMix from the base model", out / "sftmix", "--mode", "sftmix", "--split", split, "--epochs", epochs,
          after=[split])
    if epochs == 1:
        ntp = out / "ntp"
        if ntp.is_symlink():
            ntp.unlink()
        ntp.symlink_to("reference")
        print(f"== NTP baseline: the reference run ({ntp} -> reference)")
    else:
        train("NTP baseline from the base model", out / "ntp", "--mode", "ntp", "--epochs", epochs)


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
