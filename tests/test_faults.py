"""Careless input and faults: each gets one line naming the file or flag, leaves no final output or
half-written file, and a run killed at any moment (also while a diverging run saves) resumes;
resuming never unpickles."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from test_train import COMMON, ROOT, cli, one_line_error, run_train, weights

import model as M
import sftmix
import train as T


def no_leftovers(out):
    """No final output and no PATH.tmp anywhere under out."""
    return not (out / "final").exists() and not list(out.rglob("*.tmp"))


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--micro-batch", "-2"], "--micro-batch: expected >= 1, got -2"),
        (["--micro-batch", "0"], "--micro-batch: expected >= 1, got 0"),
        (["--global-batch", "0"], "--global-batch: expected >= 1, got 0"),
        (["--save-every", "0"], "--save-every: expected >= 1, got 0"),
        (["--eval-batch", "0", "--dynamics", "2"], "--eval-batch: expected >= 1, got 0"),
        (["--dynamics", "-1"], "--dynamics: expected >= 0 (0 = off), got -1"),
        (["--max-len", "1"], "--max-len: expected >= 2, got 1"),
        (["--lr", "0"], "--lr: expected > 0 and finite, got 0.0"),
        (["--lr", "nan"], "--lr: expected > 0 and finite, got nan"),
        (["--lr", "inf"], "--lr: expected > 0 and finite, got inf"),
        (["--warmup-ratio", "1"], "--warmup-ratio: expected in [0, 1), got 1.0"),
        (["--epochs", "0"], "--epochs: expected >= 1, got 0"),
        (["--mixup-only"], "--mixup-only: expected --mode sftmix (the Mixup term needs pairs)"),
        (["--split", "no-split.json"], "--split: expected --mode sftmix (ntp trains on no split)"),
        (["--out", ""], "--out: expected a run directory, got an empty path"),
        (
            ["--shard", "fsdp"],
            "--shard fsdp: expected a launch by torchrun (FSDP2 shards over its process group): "
            "torchrun --nproc_per_node=N train.py ...",
        ),
        (
            ["--shard", "hsdp", "--shard-degree", "2"],
            "--shard-degree 2: expected a divisor of the 1 ranks",
        ),
        (["--timeout-minutes", "0"], "--timeout-minutes: expected > 0, got 0.0"),
        (["--save-every-minutes", "-1"], "--save-every-minutes: expected >= 0 (0 = off), got -1.0"),
        (
            ["--heldout-every", "-1"],
            "--heldout-every: expected >= 0 (0 = at epoch ends only), got -1",
        ),
        (["--final-shard-gb", "0"], "--final-shard-gb: expected > 0, got 0.0"),
    ],
)
def test_bad_numeric_flag_gets_one_line_before_anything_loads(
    flags, expected, chat_data, tmp_path, capsys
):
    line = one_line_error(
        capsys,
        *cli(model=tmp_path / "no-model", data=chat_data, out=tmp_path / "run"),
        *flags,
    )
    assert line == f"error: {expected}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_out_that_cannot_be_a_directory_gets_one_line(
    where, tiny_model_dir, chat_data, tmp_path, capsys
):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    line = one_line_error(capsys, *cli(model=tiny_model_dir, data=chat_data, out=out))
    assert line.startswith(f"error: --out {out}: cannot write there")


def test_corrupt_checkpoint_gets_one_line_naming_the_file(
    tiny_model_dir, chat_data, tmp_path, capsys
):
    bad = tmp_path / "model"
    bad.mkdir()
    for f in tiny_model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights_file = bad / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])  # truncated
    line = one_line_error(capsys, *cli(model=bad, data=chat_data, out=tmp_path / "run"))
    assert line.startswith("error: ") and str(weights_file) in line
    assert no_leftovers(tmp_path / "run")


@pytest.fixture
def stopped_run(tiny_model_dir, chat_data, tmp_path):
    base = ["--model", tiny_model_dir, "--data", chat_data, *COMMON, "--out", tmp_path / "run"]
    run_train(*base, "--stop-at-step", "2")
    return base, tmp_path / "run" / "state"


def latest(state):
    return json.loads((state / "latest.json").read_text())


@pytest.mark.parametrize(
    "damage", ["latest.json is not JSON", "checkpoint folder missing", "state file truncated"]
)
def test_corrupt_state_gets_one_line_naming_the_file(damage, stopped_run, capsys):
    base, state = stopped_run
    folder = state / latest(state)["checkpoint"]
    named = "latest.json" if damage == "latest.json is not JSON" else folder.name
    if damage == "latest.json is not JSON":
        (state / "latest.json").write_text('{"step": 2, "check')
    elif damage == "checkpoint folder missing":
        shutil.rmtree(folder)
    else:
        for file in folder.glob("*.safetensors"):
            file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])
    line = one_line_error(capsys, *base, "--resume")
    assert line.startswith("error: ") and named in line and str(state) in line


def test_a_state_of_the_older_layout_is_refused_in_one_line(stopped_run, capsys):
    """the state of a run before torch.distributed.checkpoint: a safetensors file per rank, a
    latest.json that names no layout"""
    base, state = stopped_run
    old = latest(state)
    shutil.rmtree(state / old["checkpoint"])
    (state / old["checkpoint"]).mkdir()
    (state / old["checkpoint"] / "rank-00000.safetensors").write_bytes(b"")
    (state / "latest.json").write_text(
        json.dumps({k: old[k] for k in ("step", "checkpoint", "config", "dynamics")} | {"ranks": 1})
    )
    line = one_line_error(capsys, *base, "--resume")
    assert line.startswith(f"error: {state / 'latest.json'}: an older state layout")


@pytest.fixture(scope="module")
def stopped_dynamics_run(tiny_model_dir, chat_data, tmp_path_factory):
    """A run of 5 steps, dynamics after steps 2 and 5, stopped after step 2: (flags but --out, its
    directory)."""
    flags = [*cli(model=tiny_model_dir, data=chat_data), *COMMON, *cli(dynamics="2")]
    out = tmp_path_factory.mktemp("stopped") / "run"
    run_train(*flags, "--out", out, "--stop-at-step", "2")
    return flags, out


def put(path, text=None):
    """path replaced by a file holding text, or (None) by an empty directory."""
    shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    path.mkdir() if text is None else path.write_text(text)


def set_latest(run, **fields):
    (run / "state" / "latest.json").write_text(json.dumps(latest(run / "state") | fields))


def without_ex0(run):
    """latest.json's dynamics with no perplexity of ex0 at step 2"""
    dynamics = latest(run / "state")["dynamics"]
    del dynamics["2"]["ex0"]
    set_latest(run, dynamics=dynamics)


