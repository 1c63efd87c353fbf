"""train.py end to end on CPU: DDP equals one process, resume equals no interruption, dynamics are
what they claim.
"""

import contextlib
import io
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import data
import model as M
import train as T

ROOT = Path(__file__).resolve().parent.parent


def cli(**values) -> list[str]:
    """Command-line flags from keywords, in order: cli(micro_batch=2, out=p) gives
    ["--micro-batch", "2", "--out", str(p)]."""
    return [x for k, v in values.items() for x in (f"--{k.replace('_', '-')}", str(v))]


COMMON = cli(global_batch="8", lr="1e-3", warmup_ratio="0.2", save_every="1")


def run_train(*args, nproc=1):
    """train.py with these flags: its main in this process on one rank (no interpreter to start),
    under torchrun on nproc gloo ranks. Returns its (stdout, stderr); fails with its stderr."""
    argv = [str(a) for a in args]
    if nproc == 1:
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                T.main(argv)
        except SystemExit as e:
            raise AssertionError(f"train.py exited {e.code}: {err.getvalue()[-3000:]}") from None
        return subprocess.CompletedProcess(argv, 0, out.getvalue(), err.getvalue())
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    r = subprocess.run(
        [*launcher, f"--nproc_per_node={nproc}", str(ROOT / "train.py"), *argv],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        raise AssertionError(r.stderr[-3000:])
    return r


def weights(run: Path):
    return load_file(str(run / "final" / "model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_same_steps(a: Path, b: Path, grad_norm_rel: float):
    """Runs a and b logged the same steps with the same losses and grad norm before clipping: the
    grad norm scales with the gradient, which the weights hide (clipping and AdamW's m / sqrt(v)
    cancel a constant factor on it). Losses within 1e-6: the same per-token sums in another order,
    measured 1e-7 apart. A full model's grad norm is an fp32 norm over the embedding gradient's 1.5M
    entries, ~3e-5 off float64 on the CPU (the gradients agree to ~3e-7): two code paths measured
    2e-5 apart at lr 1e-4, 8e-5 at lr 1e-3; LoRA's, over the adapters alone, 1e-7."""
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in ma] == [m["step"] for m in mb]
    losses = ("loss", "ntp_loss", "mixup_loss")
    for x, y in zip(ma, mb):
        assert [y[k] for k in losses] == pytest.approx([x[k] for k in losses], rel=1e-6), x["step"]
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=grad_norm_rel), x["step"]


def saved_state(run: Path):
    """(step, model weights) of the resumable state of a one-rank run, read back with safetensors
    alone.
    """
    latest = json.loads((run / "state" / "latest.json").read_text())
    files = (run / "state" / latest["checkpoint"]).glob("*.safetensors")
    tensors = {k: v for f in files for k, v in load_file(str(f)).items()}
    return latest["step"], {
        k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")
    }


@pytest.fixture(scope="module")
def split_file(tiny_model_dir, chat_data, tmp_path_factory):
    """An arbitrary deterministic split of the 40 ids (stage 3 takes any split; stage 2 is tested
    elsewhere).
    """
    path = tmp_path_factory.mktemp("split") / "split.json"
    path.write_text(
        json.dumps(
            {
                "confident": [f"ex{i}" for i in range(0, 40, 2)],
                "unconfident": [f"ex{i}" for i in range(1, 40, 2)],
            }
        )
    )
    return path


@pytest.mark.parametrize("mode", ["ntp", "sftmix"])
def test_ddp_on_two_processes_gives_the_weights_of_one_process(
    mode, tiny_model_dir, chat_data, split_file, tmp_path
):
    # lr 1e-4: AdamW scales even float-noise-sized gradients to steps of about lr, so a larger lr
    # mostly measures Adam's amplification of summation order, not DDP
    base = [
        *cli(mode=mode, model=tiny_model_dir, data=chat_data),
        *COMMON,
        *cli(epochs="2", lr="1e-4"),
    ]
    if mode == "sftmix":
        base += ["--split", split_file]
    run_train(
        *base, "--out", tmp_path / "one", "--micro-batch", "2"
    )  # 4 micro-batches of gradient accumulation
    run_train(
        *base, "--out", tmp_path / "two", "--micro-batch", "2", nproc=2
    )  # 2 ranks x 2 micro-batches
    one, two = weights(tmp_path / "one"), weights(tmp_path / "two")
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    for name in one:
        assert not torch.equal(one[name], start[name]), f"{name} did not train"
        rel = ((one[name] - two[name]).abs().max() / one[name].abs().max()).item()
        assert rel <= 1e-5, (name, rel)
    assert_same_steps(tmp_path / "one", tmp_path / "two", grad_norm_rel=1e-4)


def test_resumed_run_ends_bitwise_equal_to_an_uninterrupted_one(
    tiny_model_dir, chat_data, split_file, tmp_path
):
    base = [
        *cli(mode="sftmix", split=split_file, model=tiny_model_dir, data=chat_data),
        *COMMON,
        *cli(epochs="2", micro_batch="2"),
    ]
    run_train(*base, "--out", tmp_path / "whole")
    run_train(
        *base, "--out", tmp_path / "parts", "--stop-at-step", "3"
    )  # mid-epoch 0 (5 steps an epoch)
    assert not (tmp_path / "parts" / "final").exists()
    run_train(*base, "--out", tmp_path / "parts", "--stop-at-step", "7", "--resume")  # mid-epoch 1
    run_train(*base, "--out", tmp_path / "parts", "--resume")
    whole, parts = weights(tmp_path / "whole"), weights(tmp_path / "parts")
    assert all(torch.equal(whole[n], parts[n]) for n in whole)
    assert [m["step"] for m in metrics(tmp_path / "parts")] == list(range(1, 11))


def test_run_killed_after_its_second_step_resumes_bitwise_equal(
    tiny_model_dir, chat_data, tmp_path
):
    """SIGKILLed once it has logged step 2 and committed a state (wherever it is then: mid-step,
    mid-write of the next state or of metrics.jsonl), the run resumes from that state and ends
    bitwise where the uninterrupted run ends"""
    base = [
        str(ROOT / "train.py"),
        *cli(model=tiny_model_dir, data=chat_data),
        *COMMON,
        *cli(epochs="2", micro_batch="4"),
    ]
    run_train(*base[1:], "--out", tmp_path / "whole")
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, *map(str, base), "--out", killed],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    latest = killed / "state" / "latest.json"
    while proc.poll() is None and not (
        latest.exists() and len((killed / "metrics.jsonl").read_text().splitlines()) >= 2
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    saved = json.loads(latest.read_text())["step"]
    assert 1 <= saved < 10 and not (killed / "final").exists()
    out = run_train(*base[1:], "--out", killed, "--resume").stdout
    assert f"resuming after step {saved}" in out
    whole, resumed = weights(tmp_path / "whole"), weights(killed)
    assert all(torch.equal(whole[n], resumed[n]) for n in whole)


def test_pipeline_runs_every_stage_and_reuses_the_reference_run_as_the_one_epoch_baseline(
    tiny_model_dir, chat_data, tmp_path
):
    env = {**os.environ, "PYTHON": sys.executable, "DYNAMICS": "2"}
    subprocess.run(
        [
            "bash",
            ROOT / "scripts" / "pipeline.sh",
            tiny_model_dir,
            chat_data,
            tmp_path,
            *cli(global_batch="8", lr="1e-3"),
        ],
        env=env,
        check=True,
        capture_output=True,
    )
    dynamics = [
        json.loads(l) for l in (tmp_path / "reference" / "dynamics.jsonl").read_text().splitlines()
    ]
    split = json.loads((tmp_path / "split.json").read_text())
    by_confidence = sorted(dynamics, key=lambda r: (-r["confidence"], r["id"]))
    assert split["confident"] == [r["id"] for r in by_confidence[:20]]
    assert split["unconfident"] == [r["id"] for r in by_confidence[20:]]
    assert (tmp_path / "sftmix" / "final" / "model.safetensors").exists()
    assert (tmp_path / "ntp").resolve() == (tmp_path / "reference").resolve()


def hf_response_nll(hf, samples):
    """Response NLL per sample, computed with transformers one sample at a time, no padding."""
    out = {}
    for s in samples:
        logp = torch.log_softmax(hf(torch.tensor([s.input_ids])).logits[0].double(), -1)  # (T, V)
        out[s.id] = (
            -sum(logp[t, y].item() for t, y in enumerate(s.labels) if y != data.IGNORE),
            sum(y != data.IGNORE for y in s.labels),
        )
    return out


def hf_model(run: Path, state=None):
    hf = LlamaForCausalLM(LlamaConfig.from_pretrained(run / "final")).eval()
    if state is None:
        hf = LlamaForCausalLM.from_pretrained(run / "final").eval()
    else:
        hf.load_state_dict(state, strict=False)  # tied: lm_head shares embed_tokens
    return hf


def test_dynamics_are_response_perplexities_of_the_checkpoints_on_one_and_two_ranks(
    tiny_model_dir, chat_data, tmp_path
):
    base = [
        *cli(model=tiny_model_dir, data=chat_data),
        *COMMON,
        *cli(micro_batch="4", dynamics="2", eval_batch="3"),
    ]
    run_train(
        *base, "--out", tmp_path / "one", "--stop-at-step", "2"
    )  # 5 steps: points after steps 2 and 5
    _, mid = saved_state(tmp_path / "one")
    run_train(*base, "--out", tmp_path / "one", "--resume")
    run_train(*base, "--out", tmp_path / "two", nproc=2)

    tok = data.load_tokenizer(tiny_model_dir)
    samples, _ = data.load_dataset(chat_data, tok)
    with torch.no_grad():
        at_points = [
            hf_response_nll(hf_model(tmp_path / "one", mid), samples),
            hf_response_nll(hf_model(tmp_path / "one"), samples),
        ]
    for run in ("one", "two"):
        records = [
            json.loads(l) for l in (tmp_path / run / "dynamics.jsonl").read_text().splitlines()
        ]
        assert sorted(r["id"] for r in records) == sorted(
            s.id for s in samples
        )  # each id exactly once
        for r in records:
            expected = [math.exp(nll / n) for nll, n in (point[r["id"]] for point in at_points)]
            assert r["perplexities"] == pytest.approx(expected, rel=1e-4)
            assert r["confidence"] == pytest.approx(-sum(r["perplexities"]) / 2)


def one_line_error(capsys, *argv):
    """Run train.py's main in this process; return its last stderr line after checking it failed
    cleanly.
    """
    with pytest.raises(SystemExit) as e:
        T.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code != 0 and "Traceback" not in err
    return err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "flags,expected",
    [
        (["--alpha", "0"], "error: --alpha: expected > 0 (Beta(alpha, alpha)), got 0.0"),
        (["--mu", "-0.1"], "error: --mu: expected >= 0, got -0.1"),
        (
            ["--micro-batch", "3", "--global-batch", "6"],
            "error: --micro-batch 3: an SFTMix micro-batch holds "
            "confident/unconfident pairs, expected an even number",
        ),
        (
            ["--global-batch", "10"],
            "error: --global-batch 10: expected a multiple of ranks x --micro-batch = 1 x 4",
        ),
    ],
)
def test_bad_sftmix_settings_get_one_line(
    flags, expected, tiny_model_dir, chat_data, split_file, tmp_path, capsys
):
    assert (
        one_line_error(
            capsys,
            *cli(
                mode="sftmix",
                split=split_file,
                model=tiny_model_dir,
                data=chat_data,
                out=tmp_path,
                micro_batch="4",
            ),
            *flags,
        )
        == expected
    )


