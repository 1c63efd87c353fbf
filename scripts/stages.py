"""Resumable stages, the one runner of scripts/pipeline.sh (scripts/pipeline.py) and
scripts/study.py.

A stage is one python script run from the repository root (under torchrun for ranks > 1) that writes
one output: train.py, writing a run directory, or another command (sftmix.py split, eval.py, a
fetcher) writing a file. It is done, and skipped, when
  - its output exists: for a run, the file that train.py writes last among those the caller keeps
  (RUN/final/
    config.json; RUN/dynamics.jsonl for the study, which deletes final/ once it has read it),
  - no resumable state is left in its run directory: train.py deletes RUN/state/ once final/ is
  written (unless
    --keep-state), so a RUN/state/latest.json means an interrupted run, which its command continues
    (it carries train.py --resume), and
  - its output is newer than every input made by an earlier stage that it names (after): redoing
  that stage redoes
    this one.
Every stage appends a row to a times.tsv: its name, seconds, done or skipped.
"""

import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import data  # noqa: E402


def done(output: Path, run: Path | None = None, after=()) -> bool:
    """Whether a stage is done (this module's docstring): output exists, run (a train.py run
    directory) holds no state/latest.json, and output is newer than each path in after (one that
    does not exist counts as older)."""
    if not output.exists() or (run is not None and (run / "state" / "latest.json").exists()):
        return False
    return all(
        not Path(a).exists() or output.stat().st_mtime_ns > Path(a).stat().st_mtime_ns
        for a in after
    )


class Stages:
    """Runs stages in the order they are called, each unless done, and logs them to times
    (appended).
    """

    def __init__(self, times: Path):
        self.times = times

    def run(self, name, output, *command, run=None, after=(), ranks=1) -> bool:
        """Run command (a python script from the repository root and its arguments; under torchrun
        with ranks > 1) unless done(output, run, after); True when it ran. A failed command raises
        CalledProcessError."""
        start, skip = time.perf_counter(), done(Path(output), run, after)
        print(f"== {name}" + (": done before, skipped" if skip else ""), flush=True)
        if not skip:
            launch = [sys.executable] + (
                ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                if ranks > 1
                else []
            )
            subprocess.run([*launch, *map(str, command)], cwd=ROOT, check=True)
        self.times.parent.mkdir(parents=True, exist_ok=True)
        with open(self.times, "a") as f:
            f.write(f"{name}\t{time.perf_counter() - start:.0f}\t{'skipped' if skip else 'done'}\n")
        return not skip


@contextmanager
def reported():
    """The end of a stage runner's command: bad input its one line and exit 2; a stage that failed
    (its own message above) named, with how to go on, and its exit status."""
    try:
        with data.reported():
            yield
    except subprocess.CalledProcessError as e:
        script = next(str(c) for c in e.cmd if str(c).endswith(".py"))
        # refused input, or diverged
        advice = (
            "running the same command again repeats it"
            if e.returncode == 2
            else "run the same command again to continue"
        )
        print(
            f"error: {script} failed (exit {e.returncode}); its message is above; {advice}.",
            file=sys.stderr,
        )
        sys.exit(e.returncode if e.returncode > 0 else 1)