DAMAGED = {  # what is done to a stopped run's directory {run}, and the line its --resume gets
    "metrics.jsonl a directory": (
        lambda run: put(run / "metrics.jsonl"),
        "--out {run}/metrics.jsonl: is a directory; expected a file to write",
    ),
    "heldout.jsonl a directory": (
        lambda run: put(run / "heldout.jsonl"),
        "--out {run}/heldout.jsonl: is a directory; expected a file to write",
    ),
    "dynamics.jsonl a directory": (
        lambda run: put(run / "dynamics.jsonl"),
        "--out {run}/dynamics.jsonl: is a directory; expected a file to write",
    ),
    "metrics.jsonl line not JSON": (
        lambda run: put(run / "metrics.jsonl", '{"step": 1}garbage\n'),
        '{run}/metrics.jsonl:1: expected a JSON object with an integer "step", got '
        """'{"step": 1}garbage'""",
    ),
    "heldout.jsonl line without step": (
        lambda run: put(run / "heldout.jsonl", '{"nll": {}}\n'),
        '{run}/heldout.jsonl:1: expected a JSON object with an integer "step", got '
        """'{"nll": {}}'""",
    ),
    "state a file": (
        lambda run: put(run / "state", "x"),
        "--out {run}: state: expected a directory or none, got a file",
    ),
    "final a file": (
        lambda run: put(run / "final", "x"),
        "--out {run}: final: expected a directory or none, got a file",
    ),
    "final.tmp a file": (
        lambda run: put(run / "final.tmp", "x"),
        "--out {run}: final.tmp: expected a directory or none, got a file",
    ),
    "latest.json nested too deeply": (
        lambda run: put(run / "state" / "latest.json", "[" * 100_000),
        "{run}/state/latest.json: unreadable JSON: nested too deeply",
    ),
    "step -3": (
        lambda run: set_latest(run, step=-3),
        "{run}/state/latest.json: step: expected an integer >= 1, got -3",
    ),
    "step 99 of 5": (
        lambda run: set_latest(run, step=99),
        "{run}/state/latest.json: step: expected an integer in [1, 5], got 99",
    ),
    "checkpoint empty": (
        lambda run: set_latest(run, checkpoint=""),
        '{run}/state/latest.json: checkpoint: expected "step-0000002", got ""',
    ),
    "dynamics without ex0": (
        without_ex0,
        "{run}/state/latest.json: dynamics: step 2: expected a perplexity > 0 of each example, "
        'got none for "ex0"',
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGED))
def test_a_damaged_run_directory_is_refused_before_the_model_loads_and_left_as_it_was(
    damage, stopped_dynamics_run, tmp_path, capsys, monkeypatch
):
    flags, stopped = stopped_dynamics_run
    run = tmp_path / "run"
    shutil.copytree(stopped, run)
    do, expected = DAMAGED[damage]
    do(run)
    before = {p: p.is_file() and p.read_bytes() for p in sorted(run.rglob("*"))}
    monkeypatch.setattr(T, "load_pretrained", None)  # loading a model: a TypeError
    line = fails_with_one_line(capsys, T.main, *flags, "--out", run, "--resume")
    assert line == "error: " + expected.replace("{run}", str(run))
    assert {p: p.is_file() and p.read_bytes() for p in sorted(run.rglob("*"))} == before


