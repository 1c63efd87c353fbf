"""scripts/study.py at toy size (a tiny random model, 32 conversations, 2 epochs, seeds 0 and 1).

First a part of the study (NTP and SFTMix, seed 0), reported with what is missing; then the whole study (all five
arms, both seeds) continues from it. Each table is checked against the runs' own records, recomputed here:
metrics.jsonl for the held-out curves, dynamics.jsonl for the confidence spread; the arms' losses show each ran
with its own train.py flags; flags and inputs are checked before anything is written."""
import json
import math
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import study  # noqa: E402

ARMS = {"ntp": "NTP", "sftmix": "SFTMix", "random": "SFTMix, random split", "mu1": "SFTMix, μ = 1",
        "mixup": "Mixup only"}
SEEDS = [0, 1]
EPOCHS = 2


def run_study(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "study.py"), *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, chat_data, tmp_path_factory):
    """The flags of a toy study: its model, 32 training and 8 held-out conversations, 2 questions."""
    tmp = tmp_path_factory.mktemp("inputs")
    lines = chat_data.read_text().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(lines[:32]))
    (tmp / "heldout.jsonl").write_text("".join(lines[32:]))
    (tmp / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 81, "category": "reasoning", "turns": ["Where did the cat sit?"]},
        {"question_id": 82, "category": "stem", "turns": ["What did the dogs play with?"]}]))
    return ["--model", tiny_model_dir, "--data", tmp / "train.jsonl", "--heldout-data", tmp / "heldout.jsonl",
            "--questions-file", tmp / "questions.jsonl", "--max-len", 64, "--epochs", EPOCHS, "--lr", 1e-3,
            "--global-batch", 8, "--micro-batch", 4, "--dynamics", 2, "--max-new-tokens", 6, "--bootstrap", 200]


@pytest.fixture(scope="module")
def toy(inputs, tmp_path_factory):
    """A part of the study, then the whole: (flags, OUT, the part's results.md, the part's metrics mtimes)."""
    out = tmp_path_factory.mktemp("study") / "out"
    part = run_study("--out", out, *inputs, "--arms", "ntp,sftmix", "--seeds", 0)
    assert part.returncode == 0, part.stderr[-3000:]
    part_report = (out / "results.md").read_text()
    part_mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.jsonl")}
    whole = run_study("--out", out, *inputs, "--seeds", *SEEDS)
    assert whole.returncode == 0, whole.stderr[-3000:]
    return inputs, out, part_report, part_mtimes


def records(out, arm, seed, name):
    return [json.loads(line) for line in (out / "runs" / f"{arm}-s{seed}" / name).read_text().splitlines()]


def heldout_ppls(out, arm, seed):
    return [r["heldout_ppl"] for r in records(out, arm, seed, "metrics.jsonl") if "heldout_ppl" in r]


def spread(out, arm, seed):
    """Population std over the training examples of Conf = -Perp (one checkpoint: the final model)."""
    return statistics.pstdev([-r["perplexities"][0] for r in records(out, arm, seed, "dynamics.jsonl")])


def t_interval(d):
    """mean, and the 95% t interval's half-width: with 2 seeds, t has 1 degree of freedom: the Cauchy distribution."""
    assert len(d) == 2
    return statistics.mean(d), math.tan(math.pi * (0.975 - 0.5)) * statistics.stdev(d) / math.sqrt(len(d))