@pytest.mark.parametrize(
    "extra,expected",
    [
        (
            "ghost",
            "1 not in the data ['ghost'], 1 of the data not in the split ['ex39'], "
            "0 in both halves, 0 repeated in a half []",
        ),
        (
            "ex0",  # twice in the confident half
            "0 not in the data [], 1 of the data not in the split ['ex39'], "
            "0 in both halves, 1 repeated in a half ['ex0']",
        ),
    ],
)
def test_split_that_does_not_match_the_data_gets_one_line(
    extra, expected, tiny_model_dir, chat_data, tmp_path, capsys
):
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps(
            {
                "confident": [f"ex{i}" for i in range(20)] + [extra],
                "unconfident": [f"ex{i}" for i in range(20, 39)],
            }
        )
    )
    line = one_line_error(
        capsys,
        *cli(
            mode="sftmix", split=split, model=tiny_model_dir, data=chat_data, out=tmp_path / "run"
        ),
    )
    assert line == f"error: {split}: ids must match the data: {expected}"


def test_resume_with_other_settings_gets_one_line(tiny_model_dir, chat_data, tmp_path, capsys):
    base = cli(model=tiny_model_dir, data=chat_data, out=tmp_path, global_batch="8")
    run_train(*base, "--seed", "1", "--stop-at-step", "1")
    line = one_line_error(capsys, *base, "--seed", "2", "--resume")
    assert (
        line
        == f"error: {tmp_path / 'state'}: was written by a run with other settings: --seed: saved 1, now 2"
    )