def planted_pickle(marker):
    """A pickle that, if loaded, runs a command creating `marker`."""

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Payload())


def test_resume_refuses_a_crafted_state_without_running_it(stopped_run, tmp_path, capsys):
    """a pickle that would run code if loaded sits where the state is: resume refuses it, and
    nothing runs
    """
    base, state = stopped_run
    marker = tmp_path / "pwned"
    folder = state / latest(state)["checkpoint"]
    for f in folder.iterdir():
        f.write_bytes(planted_pickle(marker))  # each state file
    # the file DCP's FileSystemReader unpickles
    (folder / ".metadata").write_bytes(planted_pickle(marker))
    line = one_line_error(capsys, *base, "--resume")
    assert line.startswith("error: ") and folder.name in line
    assert not marker.exists()


def test_resume_never_reads_a_pickle_planted_beside_a_good_state(stopped_run, tmp_path):
    """torch.distributed.checkpoint's own reader unpickles .metadata (and .distcp files hold
    pickles): planted beside a complete state, the run resumes to its end and runs none of them"""
    base, state = stopped_run
    marker = tmp_path / "pwned"
    folder = state / latest(state)["checkpoint"]
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        (folder / name).write_bytes(planted_pickle(marker))
    run_train(*base, "--resume")
    assert (state.parent / "final" / "model.safetensors").exists() and not marker.exists()


def test_resume_after_the_data_file_was_edited_in_place_is_refused(
    tiny_model_dir, chat_data, tmp_path, capsys
):
    data_file = tmp_path / "train.jsonl"
    data_file.write_text(chat_data.read_text())
    base = ["--model", tiny_model_dir, "--data", data_file, *COMMON, "--out", tmp_path / "run"]
    run_train(*base, "--stop-at-step", "2")
    data_file.write_text(
        data_file.read_text().replace('"assistant", "content": "', '"assistant", "content": "a ', 1)
    )
    line = one_line_error(capsys, *base, "--resume")
    assert line == (
        f"error: {tmp_path / 'run' / 'state'}: was written by a run with other settings: "
        f"{data_file}: the data changed since the run started"
    )


def test_lr_may_change_on_resume(stopped_run):
    base, state = stopped_run
    base = [a for a in base]
    base[base.index("--lr") + 1] = "5e-4"
    run_train(*base, "--resume")
    assert (state.parent / "final" / "model.safetensors").exists() and not state.exists()


