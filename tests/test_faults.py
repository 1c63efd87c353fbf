"""Careless input and faults: each gets one line naming the file or flag, leaves no final output or half-written
file, and a run killed at any moment (also while a diverging run saves) resumes; resuming never unpickles."""
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import pytest

import sftmix
from test_train import COMMON, ROOT, one_line_error, run_train, weights


def no_leftovers(out):
    """No final output and no PATH.tmp anywhere under out."""
    return not (out / "final").exists() and not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("flags,expected", [
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
])
def test_bad_numeric_flag_gets_one_line_before_anything_loads(flags, expected, chat_data, tmp_path, capsys):
    line = one_line_error(capsys, "--model", tmp_path / "no-model", "--data", chat_data, "--out", tmp_path / "run",
                          *flags)
    assert line == f"error: {expected}"
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_out_that_cannot_be_a_directory_gets_one_line(where, tiny_model_dir, chat_data, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    line = one_line_error(capsys, "--model", tiny_model_dir, "--data", chat_data, "--out", out)
    assert line.startswith(f"error: --out {out}: cannot write there")


def test_corrupt_checkpoint_gets_one_line_naming_the_file(tiny_model_dir, chat_data, tmp_path, capsys):
    bad = tmp_path / "model"
    bad.mkdir()
    for f in tiny_model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    weights_file = bad / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:1000])  # truncated
    line = one_line_error(capsys, "--model", bad, "--data", chat_data, "--out", tmp_path / "run")
    assert line.startswith("error: ") and str(weights_file) in line
    assert no_leftovers(tmp_path / "run")


@pytest.fixture
def stopped_run(tiny_model_dir, chat_data, tmp_path):
    base = ["--model", tiny_model_dir, "--data", chat_data, *COMMON, "--out", tmp_path / "run"]
    run_train(*base, "--stop-at-step", "2")
    return base, tmp_path / "run" / "state"


def latest(state):
    return json.loads((state / "latest.json").read_text())


@pytest.mark.parametrize("damage,named", [
    ("latest.json is not JSON", "latest.json"),
    ("checkpoint folder missing", "rank-00000.safetensors"),
    ("state file truncated", "rank-00000.safetensors"),
])
def test_corrupt_state_gets_one_line_naming_the_file(damage, named, stopped_run, capsys):
    base, state = stopped_run
    file = state / latest(state)["checkpoint"] / "rank-00000.safetensors"
    if damage == "latest.json is not JSON":
        (state / "latest.json").write_text('{"step": 2, "check')
    elif damage == "checkpoint folder missing":
        file.unlink()
    else:
        file.write_bytes(file.read_bytes()[:len(file.read_bytes()) // 2])
    line = one_line_error(capsys, *base, "--resume")
    assert line.startswith("error: ") and named in line and str(state) in line


def test_resume_refuses_a_crafted_state_without_running_it(stopped_run, tmp_path, capsys):
    """a pickle that would run code if loaded sits where the state is: resume refuses it, and nothing runs"""
    base, state = stopped_run
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))
    folder = state / latest(state)["checkpoint"]
    for f in folder.iterdir():
        f.unlink()
    (folder / "rank-00000.safetensors").write_bytes(pickle.dumps(Payload()))
    (folder / ".metadata").write_bytes(pickle.dumps(Payload()))  # the file torch.distributed.checkpoint unpickles
    line = one_line_error(capsys, *base, "--resume")
    assert line.startswith("error: ") and "rank-00000.safetensors" in line
    assert not marker.exists()


def test_resume_after_the_data_file_was_edited_in_place_is_refused(tiny_model_dir, chat_data, tmp_path, capsys):
    data_file = tmp_path / "train.jsonl"
    data_file.write_text(chat_data.read_text())
    base = ["--model", tiny_model_dir, "--data", data_file, *COMMON, "--out", tmp_path / "run"]
    run_train(*base, "--stop-at-step", "2")
    data_file.write_text(data_file.read_text().replace('"assistant", "content": "', '"assistant", "content": "a ', 1))
    line = one_line_error(capsys, *base, "--resume")
    assert line == (f"error: {tmp_path / 'run' / 'state'}: was written by a run with other settings: "
                    f"{data_file}: the data changed since the run started")


def test_lr_may_change_on_resume(stopped_run):
    base, state = stopped_run
    base = [a for a in base]
    base[base.index("--lr") + 1] = "5e-4"
    run_train(*base, "--resume")
    assert (state.parent / "final" / "model.safetensors").exists() and not state.exists()