def test_loss_that_turns_nan_stops_and_keeps_the_last_state_saved_on_schedule(
    tiny_model_dir, chat_data, tmp_path, capsys
):
    base = cli(
        model=tiny_model_dir,
        data=chat_data,
        out=tmp_path,
        global_batch="8",
        warmup_ratio="0",
        grad_clip="0",
    )
    run_train(*base, "--lr", "1e-3", "--stop-at-step", "2")
    saved = json.loads((tmp_path / "state" / "latest.json").read_text())
    _, before = saved_state(tmp_path)
    line = one_line_error(capsys, *base, "--lr", "1e6", "--resume")  # diverges on step 3 or 4
    assert line.startswith("error: step ") and (
        "loss is not finite" in line or "weights inf or NaN" in line
    )
    assert line.endswith(
        f"The state after step 2 is in {tmp_path / 'state'}: continue with --resume and a lower --lr"
    )
    assert json.loads((tmp_path / "state" / "latest.json").read_text()) == saved
    _, after = saved_state(tmp_path)
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert not (tmp_path / "final").exists()


def test_final_is_in_the_base_checkpoints_dtype_unless_told_and_loads_in_transformers_as_that(
    tiny_model_dir, chat_data, tmp_path
):
    bf16_base = (
        tmp_path / "bf16-base"
    )  # the tiny fp32 model rounded to bf16, as the paper's models are released
    M.save_pretrained(
        M.load_pretrained(tiny_model_dir, dtype=torch.bfloat16),
        bf16_base,
        tokenizer_dir=tiny_model_dir,
    )
    for base, out, flags in (
        (tiny_model_dir, "fp32", []),
        (tiny_model_dir, "told", ["--save-dtype", "bf16"]),
        (bf16_base, "bf16", []),
    ):
        run_train("--model", base, "--data", chat_data, *COMMON, "--out", tmp_path / out, *flags)
    fp32, told, bf16 = (weights(tmp_path / out) for out in ("fp32", "told", "bf16"))
    assert {t.dtype for t in fp32.values()} == {torch.float32}  # the demo's fp32 SmolLM2 stays fp32
    assert all(
        torch.equal(told[n], fp32[n].to(torch.bfloat16)) for n in fp32
    )  # the same run, rounded once
    assert {t.dtype for t in bf16.values()} == {torch.bfloat16}
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "bf16" / "final", dtype="auto").eval()
    assert {p.dtype for p in hf.parameters()} == {torch.bfloat16}
    ours = M.load_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), hf(ids).logits)  # bf16's tolerance; measured: equal