def table_row(text, *first_cells):
    """The cells of the Markdown table row whose first cells are first_cells."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:len(first_cells)] == list(first_cells):
            return cells
    raise AssertionError(f"no row {first_cells} in\n{text}")


def test_a_part_of_the_study_reports_what_finished_and_what_is_missing(toy):
    _, out, part_report, _ = toy
    assert "Finished: NTP seeds 0; SFTMix seeds 0; SFTMix, random split seeds none;" in part_report
    assert ("Missing from the full study: ntp seeds 1, 2, 3, 4, 5; sftmix seeds 1, 2, 3, 4, 5; random seeds 0, 1, 2, "
            "3, 4, 5; mu1 seeds 0, 1, 2; mixup seeds 0, 1, 2.") in part_report
    d = heldout_ppls(out, "sftmix", 0)[-1] - heldout_ppls(out, "ntp", 0)[-1]
    assert table_row(part_report, "SFTMix − NTP", "last")[2:] == [f"{d:+.3f}", f"0: {d:+.3f}"]
    assert "seeds" not in json.loads((out / "study.json").read_text())  # the part locked nothing in


def test_the_whole_study_continues_from_the_part_without_training_it_again(toy):
    _, out, _, part_mtimes = toy
    assert part_mtimes and {p: p.stat().st_mtime_ns for p in part_mtimes} == part_mtimes
    assert "Missing from the full study: ntp seeds 2, 3, 4, 5;" in (out / "results.md").read_text()


def test_every_arm_and_seed_records_its_epochs_and_keeps_no_weights(toy):
    _, out, _, _ = toy
    n_train = 32
    for arm in ARMS:
        for seed in SEEDS:
            run = out / "runs" / f"{arm}-s{seed}"
            assert len(heldout_ppls(out, arm, seed)) == EPOCHS
            assert len(records(out, arm, seed, "dynamics.jsonl")) == n_train
            assert all(len(r["perplexities"]) == 1 for r in records(out, arm, seed, "dynamics.jsonl"))
            assert not (run / "final").exists() and not (run / "state").exists()
    assert (out / "reference" / "dynamics.jsonl").exists() and not (out / "reference" / "final").exists()


@pytest.mark.parametrize("arm, mu", [("ntp", None), ("sftmix", 0.2), ("random", 0.2), ("mu1", 1.0), ("mixup", 0.0)])
def test_each_arm_trains_with_its_own_loss(toy, arm, mu):
    """The loss each step logged: NTP alone; L_NTP + mu L_Mixup (mu 0.2, 1); L_Mixup alone for Mixup only."""
    _, out, _, _ = toy
    for r in records(out, arm, 0, "metrics.jsonl"):
        if mu is None:
            assert r["mixup_loss"] == 0 and r["loss"] == pytest.approx(r["ntp_loss"])
        else:
            expected = r["mixup_loss"] if arm == "mixup" else r["ntp_loss"] + mu * r["mixup_loss"]
            assert r["mixup_loss"] > 0 and r["loss"] == pytest.approx(expected, rel=1e-5)


def test_random_splits_have_the_sizes_of_the_confidence_split_and_differ_by_seed(toy):
    _, out, _, _ = toy
    split = json.loads((out / "split.json").read_text())
    randoms = [json.loads((out / f"split-random-s{seed}.json").read_text()) for seed in SEEDS]
    for r in randoms:
        assert {h: len(ids) for h, ids in r.items()} == {h: len(ids) for h, ids in split.items()}
        assert sorted(r["confident"] + r["unconfident"]) == sorted(split["confident"] + split["unconfident"])
    assert randoms[0]["confident"] != randoms[1]["confident"]


def test_tables_are_mean_std_and_paired_t_intervals_of_the_runs_metrics(toy):
    _, out, _, _ = toy
    text = (out / "results.md").read_text()
    curves = {arm: [heldout_ppls(out, arm, seed) for seed in SEEDS] for arm in ARMS}
    for arm, name in ARMS.items():
        best, last = [min(c) for c in curves[arm]], [c[-1] for c in curves[arm]]
        assert table_row(text, name, "0, 1")[2:] == [
            ", ".join(str(c.index(min(c)) + 1) for c in curves[arm]),
            f"{statistics.mean(best):.3f} ± {statistics.stdev(best):.3f}",
            f"{statistics.mean(last):.3f} ± {statistics.stdev(last):.3f}"]
    for a, b in study.PAIRS:
        d = [x[-1] - y[-1] for x, y in zip(curves[a], curves[b])]
        mean, half = t_interval(d)
        assert table_row(text, f"{ARMS[a]} − {ARMS[b]}", "last")[2:] == [
            f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]", f"0: {d[0]:+.3f}, 1: {d[1]:+.3f}"]
    seed1 = text[text.index("Seed 1, held-out ppl"):]
    assert table_row(seed1, "2")[1:6] == [f"{curves[arm][1][1]:.4f}" for arm in ARMS]


def test_confidence_spread_is_the_std_of_the_final_models_confidence_against_ntps(toy):
    _, out, _, _ = toy
    text = (out / "results.md").read_text()
    for arm, name in ARMS.items():
        spreads = [spread(out, arm, seed) for seed in SEEDS]
        row = table_row(text, name, f"{statistics.mean(spreads):.3f} ± {statistics.stdev(spreads):.3f}")
        if arm == "ntp":
            assert row[2] == "—"
            continue
        change = [100 * (spread(out, arm, seed) / spread(out, "ntp", seed) - 1) for seed in SEEDS]
        mean, half = t_interval(change)
        assert row[2:] == [f"{mean:+.1f}% [{mean - half:+.1f}%, {mean + half:+.1f}%]",
                           f"0: {change[0]:+.1f}%, 1: {change[1]:+.1f}%"]


def test_base_model_perplexity_is_the_epoch_zero_row(toy):
    _, out, _, _ = toy
    rows = [json.loads(line) for line in (out / "heldout" / "base.jsonl").read_text().splitlines()]
    ppl = math.exp(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows))
    assert table_row((out / "results.md").read_text(), "0 (base model)")[1:6] == [f"{ppl:.4f}"] * 5


def test_bootstrapped_models_are_the_reported_runs_last_epoch(toy):
    """The per-example held-out file of seed 0's NTP and SFTMix (eval.py ppl on final/, before it was deleted) gives
    the ppl that the run itself recorded after its last epoch (train.py --heldout): the bootstrap speaks of the
    tabled models."""
    _, out, _, _ = toy
    for arm in ("ntp", "sftmix"):
        rows = [json.loads(line) for line in (out / "heldout" / f"{arm}.jsonl").read_text().splitlines()]
        ppl = math.exp(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows))
        assert ppl == pytest.approx(heldout_ppls(out, arm, 0)[-1], rel=1e-4)


def test_answers_side_by_side_hold_each_models_answer_under_each_question(toy):
    _, out, _, _ = toy
    text = (out / "answers.md").read_text()
    for name in ("base", "ntp", "sftmix"):
        for line in (out / "answers" / f"{name}.jsonl").read_text().splitlines():
            assert json.loads(line)["choices"][0]["turns"][0] in text
    assert "> Where did the cat sit?" in text and "> What did the dogs play with?" in text
    assert (out / "heldout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_copy_of_the_records_continues_training_nothing_and_report_only_redraws_the_same_table(toy, tmp_path):
    """OUT holds no weights, so a copy of it (a fresh checkout of a committed study) is the whole state."""
    flags, out, _, _ = toy
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "times.tsv").unlink()
    again = run_study("--out", copy, *flags, "--seeds", *SEEDS)
    assert again.returncode == 0, again.stderr[-3000:]
    times = (copy / "times.tsv").read_text().splitlines()
    assert times and all(line.endswith("\tskipped") for line in times)
    table = (copy / "results.md").read_text()
    (copy / "results.md").unlink()
    (copy / "heldout.png").unlink()
    redraw = run_study("--out", copy, "--report-only")
    assert redraw.returncode == 0, redraw.stderr[-3000:]
    assert (copy / "results.md").read_text() == table
    assert (copy / "heldout.png").exists()


def test_report_only_before_any_run_finished_says_so(toy, tmp_path):
    _, out, _, _ = toy
    (tmp_path / "study.json").write_text((out / "study.json").read_text())
    r = run_study("--out", tmp_path, "--report-only")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "No run has finished yet." in (tmp_path / "results.md").read_text()


def test_other_settings_in_the_same_directory_stop_with_one_line(toy):
    flags, out, _, _ = toy
    settings = (out / "study.json").read_text()
    r = run_study("--out", out, *flags, "--lr", 5e-4)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "study.json" in r.stderr and "--lr" in r.stderr and "Traceback" not in r.stderr
    assert (out / "study.json").read_text() == settings


@pytest.mark.parametrize("change, named", [
    (["--epochs", 0], "--epochs"), (["--lr", 0], "--lr"), (["--micro-batch", 3], "--micro-batch"),
    (["--seeds", -1], "--seeds"), (["--arms", "ntp,sftmx"], "sftmx"), (["--dynamics", 0], "--dynamics"),
    (["--dynamics", 9], "--dynamics 9"),  # more checkpoints than the reference epoch's 4 steps
    (["--global-batch", 64], "--global-batch 64"),  # 32 conversations fill no batch of 64
    (["--data", "no/such.jsonl"], "--data"), (["--questions-file", "no/such.jsonl"], "--questions-file"),
    (["--model", "no/such/model"], "config.json")])
def test_bad_flags_and_inputs_stop_with_one_line_before_anything_is_written(inputs, tmp_path, change, named):
    out = tmp_path / "out"
    r = run_study("--out", out, *inputs, *change)
    assert r.returncode == 2 and r.stdout == "", r.stdout + r.stderr
    assert r.stderr.count("\n") == 1 and named in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("df, closed_form", [
    (1, lambda p: math.tan(math.pi * (p - 0.5))),  # Cauchy
    (2, lambda p: (2 * p - 1) / math.sqrt(2 * p * (1 - p))),
    (10_000, lambda p: statistics.NormalDist().inv_cdf(p))])  # the normal limit (t differs by ~1e-4 here)
def test_t_quantile_matches_closed_forms(df, closed_form):
    for p in (0.9, 0.975, 0.995):
        assert study.t_quantile(p, df) == pytest.approx(closed_form(p), rel=1e-3)


def test_bootstrap_std_matches_the_ratio_estimators_standard_error():
    """ppl = exp(sum nll / sum n): by the delta method its std over resamples of N examples is
    ppl * sqrt(sum_i (nll_i - r n_i)^2) / sum_i n_i, r = sum nll / sum n; a model that equals another differs by 0."""
    rng = np.random.default_rng(1)
    n = rng.integers(5, 60, size=400)
    nll = n * rng.uniform(1.0, 3.0, size=400)
    rows = {f"x{i}": {"nll": float(a), "tokens": int(b)} for i, (a, b) in enumerate(zip(nll, n))}
    r = nll.sum() / n.sum()
    se = math.exp(r) * math.sqrt(((nll - r * n) ** 2).sum()) / n.sum()
    noise = study.bootstrap_ppl({"a": rows, "b": rows}, draws=4000)
    assert noise["a"] == pytest.approx(se, rel=0.1)
    assert noise["b − a"] == 0.0