def test_diverging_run_killed_at_any_moment_resumes_with_a_lower_lr(tiny_model_dir, chat_data, tmp_path):
    """the guard writes nothing (the weights that diverged are not worth keeping): a kill at any moment, before or
    while it stops the run, leaves the state saved on schedule, from which a lower lr finishes the run"""
    base = [str(ROOT / "train.py"), "--model", tiny_model_dir, "--data", chat_data, "--global-batch", "8",
            "--warmup-ratio", "0", "--grad-clip", "0", "--out", tmp_path / "run"]
    run_train(*base[1:], "--lr", "1e-3", "--stop-at-step", "2")
    for delay in (0.5, 1.0, 1.5, 2.0, 3.0):  # kills land at different moments of the diverging run
        proc = subprocess.Popen([sys.executable, *map(str, base), "--lr", "1e6", "--resume"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    run_train(*base[1:], "--lr", "1e-4", "--resume")
    assert all(v.isfinite().all() for v in weights(tmp_path / "run").values())


def test_split_command_rejects_bad_dynamics_in_one_line(tmp_path):
    def split(lines, out=None):
        path = tmp_path / "dynamics.jsonl"
        path.write_text("".join(json.dumps(l) + "\n" for l in lines))
        out = out or tmp_path / "split.json"
        r = subprocess.run([sys.executable, ROOT / "sftmix.py", "split", "--dynamics", path, "--out", out],
                           capture_output=True, text=True)
        return r.returncode, r.stderr.strip().splitlines(), out
    good = [{"id": "a", "perplexities": [2.0, 3.0]}, {"id": "b", "perplexities": [4.0, 5.0]}]
    for bad, expected in [({"id": "c", "perplexities": [float("nan"), 1.0]}, ':3: "perplexities": expected a list'),
                          ({"id": "c", "perplexities": [0.0, 1.0]}, ':3: "perplexities": expected a list'),
                          ({"id": "c", "perplexities": [-2.0, 1.0]}, ':3: "perplexities": expected a list'),
                          ({"id": "c", "perplexities": "12"}, ':3: "perplexities": expected a list'),
                          ({"id": "a", "perplexities": [1.0, 1.0]}, ':3: "id": "a" already on line 1')]:
        code, err, out = split(good + [bad])
        assert code != 0 and len(err) == 1 and expected in err[0], err
        assert not out.exists() and not list(tmp_path.glob("*.tmp"))
    code, err, out = split(good[:1])
    assert code != 0 and len(err) == 1 and "expected at least 2" in err[0] and not out.exists()
    code, err, out = split(good, out=tmp_path)
    assert code != 0 and len(err) == 1 and "is a directory" in err[0] and not list(tmp_path.glob("*.tmp"))
    code, err, out = split(good, out=tmp_path / "new" / "dir" / "split.json")
    assert code == 0 and json.loads(out.read_text()) == {"confident": ["a"], "unconfident": ["b"]}


def test_random_split_has_the_sizes_of_the_median_split_is_deterministic_and_differs_between_seeds():
    ids = [f"x{i}" for i in range(101)]
    a, b, c = sftmix.random_split(ids, 0), sftmix.random_split(ids, 0), sftmix.random_split(ids, 1)
    assert a == b and a != c
    assert [len(h) for h in a] == [len(h) for h in sftmix.split_by_confidence(ids, [0.0] * 101)] == [50, 51]
    assert sorted(a[0] + a[1]) == sorted(ids)


def test_perplexity_that_overflows_is_inf_and_dynamics_name_the_example(tiny_model_dir, chat_data, tmp_path, capsys):
    assert sftmix.perplexity(800.0, 1) == float("inf") and sftmix.perplexity(1.0, 1) == pytest.approx(2.718281828)
    blown = tmp_path / "blown"
    blown.mkdir()
    for f in tiny_model_dir.iterdir():
        (blown / f.name).write_bytes(f.read_bytes())
    import torch
    from safetensors.torch import load_file, save_file
    w = load_file(str(blown / "model.safetensors"))
    w["model.norm.weight"] *= 1e6  # logits in the millions: mean NLL far above 709 nats
    save_file(w, str(blown / "model.safetensors"), metadata={"format": "pt"})
    line = one_line_error(capsys, "--model", blown, "--data", chat_data, *COMMON, "--lr", "1e-12",
                          "--dynamics", "1", "--out", tmp_path / "run")
    assert "perplexity overflows a float" in line and "example ex" in line
    assert no_leftovers(tmp_path / "run")


def test_a_split_with_every_id_in_one_half_says_so(tiny_model_dir, chat_data, tmp_path, capsys):
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"confident": [f"ex{i}" for i in range(40)], "unconfident": []}))
    line = one_line_error(capsys, "--mode", "sftmix", "--split", split, "--model", tiny_model_dir, "--data", chat_data,
                          *COMMON, "--out", tmp_path / "run")
    assert line == f"error: {split}: 40 confident and 0 unconfident examples make 0 pairs, fewer than the 4 of one global batch"