def test_weight_decay_shrinks_matrices_and_leaves_norm_weights_untouched():
    """with zero gradients AdamW's step is pure decay: W <- W (1 - lr wd) for matrices, RMSNorm
    weights stay
    """
    import model as M

    torch.manual_seed(0)
    tiny = M.Transformer(
        M.ModelArgs(
            hidden_size=8,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=4,
            vocab_size=11,
        )
    )
    with torch.no_grad():
        for p in tiny.parameters():
            p.normal_()  # norm weights away from 1, so decay would show
    optimizer = T.adamw(tiny, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in tiny.named_parameters()}
    for p in tiny.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    norms = [n for n in before if "norm" in n]
    assert len(norms) == 3
    for n, p in tiny.named_parameters():
        expected = before[n] if n in norms else before[n] * (1 - 0.1 * 0.5)
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-7)


def test_no_state_is_written_at_the_last_step_when_final_follows(
    tiny_model_dir, chat_data, tmp_path, monkeypatch
):
    """--save-every 1 over 5 steps: states after steps 1-4, none after step 5 (final/ follows);
    --keep-state keeps a state of the end"""
    saved, real = [], T.Saver.save
    monkeypatch.setattr(
        T.Saver,
        "save",
        lambda self, m, o, step, *a: saved.append(step) or real(self, m, o, step, *a),
    )
    base = ["--model", tiny_model_dir, "--data", chat_data, *COMMON]
    T.main([str(a) for a in (*base, "--out", tmp_path / "run")])
    assert (
        saved == [1, 2, 3, 4]
        and (tmp_path / "run" / "final").is_dir()
        and not (tmp_path / "run" / "state").exists()
    )
    saved.clear()
    T.main([str(a) for a in (*base, "--out", tmp_path / "kept", "--keep-state")])
    assert (
        saved == [1, 2, 3, 4, 5]
        and json.loads((tmp_path / "kept" / "state" / "latest.json").read_text())["step"] == 5
    )