def test_diverging_run_killed_as_it_diverges_or_as_it_resumes_finishes_at_a_lower_lr(
    tiny_model_dir, chat_data, tmp_path
):
    """the guard writes nothing (the weights that diverged are not worth keeping): resumed after
    step 2 at lr 1e6, the run diverges on step 4; SIGKILLed once it logged step 3 (in step 4 or
    while the guard stops the run), then once it loaded the state (before step 3 ends), it leaves
    the state saved after step 2, from which a lower lr finishes the run"""
    run = tmp_path / "run"
    base = [
        str(ROOT / "train.py"),
        *cli(
            model=tiny_model_dir,
            data=chat_data,
            global_batch="8",
            warmup_ratio="0",
            grad_clip="0",
            out=run,
        ),
    ]
    run_train(*base[1:], "--lr", "1e-3", "--stop-at-step", "2")
    stdout = tmp_path / "stdout"
    for ready in (
        lambda: len((run / "metrics.jsonl").read_text().splitlines()) == 3,
        lambda: "resuming after step 2" in stdout.read_text(),
    ):
        with open(stdout, "w") as f:
            proc = subprocess.Popen(
                [sys.executable, *map(str, base), "--lr", "1e6", "--resume"],
                stdout=f,
                stderr=subprocess.DEVNULL,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        kill_when(proc, ready, every=0.005)  # a step takes 0.1 s or more
        assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
        assert latest(run / "state")["step"] == 2 and not (run / "final").exists()
    out = run_train(*base[1:], "--lr", "1e-4", "--resume").stdout
    assert "resuming after step 2" in out
    assert all(v.isfinite().all() for v in weights(run).values())


def test_split_command_rejects_bad_dynamics_in_one_line(tmp_path, capsys):
    def split(lines, out=None):
        """`sftmix.py split` in this process: (exit status, stderr lines, --out)."""
        path = tmp_path / "dynamics.jsonl"
        path.write_text("".join(json.dumps(l) + "\n" for l in lines))
        out, code = out or tmp_path / "split.json", 0
        try:
            sftmix.main(["split", "--dynamics", str(path), "--out", str(out)])
        except SystemExit as e:
            code = e.code
        return code, capsys.readouterr().err.strip().splitlines(), out

    good = [{"id": "a", "perplexities": [2.0, 3.0]}, {"id": "b", "perplexities": [4.0, 5.0]}]
    for bad, expected in [
        ({"id": "c", "perplexities": [float("nan"), 1.0]}, ':3: "perplexities": expected a list'),
        ({"id": "c", "perplexities": [0.0, 1.0]}, ':3: "perplexities": expected a list'),
        ({"id": "c", "perplexities": [-2.0, 1.0]}, ':3: "perplexities": expected a list'),
        ({"id": "c", "perplexities": "12"}, ':3: "perplexities": expected a list'),
        ({"id": "a", "perplexities": [1.0, 1.0]}, ':3: "id": "a" already on line 1'),
    ]:
        code, err, out = split(good + [bad])
        assert code == 2 and len(err) == 1 and expected in err[0], err
        assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    code, err, out = split(good[:1])
    assert code == 2 and len(err) == 1 and "expected at least 2" in err[0] and not out.exists()
    code, err, out = split(good, out=tmp_path)
    assert (
        code == 2
        and len(err) == 1
        and "is a directory" in err[0]
        and not list(tmp_path.glob("*.tmp"))
    )
    code, err, out = split(good, out=tmp_path / "new" / "dir" / "split.json")
    assert code == 0 and json.loads(out.read_text()) == {"confident": ["a"], "unconfident": ["b"]}


def test_random_split_has_the_sizes_of_the_median_split_is_deterministic_and_differs_between_seeds():
    ids = [f"x{i}" for i in range(101)]
    a, b, c = sftmix.random_split(ids, 0), sftmix.random_split(ids, 0), sftmix.random_split(ids, 1)
    assert a == b and a != c
    assert (
        [len(h) for h in a]
        == [len(h) for h in sftmix.split_by_confidence(ids, [0.0] * 101)]
        == [50, 51]
    )
    assert sorted(a[0] + a[1]) == sorted(ids)


def test_perplexity_that_overflows_is_inf_and_dynamics_name_the_example(
    tiny_model_dir, chat_data, tmp_path, capsys
):
    assert sftmix.perplexity(800.0, 1) == float("inf") and sftmix.perplexity(
        1.0, 1
    ) == pytest.approx(2.718281828)
    blown = tmp_path / "blown"
    blown.mkdir()
    for f in tiny_model_dir.iterdir():
        (blown / f.name).write_bytes(f.read_bytes())
    from safetensors.torch import load_file, save_file

    w = load_file(str(blown / "model.safetensors"))
    w["model.norm.weight"] *= 1e6  # logits in the millions: mean NLL far above 709 nats
    save_file(w, str(blown / "model.safetensors"), metadata={"format": "pt"})
    line = one_line_error(
        capsys,
        *cli(model=blown, data=chat_data),
        *COMMON,
        *cli(lr="1e-12", dynamics="1", out=tmp_path / "run"),
    )
    assert "perplexity overflows a float" in line and "example ex" in line
    assert no_leftovers(tmp_path / "run")


def test_a_split_with_every_id_in_one_half_says_so(tiny_model_dir, chat_data, tmp_path, capsys):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"confident": [f"ex{i}" for i in range(40)], "unconfident": []}))
    line = one_line_error(
        capsys,
        *cli(mode="sftmix", split=split, model=tiny_model_dir, data=chat_data),
        *COMMON,
        "--out",
        tmp_path / "run",
    )
    assert (
        line
        == f"error: {split}: 40 confident and 0 unconfident examples make 0 pairs, fewer than the 4 of one global batch"
    )


