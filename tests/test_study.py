"""scripts/study.py at toy size (a tiny random model, 32 conversations, 1 epoch, 2 seeds): it runs end to end,
its table is the statistics of the runs' own metrics.jsonl, a second invocation trains nothing, --report-only
redraws the same table, and its t quantile and bootstrap agree with closed forms."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import study  # noqa: E402

ARMS = {"ntp": "NTP", "sftmix": "SFTMix", "random": "SFTMix, random split"}
SEEDS = [0, 1]


def run_study(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "study.py"), *map(str, args)],
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def toy(tiny_model_dir, chat_data, tmp_path_factory):
    """The study run once at toy size: (its flags, its directory, the first invocation's result)."""
    tmp = tmp_path_factory.mktemp("study")
    lines = chat_data.read_text().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(lines[:32]))
    (tmp / "heldout.jsonl").write_text("".join(lines[32:]))
    (tmp / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in [
        {"question_id": 81, "category": "reasoning", "turns": ["Where did the cat sit?"]},
        {"question_id": 82, "category": "stem", "turns": ["What did the dogs play with?"]}]))
    flags = ["--model", tiny_model_dir, "--data", tmp / "train.jsonl", "--heldout-data", tmp / "heldout.jsonl",
             "--questions-file", tmp / "questions.jsonl", "--max-len", 64, "--epochs", 1, "--lr", 1e-3,
             "--global-batch", 8, "--micro-batch", 4, "--seeds", *SEEDS, "--dynamics", 2, "--max-new-tokens", 6,
             "--bootstrap", 200]
    out = tmp / "out"
    first = run_study("--out", out, *flags)
    assert first.returncode == 0, first.stderr[-3000:]
    return flags, out, first


def heldout_ppls(run: Path):
    return [json.loads(line)["heldout_ppl"] for line in (run / "metrics.jsonl").read_text().splitlines()
            if "heldout_ppl" in json.loads(line)]


def table_row(text, *first_cells):
    """The cells of the Markdown table row whose first cells are first_cells."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[:len(first_cells)] == list(first_cells):
            return cells
    raise AssertionError(f"no row {first_cells} in\n{text}")


def test_every_arm_and_seed_trains_one_epoch_with_a_heldout_perplexity(toy):
    _, out, _ = toy
    for arm in ARMS:
        for seed in SEEDS:
            assert len(heldout_ppls(out / "runs" / f"{arm}-s{seed}")) == 1
            assert (out / "runs" / f"{arm}-s{seed}" / "final" / "config.json").exists()
    assert (out / "reference" / "dynamics.jsonl").exists()


def test_random_splits_have_the_sizes_of_the_confidence_split_and_differ_by_seed(toy):
    _, out, _ = toy
    split = json.loads((out / "split.json").read_text())
    randoms = [json.loads((out / f"split-random-s{seed}.json").read_text()) for seed in SEEDS]
    for r in randoms:
        assert {h: len(ids) for h, ids in r.items()} == {h: len(ids) for h, ids in split.items()}
        assert sorted(r["confident"] + r["unconfident"]) == sorted(split["confident"] + split["unconfident"])
    assert randoms[0]["confident"] != randoms[1]["confident"]


def test_table_is_mean_std_and_paired_t_interval_of_the_runs_metrics(toy):
    _, out, _ = toy
    text = (out / "results.md").read_text()
    last = {arm: [heldout_ppls(out / "runs" / f"{arm}-s{seed}")[-1] for seed in SEEDS] for arm in ARMS}
    for arm, name in ARMS.items():
        # one epoch: the best epoch is the last
        expected = f"{statistics.mean(last[arm]):.3f} ± {statistics.stdev(last[arm]):.3f}"
        assert table_row(text, name)[2:] == [expected, expected]
    t = math.tan(math.pi * (0.975 - 0.5))  # Student's t with 1 degree of freedom is the Cauchy distribution
    for a, b in (("sftmix", "ntp"), ("random", "ntp"), ("sftmix", "random")):
        d = [x - y for x, y in zip(last[a], last[b])]
        mean, half = statistics.mean(d), t * statistics.stdev(d) / math.sqrt(len(d))
        row = table_row(text, f"{ARMS[a]} − {ARMS[b]}", "last")
        assert row[2:] == [f"{x:+.3f}" for x in d] + [f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"]


def test_base_model_perplexity_is_the_epoch_zero_row(toy):
    _, out, _ = toy
    rows = [json.loads(line) for line in (out / "heldout" / "base.jsonl").read_text().splitlines()]
    ppl = math.exp(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows))
    assert table_row((out / "results.md").read_text(), "0 (base model)")[1:] == [f"{ppl:.3f}"] * 3


def test_bootstrapped_models_are_the_reported_runs_last_epoch(toy):
    """The per-example held-out file of seed 0's NTP and SFTMix (eval.py ppl on final/) gives the ppl that the
    run itself recorded after its last epoch (train.py --heldout): the bootstrap speaks of the tabled models."""
    _, out, _ = toy
    for arm in ("ntp", "sftmix"):
        rows = [json.loads(line) for line in (out / "heldout" / f"{arm}.jsonl").read_text().splitlines()]
        ppl = math.exp(sum(r["nll"] for r in rows) / sum(r["tokens"] for r in rows))
        assert ppl == pytest.approx(heldout_ppls(out / "runs" / f"{arm}-s0")[-1], rel=1e-4)


def test_answers_side_by_side_hold_each_models_answer_under_each_question(toy):
    _, out, _ = toy
    text = (out / "answers.md").read_text()
    for name in ("base", "ntp", "sftmix"):
        for line in (out / "answers" / f"{name}.jsonl").read_text().splitlines():
            answer = json.loads(line)["choices"][0]["turns"][0]
            assert answer in text
    assert "> Where did the cat sit?" in text and "> What did the dogs play with?" in text
    assert (out / "heldout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_second_invocation_trains_nothing_and_report_only_redraws_the_same_table(toy):
    flags, out, _ = toy
    finals = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/final/model.safetensors")}
    table = (out / "results.md").read_text()
    lines_before = len((out / "times.tsv").read_text().splitlines())
    again = run_study("--out", out, *flags)
    assert again.returncode == 0, again.stderr[-3000:]
    new = (out / "times.tsv").read_text().splitlines()[lines_before:]
    assert new and all(line.endswith("\tskipped") for line in new)
    assert {p: p.stat().st_mtime_ns for p in finals} == finals
    (out / "results.md").unlink()
    (out / "heldout.png").unlink()
    redraw = run_study("--out", out, "--report-only")
    assert redraw.returncode == 0, redraw.stderr[-3000:]
    assert (out / "results.md").read_text() == table
    assert (out / "heldout.png").exists()


def test_other_settings_in_the_same_directory_stop_with_one_line(toy):
    flags, out, _ = toy
    settings = (out / "study.json").read_text()
    r = run_study("--out", out, *flags, "--lr", 5e-4)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and "study.json" in r.stderr and "--lr" in r.stderr and "Traceback" not in r.stderr
    assert (out / "study.json").read_text() == settings


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