def test_heldout_every_k_steps_appends_each_examples_response_nll(
    tiny_model_dir, chat_data, tmp_path
):
    """--heldout-every 2 over 2 epochs of 5 steps: a held-out pass after steps 2, 4, 5, 6, 8, 10,
    each one line of heldout.jsonl; its per-example NLL sums are transformers' on the final weights
    at step 10, and give the metrics' heldout_nll; lines after the step a run resumes from are
    dropped"""
    run = tmp_path / "run"
    base = [
        *cli(model=tiny_model_dir, data=chat_data),
        *COMMON,
        *cli(micro_batch="4", epochs="2", heldout=chat_data, heldout_every="2", out=run),
    ]
    run_train(*base, "--stop-at-step", "5")
    with open(run / "heldout.jsonl", "a") as f:  # as a run killed after step 6's pass leaves it
        f.write(json.dumps({"step": 6, "epoch": 1.2, "nll": {}}) + "\n")
    run_train(*base, "--resume")
    lines = [json.loads(line) for line in (run / "heldout.jsonl").read_text().splitlines()]
    assert [(r["step"], r["epoch"]) for r in lines] == [
        (2, 0.4),
        (4, 0.8),
        (5, 1.0),
        (6, 1.2),
        (8, 1.6),
        (10, 2.0),
    ]
    metrics = {
        m["step"]: m for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
    }
    for r in lines:
        nll, n = sum(v[0] for v in r["nll"].values()), sum(v[1] for v in r["nll"].values())
        assert metrics[r["step"]]["heldout_nll"] == pytest.approx(nll / n, rel=1e-12)
    samples, _ = data.load_dataset(chat_data, data.load_tokenizer(tiny_model_dir), verbose=False)
    with torch.no_grad():
        expected = hf_response_nll(hf_model(run), samples)
    assert lines[-1]["nll"].keys() == expected.keys()
    for k, (nll, n) in expected.items():
        assert lines[-1]["nll"][k][1] == n and lines[-1]["nll"][k][0] == pytest.approx(
            nll, rel=1e-4
        )