# ----------------------------------------------------------------- found before anything is printed


def fails_with_one_line(capsys, main, *argv):
    """main(argv) in this process exits 2 with one line on stderr, no traceback, and nothing on
    stdout: no progress line came before the error. Returns the line."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert (
        e.value.code == 2 and out == "" and len(err.splitlines()) == 1 and "Traceback" not in err
    ), (out, err)
    return err.strip()


def longrope_model(tiny_model_dir, path):
    """The tiny model's config.json with Phi-3's longrope parameters (no "factor"), nothing else: it
    is refused before any weight is read."""
    path.mkdir()
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    cfg["rope_parameters"] = {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "short_factor": [1.0] * 4,
        "long_factor": [2.0] * 4,
        "original_max_position_embeddings": 64,
    }
    (path / "config.json").write_text(json.dumps(cfg))
    return path


@pytest.mark.parametrize(
    "case",
    [
        "--seed -1",
        "--heldout missing",
        "--heldout malformed",
        "--dynamics 9 of 5 steps",
        "rope_parameters.rope_type longrope",
        'torch_dtype ["float32"]',
        "SFTMIX_DEVICE_MEMORY_GB=80GB",
        "SFTMIX_DEVICE_MEMORY_GB=-1",
        "--out the model",
        "--out the model's run directory",
    ],
)
def test_bad_input_found_after_reading_is_one_line_before_any_progress_and_writes_nothing(
    case, tiny_model_dir, chat_data, tmp_path, capsys, monkeypatch
):
    model, heldout = tiny_model_dir, tmp_path / "heldout.jsonl"
    model_as_out = (
        ["--out", tmp_path / "m"],
        "error: --out {model}: expected a directory other than the model's (--model {model}): "
        "the run's final/ would take its place",
    )
    flags, expected = {
        "--seed -1": (["--seed", "-1"], "error: --seed: expected >= 0, got -1"),
        "--heldout missing": (
            ["--heldout", heldout],
            f"error: {heldout}: cannot read: No such file or directory",
        ),
        "--heldout malformed": (["--heldout", heldout], f"error: {heldout}:1: invalid JSON: "),
        "--dynamics 9 of 5 steps": (
            ["--dynamics", "9"],
            "error: --dynamics 9: the run has only 5 steps; expected at least 9",
        ),
        "rope_parameters.rope_type longrope": (
            [],
            "error: {model}/config.json: rope_parameters.rope_type: expected "
            '"default" or "llama3" (the RoPE implemented here), got "longrope"',
        ),
        'torch_dtype ["float32"]': (
            [],
            "error: {model}/config.json: torch_dtype: expected a dtype name (a string such as "
            '"bfloat16") or null, got ["float32"]',
        ),
        "SFTMIX_DEVICE_MEMORY_GB=80GB": (
            [],
            "error: SFTMIX_DEVICE_MEMORY_GB: expected a number > 0 (GB), got '80GB'",
        ),
        "SFTMIX_DEVICE_MEMORY_GB=-1": (
            [],
            "error: SFTMIX_DEVICE_MEMORY_GB: expected > 0 (GB), got -1.0",
        ),
        "--out the model": model_as_out,
        "--out the model's run directory": model_as_out,
    }[case]
    if case == "--heldout malformed":
        heldout.write_text('{"messages": [{"role": "user", "content": "Hi"},\n')
    if case.startswith("rope"):
        model = longrope_model(tiny_model_dir, tmp_path / "longrope")
    if case.startswith(("torch_dtype", "--out")):  # a copy of the model (a run's final/)
        model = tmp_path / "m"
        shutil.copytree(tiny_model_dir, model / "final" if "run" in case else model)
    if case.startswith("torch_dtype"):
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(config | {"torch_dtype": ["float32"]}))
    if case.startswith("SFTMIX"):
        monkeypatch.setenv(*case.split("="))
    line = fails_with_one_line(
        capsys,
        T.main,
        *cli(model=model, data=chat_data),
        *COMMON,
        "--out",
        tmp_path / "run",
        *flags,
    )
    assert line.startswith(expected.format(model=model)), line
    assert not (tmp_path / "run").exists() and not list(tmp_path.rglob("metrics.jsonl"))


def test_eval_split_naming_no_example_fails_before_the_model_loads(
    tiny_model_dir, chat_data, tmp_path, capsys
):
    import eval as E

    split = tmp_path / "split.json"
    split.write_text(json.dumps({"confident": ["ex0"], "unconfident": ["ghost"]}))
    expected = 'error: --split: "unconfident": none of its ids is an example of --data'
    out = tmp_path / "ppl.jsonl"
    assert (
        fails_with_one_line(
            capsys,
            E.main,
            "ppl",
            *cli(model=tiny_model_dir, data=chat_data, split=split, out=out),
        )
        == expected
    )
    sys.path.insert(0, str(ROOT / "scripts"))
    import report

    assert (
        fails_with_one_line(
            capsys,
            report.main,
            "compare",
            tiny_model_dir,
            tiny_model_dir,
            *cli(data=chat_data, split=split, out=tmp_path / "table.md"),
        )
        == expected
    )
    assert not out.exists() and not (tmp_path / "table.md").exists()


def test_eval_refuses_a_model_it_cannot_run_exactly_and_a_second_turn_alpaca_cannot_hold_up_front(
    tiny_model_dir, chat_data, tmp_path, capsys
):
    import eval as E

    model = longrope_model(tiny_model_dir, tmp_path / "longrope")
    sys.path.insert(0, str(ROOT / "scripts"))
    import report

    line = fails_with_one_line(
        capsys, report.main, "compare", tiny_model_dir, model, "--data", chat_data
    )
    assert line.startswith(f"error: {model / 'config.json'}: rope_parameters.rope_type: expected ")
    questions = tmp_path / "question.jsonl"
    questions.write_text(
        json.dumps({"question_id": 81, "category": "writing", "turns": ["Hi.", "Again."]}) + "\n"
    )
    out = tmp_path / "answers.jsonl"
    line = fails_with_one_line(
        capsys,
        E.main,
        "generate",
        *cli(
            model=tiny_model_dir,
            questions=questions,
            prompt_format="alpaca",
            max_new_tokens="2",
            out=out,
        ),
    )
    assert (
        line.startswith(
            "error: question 81: messages: the alpaca prompt format holds one instruction"
        )
        and not out.exists()
    )


@pytest.mark.parametrize("case", ['ids 1 and "1"', "--out under a file"])
def test_split_command_bad_input_exits_2_with_one_line(case, tmp_path, capsys):
    dynamics, blocker = tmp_path / "dynamics.jsonl", tmp_path / "f"
    blocker.write_text("x")
    second = "1" if case.startswith("ids") else 2
    dynamics.write_text(
        json.dumps({"id": 1, "perplexities": [2.0]})
        + "\n"
        + json.dumps({"id": second, "perplexities": [3.0]})
        + "\n"
    )
    out = blocker / "split.json" if case.startswith("--out") else tmp_path / "split.json"
    line = fails_with_one_line(capsys, sftmix.main, "split", "--dynamics", dynamics, "--out", out)
    assert line == (
        f'error: {dynamics}:2: "id": "1" already on line 1'
        if case.startswith("ids")
        else f"error: --out {out}: cannot make its directory {blocker}: File exists"
    )
    assert not out.exists() and not list(tmp_path.rglob("*.tmp"))


@pytest.mark.parametrize(
    "case",
    ["OUT a file", "times.tsv a directory", "pipeline.args a directory", "pipeline.args garbage"],
)
def test_a_pipeline_out_it_cannot_write_is_one_line_before_any_stage(
    case, tiny_model_dir, chat_data, tmp_path, capsys, monkeypatch
):
    sys.path.insert(0, str(ROOT / "scripts"))
    import pipeline

    out, name = tmp_path / "out", case.split()[0]
    if case == "OUT a file":
        out.write_text("x")
    else:
        out.mkdir()
        put(out / name, "garbage\n" if case.endswith("garbage") else None)
    expected = {
        "OUT a file": f"OUT {out}/times.tsv: cannot make its directory {out}: File exists",
        "times.tsv a directory": f"OUT {out / name}: is a directory; expected a file to write",
        "pipeline.args a directory": f"OUT {out / name}: is a directory; expected a file to write",
        "pipeline.args garbage": f"{out / name}: {out} holds a pipeline run with other settings "
        f"(MODEL: None there, '{tiny_model_dir}' now;",
    }[case]
    monkeypatch.chdir(ROOT)  # pipeline.main moves there
    line = fails_with_one_line(capsys, pipeline.main, tiny_model_dir, chat_data, out)
    assert line.startswith("error: " + expected), line
    assert sorted(tmp_path.rglob("*")) == [out] + [out / name] * (case != "OUT a file")


# ---------------------------------------------------------------------------- a moved run directory


def run_inputs(directory, chat_data):
    """train.jsonl, heldout.jsonl and split.json in directory; the flags of an SFTMix run on them
    into directory/run.
    """
    directory.mkdir()
    (directory / "train.jsonl").write_text(chat_data.read_text())
    (directory / "heldout.jsonl").write_text(
        "".join(chat_data.read_text().splitlines(keepends=True)[:8])
    )
    (directory / "split.json").write_text(
        json.dumps(
            {
                "confident": [f"ex{i}" for i in range(0, 40, 2)],
                "unconfident": [f"ex{i}" for i in range(1, 40, 2)],
            }
        )
    )
    return run_flags(directory)


def run_flags(directory):
    return [
        *cli(
            mode="sftmix",
            data=directory / "train.jsonl",
            heldout=directory / "heldout.jsonl",
            split=directory / "split.json",
        ),
        *COMMON,
        *cli(epochs="2", micro_batch="2", out=directory / "run"),
    ]


def test_a_run_directory_moved_with_its_inputs_resumes_bitwise(tiny_model_dir, chat_data, tmp_path):
    """paths are not settings: a run stopped on scratch and moved home, its data, held-out data and
    split with it, continues there and ends bitwise equal to an uninterrupted run (weights and every
    metric but the speed)"""
    model = ["--model", tiny_model_dir]
    run_train(*model, *run_inputs(tmp_path / "whole", chat_data))
    # mid-epoch 0 of 5 steps
    run_train(*model, *run_inputs(tmp_path / "scratch", chat_data), "--stop-at-step", "3")
    (tmp_path / "scratch").rename(tmp_path / "home")
    run_train(*model, *run_flags(tmp_path / "home"), "--resume")
    whole, moved = weights(tmp_path / "whole" / "run"), weights(tmp_path / "home" / "run")
    assert whole.keys() == moved.keys() and all(torch.equal(whole[n], moved[n]) for n in whole)

    def metrics(run):
        return [
            {k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]

    assert metrics(tmp_path / "home" / "run") == metrics(tmp_path / "whole" / "run")
    assert sum("heldout_ppl" in m for m in metrics(tmp_path / "whole" / "run")) == 2


@pytest.mark.parametrize("changed", ["split", "heldout", "model"])
def test_resume_after_an_input_changed_in_place_names_it(
    changed, tiny_model_dir, chat_data, tmp_path, capsys
):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    base = ["--model", model, *run_inputs(tmp_path / "in", chat_data)]
    run_train(*base, "--stop-at-step", "2")
    path = {
        "split": tmp_path / "in" / "split.json",
        "heldout": tmp_path / "in" / "heldout.jsonl",
        "model": model / "config.json",
    }[changed]
    text = path.read_text()
    path.write_text(
        {
            "split": text.replace('"ex0"', '"tmp"')
            .replace('"ex1"', '"ex0"')
            .replace('"tmp"', '"ex1"'),
            "heldout": text.replace('"assistant", "content": "', '"assistant", "content": "a ', 1),
            "model": text.replace('"rms_norm_eps": 1e-05', '"rms_norm_eps": 1e-06'),
        }[changed]
    )
    assert path.read_text() != text
    what = {
        "split": f"{path}: the split changed since the run started",
        "heldout": f"{path}: the held-out data changed since the run started",
        "model": f"{model}: its config.json is not that of the run's model",
    }[changed]
    line = fails_with_one_line(capsys, T.main, *base, "--resume")
    assert (
        line
        == f"error: {tmp_path / 'in' / 'run' / 'state'}: was written by a run with other settings: {what}"
    )


# ----------------------------------------------------------------------------- killed while writing


def kill_when(proc, ready, every=0.0):
    """SIGKILL proc at the first moment ready() holds (polled every `every` seconds; 0: as fast as
    it can), or after it ended."""
    while proc.poll() is None and not ready():
        time.sleep(every)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def uncommitted(state):
    """A step-N folder that latest.json does not name: a state being written, or written and not yet
    committed.
    """
    committed = latest(state)["checkpoint"] if (state / "latest.json").exists() else None
    return any(f.name != committed for f in state.glob("step-*")) if state.exists() else False


def test_run_killed_while_a_state_is_written_in_the_background_resumes_bitwise(
    tiny_model_dir, chat_data, tmp_path
):
    """a state every step, written asynchronously: killed while one is in flight (three times), the
    run resumes from the last committed state and ends bitwise where the uninterrupted run ends"""
    base = [
        str(ROOT / "train.py"),
        *cli(model=tiny_model_dir, data=chat_data),
        *COMMON,
        *cli(epochs="2", micro_batch="4"),
    ]
    run_train(*base[1:], "--out", tmp_path / "whole")
    state, landed = tmp_path / "killed" / "state", 0
    for attempt in range(3):
        proc = subprocess.Popen(
            [sys.executable, *map(str, base), "--out", tmp_path / "killed"]
            + ["--resume"] * (attempt > 0),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        kill_when(proc, lambda: uncommitted(state) and (state / "latest.json").exists())
        landed += uncommitted(state)
    assert landed >= 1 and not (tmp_path / "killed" / "final").exists()
    run_train(*base[1:], "--out", tmp_path / "killed", "--resume")
    whole, resumed = weights(tmp_path / "whole"), weights(tmp_path / "killed")
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


@pytest.mark.parametrize("files", [0, 3, 8])
def test_run_killed_while_writing_final_leaves_no_final_and_the_rerun_writes_it_whole(
    files, tiny_model_dir, chat_data, tmp_path
):
    """final/ in bf16, in shards of 1 KB (a file a weight matrix, 15 files): killed once `files` of
    them are written, the run leaves no final/; --resume removes the leftover and writes final/
    equal to an uninterrupted run's"""
    flags = [
        *cli(model=tiny_model_dir, data=chat_data),
        *COMMON,
        *cli(save_dtype="bf16", final_shard_gb="0.000001"),
    ]
    run_train(*flags, "--out", tmp_path / "whole")
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *map(str, flags), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    tmp = out / "final.tmp"
    kill_when(proc, lambda: tmp.exists() and len(os.listdir(tmp)) >= files)
    assert tmp.exists() and not (out / "final").exists(), (
        "the kill did not land while final/ was written"
    )
    run_train(*flags, "--out", out, "--resume")
    assert (out / "final").is_dir() and not list(out.rglob("*.tmp"))
    index = json.loads((out / "final" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 8
    whole, resumed = (
        M.load_pretrained(run, dtype=torch.bfloat16).state_dict()
        for run in (tmp_path / "whole", out)
    )
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)
