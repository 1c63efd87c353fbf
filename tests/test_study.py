"""scripts/study.py: its design, its statistics and its report.

In process: the validation/test split; the pairing (NTP on SFTMix's batches and SFTMix of one seed
see the same examples in the same steps and micro-batches, and the first takes NTP's gradient; the
random split draws SFTMix's batch structure); the intervals and spreads against hand computations;
the report from synthetic records of train.py's heldout.jsonl, and from the first design's committed
records (results/study/). As a command, at toy size (a tiny random model, 32 conversations, 2
epochs, seeds 0 and 1): a part of the study, then the whole continuing from it, each table checked
against the runs' own records, recomputed here."""

import itertools
import json
import math
import re
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import stats
from test_train import cli

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import study  # noqa: E402

import data  # noqa: E402
import model as M  # noqa: E402
import sftmix  # noqa: E402
import train  # noqa: E402
from data import InputError  # noqa: E402

ARMS = {
    "ntp": "NTP",
    "ntp_paired": "NTP, SFTMix's batches",
    "sftmix": "SFTMix",
    "random": "SFTMix, random split",
    "mu1": "SFTMix, μ = 1",
    "mixup": "Mixup only",
}
SEEDS = [0, 1]
EPOCHS, MIXUP_EPOCHS, EVERY, VALIDATION = 2, 3, 2, 3


def table_row(text, *first_cells):
    """The cells of the Markdown table row whose first cells are first_cells."""
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[: len(first_cells)] == list(first_cells):
            return cells
    raise AssertionError(f"no row {first_cells} in\n{text}")


def section(text, title):
    """The text from the line that starts with title to the next blank line after its table."""
    return text[text.index(title) :]


def ppl(nll, n):
    return math.exp(sum(nll) / sum(n))


def t_half(values, level=0.95):
    q = stats.t.ppf((1 + level) / 2, len(values) - 1)
    return q * statistics.stdev(values) / math.sqrt(len(values))


def settings(tmp, **change):
    """The settings of a study of the second design, as study.json holds them."""
    s = {k: None for k in study.STUDY_KEYS} | {
        "model": ".assets/SmolLM2-135M-Instruct",
        "train": 64,
        "heldout": 150,
        "validation": VALIDATION,
        "heldout_every": EVERY,
        "max_chars": 400,
        "questions": 3,
        "max_len": 96,
        "epochs": EPOCHS,
        "mixup_epochs": MIXUP_EPOCHS,
        "lr": 2e-4,
        "global_batch": 8,
        "micro_batch": 4,
        "dynamics": 4,
        "max_new_tokens": 8,
        "bootstrap": 400,
        "nproc": 1,
        "shard": "ddp",
        "train_flags": "",
        "design": 2,
    }
    return s | change


# ----------------------------------------------------------------------------- validation and test


def test_validation_is_the_last_conversations_and_test_the_others():
    ids = [f"c{i}" for i in range(10)]
    split = study.validation_split(ids, 3)
    assert split == {"validation": ["c7", "c8", "c9"], "test": [f"c{i}" for i in range(7)]}
    assert not set(split["validation"]) & set(split["test"])
    for bad in (0, 10, 11):
        with pytest.raises(InputError, match="--validation"):
            study.validation_split(ids, bad)


# ----------------------------------------------------------------------------- the pairing


@pytest.fixture(scope="module")
def paired(tiny_model_dir, chat_data, tmp_path_factory):
    """A study directory with a confidence split and random splits of seeds 0 and 1 over
    chat_data's 40 samples: (Study, samples)."""
    out = tmp_path_factory.mktemp("paired")
    tok = data.load_tokenizer(tiny_model_dir)
    samples = data.load_dataset(chat_data, tok, None, 64, verbose=False)[0]
    ids = [s.id for s in samples]
    confidence = np.random.default_rng(0).random(len(ids))
    confident, unconfident = sftmix.split_by_confidence(ids, confidence)
    data.write_json(out / "split.json", {"confident": confident, "unconfident": unconfident})
    for seed in SEEDS:
        c, u = sftmix.random_split(ids, seed)
        data.write_json(out / f"split-random-s{seed}.json", {"confident": c, "unconfident": u})
    s = settings(out, model=str(tiny_model_dir), data=str(chat_data), heldout_data=str(chat_data))
    return study.Study(out, s), samples


def arm_args(st, arm, seed):
    return train.parse_args(st.arm_flags(arm, seed))


def batches(args, samples, epoch):
    halves = train.split_indices(args.split, samples) if args.mode == "sftmix" else None
    return train.epoch_batches(
        len(samples), halves, epoch, args.global_batch, args.seed, args.alpha
    )


@pytest.mark.parametrize("seed", SEEDS)
def test_ntp_on_sftmixs_batches_sees_sftmixs_examples_in_the_same_steps(paired, seed):
    """The same batches, lambdas and micro-batch layout at every step; the same number of steps as
    plain NTP, whose batches differ."""
    st, samples = paired
    p, s, ntp = (arm_args(st, arm, seed) for arm in ("ntp_paired", "sftmix", "ntp"))
    assert (p.mu, p.mixup_only, s.mu) == (0.0, False, 0.2)
    for epoch in range(EPOCHS):
        bp, bs = batches(p, samples, epoch), batches(s, samples, epoch)
        assert len(bp) == len(bs) == len(batches(ntp, samples, epoch)) > 0  # the same schedule
        for (batch_p, lam_p), (batch_s, lam_s) in zip(bp, bs):
            assert batch_p == batch_s and torch.equal(lam_p, lam_s)
            layout_p = sftmix.micro_batches(batch_p, samples, 0, 1, p.micro_batch, lam_p)
            layout_s = sftmix.micro_batches(batch_s, samples, 0, 1, s.micro_batch, lam_s)
            assert [m.rows for m in layout_p[0]] == [m.rows for m in layout_s[0]]
            assert layout_p[1:] == layout_s[1:]  # the normalisers: tokens and mixed positions
    # plain NTP of the same seed shuffles all examples its own way: paired with SFTMix by seed only
    assert [set(b) for b, _ in batches(ntp, samples, 0)] != [
        set(b) for b, _ in batches(s, samples, 0)
    ]


def test_ntp_on_sftmixs_batches_takes_ntps_gradient_on_them(paired, tiny_model_dir):
    """mu = 0: L = L_NTP over the batch's G examples (the pairs' members, unmixed), the gradient of
    train.py's NTP step on the same batch; SFTMix's (mu = 0.2) differs by the Mixup term's."""
    st, samples = paired
    p, s, ntp = (arm_args(st, arm, 0) for arm in ("ntp_paired", "sftmix", "ntp"))
    batch, lam = batches(p, samples, 0)[0]
    model = M.load_pretrained(tiny_model_dir)

    def gradient(args, lam):
        model.zero_grad(set_to_none=True)
        stats_ = train.forward_backward(
            model,
            samples,
            batch,
            lam,
            args.mu,
            args.mixup_only,
            args.micro_batch,
            args.grad_clip,
            torch.device("cpu"),
            None,
            0,
            1,
        )[0]
        return torch.cat([q.grad.flatten() for q in model.parameters()]), stats_

    g_paired, st_paired = gradient(p, lam)
    g_ntp, st_ntp = gradient(ntp, None)
    g_sftmix, _ = gradient(s, lam)
    assert torch.allclose(g_paired, g_ntp, rtol=1e-4, atol=1e-7)
    assert st_paired[0] == pytest.approx(float(st_ntp[1]), rel=1e-5)  # L = L_NTP
    assert st_paired[2] > 0  # the Mixup term is computed, weighted 0
    assert not torch.allclose(g_sftmix, g_ntp, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("seed", SEEDS)
def test_random_split_draws_sftmixs_batch_structure_and_lambdas(paired, seed):
    """Same seed: the random arm's step k holds, at each position, the example at the same place of
    its halves as SFTMix's step k holds of the confidence halves, with the same lambdas: only the
    halves differ."""
    st, samples = paired
    s, r = arm_args(st, "sftmix", seed), arm_args(st, "random", seed)
    hs, hr = train.split_indices(s.split, samples), train.split_indices(r.split, samples)
    place = {i: (h, k) for h, half in enumerate(hs) for k, i in enumerate(half)}  # i: (half, place)
    for epoch in range(EPOCHS):
        for (bs, lam_s), (br, lam_r) in zip(batches(s, samples, epoch), batches(r, samples, epoch)):
            assert [hr[place[i][0]][place[i][1]] for i in bs] == br and torch.equal(lam_s, lam_r)


# ----------------------------------------------------------------------------- statistics by hand


def test_interval_with_the_held_out_noise_adds_its_variance_under_the_seeds_t():
    """Half-width t_{0.975, S-1} sqrt(s^2/S + v): never narrower than the seeds' alone."""
    d, v = [0.30, 0.10, 0.20, 0.45], 0.004
    a = statistics.variance(d) / 4  # the seeds' share: s^2 / S
    mean, half = study.combined_interval(d, v)
    assert mean == pytest.approx(0.2625)
    assert half == pytest.approx(3.182446 * math.sqrt(a + v), rel=1e-5)  # t_{0.975, 3}
    assert half > t_half(d)
    assert study.combined_interval(d, 0.0)[1] == pytest.approx(t_half(d), rel=1e-4)
    # 2 seeds and a held-out variance above the seeds' share: wider than the seeds' alone too
    assert study.combined_interval([-0.6, -0.2], 0.1)[1] > t_half([-0.6, -0.2])


def test_held_out_noise_of_a_difference_is_the_bootstrap_variance_with_each_runs_choice_redone():
    """2 seeds of arms A and B, 2 points, 2 validation and 2 test conversations: every resample of
    the validation conversations (4 ordered draws) and of the test ones (4) is equally likely; in
    each, every run chooses its point on the validation draw and is scored on the test draw. The
    exact variance over the 16 of the seeds' mean A − B is what the shared resamples estimate."""
    val, test = ["v0", "v1"], ["t0", "t1"]
    n = {"v0": 4, "v1": 6, "t0": 5, "t1": 3}
    # summed NLL (point 0, point 1) of each conversation: the validation ones disagree on the best
    runs = {
        ("A", 0): {"v0": (4.0, 2.0), "v1": (3.0, 6.0), "t0": (6.0, 4.0), "t1": (2.0, 3.5)},
        ("A", 1): {"v0": (3.5, 2.5), "v1": (4.0, 5.0), "t0": (5.0, 5.5), "t1": (3.0, 2.0)},
        ("B", 0): {"v0": (2.0, 3.0), "v1": (6.0, 4.5), "t0": (4.0, 6.5), "t1": (1.5, 3.0)},
        ("B", 1): {"v0": (5.0, 3.0), "v1": (2.0, 4.0), "t0": (7.0, 5.0), "t1": (2.5, 2.0)},
    }

    def scored(nll, v_draw, t_draw):
        curve = [ppl([nll[i][p] for i in v_draw], [n[i] for i in v_draw]) for p in (0, 1)]
        best = curve.index(min(curve))
        return ppl([nll[i][best] for i in t_draw], [n[i] for i in t_draw])

    exact = [
        np.mean([scored(runs["A", s], vd, td) - scored(runs["B", s], vd, td) for s in (0, 1)])
        for vd in itertools.product(val, repeat=2)
        for td in itertools.product(test, repeat=2)
    ]
    held = study.HeldOut({"validation": val, "test": test}, draws=40_000)
    curves = {
        arm: {
            s: held.curve([0.5, 1.0], {i: (np.array(runs[arm, s][i]), n[i]) for i in val + test})
            for s in (0, 1)
        }
        for arm in ("A", "B")
    }
    rec = study.Records(curves, {}, [], None, held)
    seeds, d, draws = study.difference(rec, "A", "best", "B", "best")
    assert seeds == [0, 1] and np.var(exact) > 0.01
    assert draws.var() == pytest.approx(np.var(exact), rel=0.05)
    assert d == pytest.approx(
        [scored(runs["A", s], val, test) - scored(runs["B", s], val, test) for s in (0, 1)]
    )


def test_spreads_and_their_log_ratio_interval_against_hand_computations():
    p = [1.0, 1.2, 1.1, 5.0, 1.05, 1.3, 2.0]
    assert study.spread(p, "paper") == pytest.approx(statistics.pstdev([-x for x in p]))
    assert study.spread(p, "log") == pytest.approx(statistics.pstdev([math.log(x) for x in p]))
    q1, _, q3 = statistics.quantiles(p, n=4, method="inclusive")  # linear between order stats
    assert study.spread(p, "iqr") == pytest.approx(q3 - q1)
    ratios = [2.5, 0.8, 1.9]
    logs = [math.log(r) for r in ratios]
    g, lo, hi = study.ratio_interval(ratios)
    assert g == pytest.approx(math.exp(statistics.mean(logs)))
    assert (lo, hi) == pytest.approx(
        (
            math.exp(statistics.mean(logs) - t_half(logs)),
            math.exp(statistics.mean(logs) + t_half(logs)),
        ),
        rel=1e-4,
    )
    assert lo > 0  # a ratio's bound, unlike a t interval on the raw ratios (mean - half < 0 here)
    assert statistics.mean(ratios) - t_half(ratios) < 0


@pytest.mark.parametrize(
    "df, closed_form",
    [
        (1, lambda p: math.tan(math.pi * (p - 0.5))),  # Cauchy
        (2, lambda p: (2 * p - 1) / math.sqrt(2 * p * (1 - p))),
        (10_000, lambda p: statistics.NormalDist().inv_cdf(p)),
    ],
)  # the normal limit (t: ~1e-4 off)
def test_t_quantile_matches_closed_forms(df, closed_form):
    for p in (0.9, 0.975, 0.995):
        assert study.t_quantile(p, df) == pytest.approx(closed_form(p), rel=1e-3)


def test_bootstrap_std_matches_the_ratio_estimators_standard_error():
    """ppl = exp(sum nll / sum n): by the delta method its std over resamples of N examples is
    ppl * sqrt(sum_i (nll_i - r n_i)^2) / sum_i n_i, r = sum nll / sum n; a model that equals
    another differs by 0."""
    rng = np.random.default_rng(1)
    n = rng.integers(5, 60, size=400)
    nll = n * rng.uniform(1.0, 3.0, size=400)
    rows = {f"x{i}": {"nll": float(a), "tokens": int(b)} for i, (a, b) in enumerate(zip(nll, n))}
    r = nll.sum() / n.sum()
    se = math.exp(r) * math.sqrt(((nll - r * n) ** 2).sum()) / n.sum()
    noise = study.bootstrap_ppl({"a": rows, "b": rows}, draws=4000)
    assert noise["a"] == pytest.approx(se, rel=0.1)
    assert noise["b − a"] == 0.0


# ----------------------------------------------------------------------------- the report


def synthetic_study(out, chat_data):
    """OUT of a finished second-design study of NTP and SFTMix at seeds 0 and 1 (4 points: epochs
    0.5 .. 2), 3 validation and 4 test conversations, whose records are heldout.jsonl and
    dynamics.jsonl as train.py writes them. In every run the validation set's best point is not the
    test set's. Returns ({(arm, seed): {id: [(nll, n) at each point]}}, validation, test)."""
    val, test = ["v0", "v1", "v2"], ["t0", "t1", "t2", "t3"]
    rng = np.random.default_rng(5)
    runs = {}
    for arm, seed in itertools.product(("ntp", "sftmix"), SEEDS):
        base = rng.uniform(1.4, 1.8, size=(4, 7))  # (points, conversations) mean NLL per token
        best_val = 1 + (seed + (arm == "sftmix")) % 3  # validation's lowest; test's is point 0
        base[:, :3] += 0.3 * (np.arange(4) != best_val)[:, None]
        base[:, 3:] += 0.3 * (np.arange(4) != 0)[:, None]
        tokens = rng.integers(3, 30, size=7)
        runs[arm, seed] = {
            i: [(float(base[p, j] * tokens[j]), int(tokens[j])) for p in range(4)]
            for j, i in enumerate(val + test)
        }
        run = out / "runs" / f"{arm}-s{seed}"
        run.mkdir(parents=True)
        points = [
            {
                "step": 2 * (p + 1),
                "epoch": (p + 1) / 2,
                "nll": {i: list(v[p]) for i, v in runs[arm, seed].items()},
            }
            for p in range(4)
        ]
        data.write_json(run / "heldout.jsonl", points, lines=True)
        data.write_json(
            run / "dynamics.jsonl",
            [
                {"id": f"x{k}", "perplexities": [float(x)]}
                for k, x in enumerate(rng.uniform(1, 3, size=9))
            ],
            lines=True,
        )
    data.write_json(out / "heldout-split.json", {"validation": val, "test": test})
    data.write_json(
        out / "study.json",
        settings(out, data=str(chat_data), heldout_data=str(chat_data), bootstrap=300),
    )
    return runs, val, test


def test_report_chooses_each_runs_best_point_on_validation_and_scores_it_on_test(
    chat_data, tmp_path
):
    runs, val, test = synthetic_study(tmp_path, chat_data)
    study.write_report(study.Study(tmp_path, study.read_settings(tmp_path / "study.json")))
    text = (tmp_path / "results.md").read_text()

    def curve(arm, seed, ids):
        return [
            ppl([runs[arm, seed][i][p][0] for i in ids], [runs[arm, seed][i][p][1] for i in ids])
            for p in range(4)
        ]

    best = {}
    for arm, name in (("ntp", "NTP"), ("sftmix", "SFTMix")):
        chosen = [int(np.argmin(curve(arm, seed, val))) for seed in SEEDS]
        assert all(c != np.argmin(curve(arm, seed, test)) for seed, c in zip(SEEDS, chosen))
        best[arm] = [curve(arm, seed, test)[c] for seed, c in zip(SEEDS, chosen)]
        last = [curve(arm, seed, test)[-1] for seed in SEEDS]
        assert table_row(text, name, "0, 1")[2:] == [
            ", ".join(f"{(c + 1) / 2:.3g}" for c in chosen),
            f"0 / {sum(c == 3 for c in chosen)} of 2",
            f"{statistics.mean(best[arm]):.3f} ± {statistics.stdev(best[arm]):.3f}",
            f"{statistics.mean(last):.3f} ± {statistics.stdev(last):.3f}",
            "2",
        ]
    d = [x - y for x, y in zip(best["sftmix"], best["ntp"])]
    row = table_row(text, "SFTMix − NTP", "best")
    mean, half = statistics.mean(d), t_half(d)
    assert row[2] == f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"
    lo, hi = (float(x) for x in row[3].split("[")[1].rstrip("]").split(","))
    assert row[3].startswith(f"{mean:+.3f} [") and (lo + hi) / 2 == pytest.approx(mean, abs=1e-3)
    assert row[4:] == [
        f"{sum(x < 0 for x in d)} of 2",
        ", ".join(f"{s}: {x:+.3f}" for s, x in zip(SEEDS, d)),
    ]
    assert "NTP, SFTMix's batches seeds none" in text
    assert "Missing from the full study: ntp seeds 2, 3, 4, 5;" in text


def test_report_only_rebuilds_the_first_designs_numbers_from_its_committed_records(tmp_path):
    """results/study/ (the first design: no heldout.jsonl) gives the write-up's rows, recomputed
    here from its metrics.jsonl, heldout/ and dynamics.jsonl, and says what it cannot give."""
    out = tmp_path / "study"
    shutil.copytree(ROOT / "results" / "study", out)
    study.main(["--out", str(out), "--report-only"])
    text = (out / "results.md").read_text()
    assert "What these records cannot give (the first design)" in text

    def lines(arm, seed, name):
        return [
            json.loads(x) for x in (out / "runs" / f"{arm}-s{seed}" / name).read_text().splitlines()
        ]

    def curve(arm, seed):
        return [r["heldout_ppl"] for r in lines(arm, seed, "metrics.jsonl") if "heldout_ppl" in r]

    d = [min(curve("random", s)) - min(curve("ntp", s)) for s in range(6)]
    mean, half = statistics.mean(d), t_half(d)
    assert table_row(text, "SFTMix, random split − NTP", "best")[2:5] == [
        f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]",
        "—",
        "1 of 6",
    ]
    assert f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]" == "+0.141 [+0.002, +0.281]"
    rise = [curve("sftmix", s)[-1] - min(curve("sftmix", s)) for s in range(6)]
    mean, half = statistics.mean(rise), t_half(rise)
    assert table_row(text, "SFTMix", f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]")[
        2:
    ] == ["—", "6 of 6"]

    # SFTMix − NTP at the last epoch with the held-out noise: its variance by the delta method on
    # seed 0's per-conversation NLLs (the bootstrap's limit), then t over the 6 seeds
    def linear(model):  # d ppl / d (conversation weights): ppl (nll_i - r n_i) / sum n
        rows = [
            json.loads(x) for x in (out / "heldout" / f"{model}.jsonl").read_text().splitlines()
        ]
        nll, n = (
            np.array([r[k] for r in sorted(rows, key=lambda r: r["id"])]) for k in ("nll", "tokens")
        )
        r = nll.sum() / n.sum()
        return math.exp(r) * (nll - r * n) / n.sum()

    v = float(((linear("sftmix") - linear("ntp")) ** 2).sum())
    d = [curve("sftmix", s)[-1] - curve("ntp", s)[-1] for s in range(6)]
    a = statistics.variance(d) / 6
    half = stats.t.ppf(0.975, 5) * math.sqrt(a + v)
    lo, hi = (
        float(x)
        for x in table_row(text, "SFTMix − NTP", "last")[3].split("[")[1].rstrip("]").split(",")
    )
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.05) and half > t_half(d)

    def perplexities(arm, seed):
        return [r["perplexities"][0] for r in lines(arm, seed, "dynamics.jsonl")]

    logs = [
        math.log(
            statistics.pstdev(perplexities("sftmix", s)) / statistics.pstdev(perplexities("ntp", s))
        )
        for s in range(6)
    ]
    m, h = statistics.mean(logs), t_half(logs)
    paper = section(text, "std of Conf = −Perp (the paper's), change:")
    assert table_row(paper, "SFTMix against NTP")[1:3] == [
        f"{100 * (math.exp(m) - 1):+.0f}% [{100 * (math.exp(m - h) - 1):+.0f}%, "
        f"{100 * (math.exp(m + h) - 1):+.0f}%]",
        f"{sum(x > 0 for x in logs)} of 6",
    ]
    times = [line.split("\t") for line in (out / "times.tsv").read_text().splitlines()]
    runs = sorted(
        int(t[1])
        for t in times  # "ARM TITLE, seed S"; "random split, seed S" is a split
        if t[2] == "done"
        and re.fullmatch(r".+, seed \d+", t[0])
        and not t[0].startswith("random split")
    )
    assert f"the 24 training runs, seconds each, sorted: {', '.join(map(str, runs))}." in text


def test_report_only_rebuilds_the_second_designs_committed_report_and_write_up(tmp_path):
    """results/study-2/ (the second design): --report-only gives the committed results.md again, byte
    for byte; its paired differences are recomputed here from the runs' heldout.jsonl at the best
    pass (lowest ppl on the validation ids) and the last, scored on the test ids: the t interval,
    the count, the per-seed values, and the interval with the held-out noise from a bootstrap of
    this test's own (its own resamples of the validation and of the test conversations, the best
    pass chosen again on each); and every row of the write-up's table of paired differences
    (results/study/README.md) is the report's."""
    out = tmp_path / "study-2"
    shutil.copytree(ROOT / "results" / "study-2", out)
    (out / "results.md").unlink()
    study.main(["--out", str(out), "--report-only"])
    text = (out / "results.md").read_text()
    assert text == (ROOT / "results" / "study-2" / "results.md").read_text()

    split, D = json.loads((out / "heldout-split.json").read_text()), 2000
    rng = np.random.default_rng(1)
    weights = {
        k: rng.multinomial(len(ids), [1 / len(ids)] * len(ids), size=D) for k, ids in split.items()
    }

    def at(arm, seed, point):  # (test ppl at the point, the same on each resample (D,))
        passes = [
            json.loads(x)["nll"]
            for x in (out / "runs" / f"{arm}-s{seed}" / "heldout.jsonl").read_text().splitlines()
        ]

        def on(k):  # ppl of each pass on split[k] (P,), and on each resample (P, D)
            nll = np.array([[p[i][0] for i in split[k]] for p in passes])
            n, w = np.array([passes[0][i][1] for i in split[k]]), weights[k]
            return np.exp(nll.sum(1) / n.sum()), np.exp(nll @ w.T / (w @ n))

        (val, val_draws), (test, test_draws) = on("validation"), on("test")
        if point == "last":
            return test[-1], test_draws[-1]
        return test[val.argmin()], test_draws[val_draws.argmin(0), np.arange(D)]

    for (a, b), point in itertools.product(study.PAIRS, ("best", "last")):
        seeds = [s for s in range(6) if all((out / "runs" / f"{x}-s{s}").exists() for x in (a, b))]
        va, vb = [at(a, s, point) for s in seeds], [at(b, s, point) for s in seeds]
        d = [x[0] - y[0] for x, y in zip(va, vb)]
        v = np.mean([x[1] - y[1] for x, y in zip(va, vb)], axis=0).var(ddof=1)
        mean, half = statistics.mean(d), t_half(d)
        noisy = stats.t.ppf(0.975, len(d) - 1) * math.sqrt(statistics.variance(d) / len(d) + v)
        row = table_row(text, f"{ARMS[a]} − {ARMS[b]}", point)
        lo, hi = (float(x) for x in row[3].split("[")[1].rstrip("]").split(","))
        assert row[2] == f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]", row
        assert row[3].startswith(f"{mean:+.3f} ["), row
        assert (hi - lo) / 2 == pytest.approx(noisy, rel=0.05), row
        assert row[4:] == [
            f"{sum(x < 0 for x in d)} of {len(d)}",
            ", ".join(f"{s}: {x:+.3f}" for s, x in zip(seeds, d)),
        ]

    names = {
        "NTP on SFTMix's batches": "NTP, SFTMix's batches",
        "random split": "SFTMix, random split",
        "μ = 1": "SFTMix, μ = 1",
    }
    write_up = (ROOT / "results" / "study" / "README.md").read_text()
    table = section(write_up, "| a − b | at |").split("\n\n")[0].splitlines()[2:]
    assert len(table) == 14
    for line in table:
        cells = [c.strip().replace("−", "-") for c in line.strip("|").split("|")]
        a, b = (names.get(x, x) for x in cells[0].split(" - "))
        report = table_row(text, f"{a} − {b}", cells[1])
        assert [report[2], report[3], report[4]] == cells[2:5], line


@pytest.mark.parametrize(
    "content, named",
    [
        ('{"model": ".assets/Smol', "unreadable"),
        ('{"model": "m"}', "'data'"),
        ("[1, 2]", "JSON object"),
    ],
)
def test_cut_or_incomplete_study_json_is_one_line(tmp_path, capsys, content, named):
    (tmp_path / "study.json").write_text(content)
    with pytest.raises(SystemExit) as e:
        study.main(["--out", str(tmp_path), "--report-only"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "study.json" in err and named in err, err


def test_train_flags_reach_every_run_and_the_studys_own_are_refused(tiny_model_dir, tmp_path):
    base = ["--out", str(tmp_path), "--model", str(tiny_model_dir)]
    s = study.settings_of(study.parse_args(base + ["--train-flags", "--compile --save-every 50"]))
    st = study.Study(tmp_path, s)
    for argv in [st.reference_flags()] + [st.arm_flags(arm, 0) for arm in study.ARMS]:
        assert argv[-3:] == ["--compile", "--save-every", "50"]
    with pytest.raises(InputError, match="--train-flags: --lr is set by the study"):
        study.settings_of(study.parse_args(base + ["--train-flags", "--lr 1e-3"]))
    with pytest.raises(InputError, match="no-such-flag"):
        study.parse_train_args(st.reference_flags() + ["--no-such-flag"], 1)


# ----------------------------------------------------------------------------- the command


def run_study(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "study.py"), *map(str, args)],
        capture_output=True,
        text=True,
    )


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, chat_data, tmp_path_factory):
    """The flags of a toy study: its model, 32 training and 8 held-out conversations (3
    validation), 2 questions."""
    tmp = tmp_path_factory.mktemp("inputs")
    lines = chat_data.read_text().splitlines(keepends=True)
    (tmp / "train.jsonl").write_text("".join(lines[:32]))
    (tmp / "heldout.jsonl").write_text("".join(lines[32:]))
    (tmp / "questions.jsonl").write_text(
        "".join(
            json.dumps(q) + "\n"
            for q in [
                {"question_id": 81, "category": "reasoning", "turns": ["Where did the cat sit?"]},
                {"question_id": 82, "category": "stem", "turns": ["What did the dogs play with?"]},
            ]
        )
    )
    return cli(
        model=tiny_model_dir,
        data=tmp / "train.jsonl",
        heldout_data=tmp / "heldout.jsonl",
        questions_file=tmp / "questions.jsonl",
        max_len=64,
        epochs=EPOCHS,
        lr=1e-3,
        global_batch=8,
        micro_batch=4,
        dynamics=2,
        max_new_tokens=6,
        bootstrap=200,
        validation=VALIDATION,
        heldout_every=EVERY,
        mixup_epochs=MIXUP_EPOCHS,
    )


@pytest.fixture(scope="module")
def toy(inputs, tmp_path_factory):
    """A part of the study, then the whole: (flags, OUT, the part's results.md, the part's record
    mtimes)."""
    out = tmp_path_factory.mktemp("study") / "out"
    part = run_study("--out", out, *inputs, "--arms", "ntp,sftmix", "--seeds", 0)
    assert part.returncode == 0, part.stderr[-3000:]
    part_report = (out / "results.md").read_text()
    part_mtimes = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/heldout.jsonl")}
    whole = run_study("--out", out, *inputs, "--seeds", *SEEDS)
    assert whole.returncode == 0, whole.stderr[-3000:]
    return inputs, out, part_report, part_mtimes


def records(out, arm, seed, name):
    path = out / "runs" / f"{arm}-s{seed}" / name
    return [json.loads(line) for line in path.read_text().splitlines()]


def run_curves(out, arm, seed, ids):
    """(epochs, ppl over ids at each point) from the run's heldout.jsonl."""
    points = records(out, arm, seed, "heldout.jsonl")
    return [p["epoch"] for p in points], [
        ppl([p["nll"][i][0] for i in ids], [p["nll"][i][1] for i in ids]) for p in points
    ]


def heldout_split(out):
    return json.loads((out / "heldout-split.json").read_text())


def test_the_held_out_split_is_the_last_validation_conversations_of_the_file(toy, inputs):
    _, out, _, _ = toy
    path = Path(inputs[inputs.index("--heldout-data") + 1])
    ids = [json.loads(line)["id"] for line in path.read_text().splitlines()]
    assert heldout_split(out) == {"validation": ids[-VALIDATION:], "test": ids[:-VALIDATION]}


def test_a_part_of_the_study_reports_what_finished_and_what_is_missing(toy):
    _, out, part_report, _ = toy
    assert "Finished: NTP seeds 0; NTP, SFTMix's batches seeds none; SFTMix seeds 0;" in part_report
    assert (
        "Missing from the full study: ntp seeds 1, 2, 3, 4, 5; ntp_paired seeds 0, 1, 2, 3, 4, "
        "5; sftmix seeds 1, 2, 3, 4, 5; random seeds 0, 1, 2, 3, 4, 5; mu1 seeds 0, 1, 2; "
        "mixup seeds 0, 1, 2."
    ) in part_report
    test = heldout_split(out)["test"]
    d = run_curves(out, "sftmix", 0, test)[1][-1] - run_curves(out, "ntp", 0, test)[1][-1]
    assert table_row(part_report, "SFTMix − NTP", "last")[2:] == [
        f"{d:+.3f}",
        "—",
        f"{int(d < 0)} of 1",
        f"0: {d:+.3f}",
    ]
    assert "seeds" not in json.loads((out / "study.json").read_text())  # the part locked nothing in


def test_the_whole_study_continues_from_the_part_without_training_it_again(toy):
    _, out, _, part_mtimes = toy
    assert part_mtimes and {p: p.stat().st_mtime_ns for p in part_mtimes} == part_mtimes
    assert "Missing from the full study: ntp seeds 2, 3, 4, 5;" in (out / "results.md").read_text()


def test_every_arm_and_seed_records_its_grid_and_keeps_no_weights(toy):
    """A held-out pass every EVERY steps and at each epoch end (4 steps an epoch here), Mixup only
    over its own epochs; every held-out conversation at every point."""
    _, out, _, _ = toy
    ids = set(heldout_split(out)["validation"] + heldout_split(out)["test"])
    for arm in ARMS:
        epochs = MIXUP_EPOCHS if arm == "mixup" else EPOCHS
        for seed in SEEDS:
            run = out / "runs" / f"{arm}-s{seed}"
            points = records(out, arm, seed, "heldout.jsonl")
            assert [p["epoch"] for p in points] == [k / 2 for k in range(1, 2 * epochs + 1)]
            assert all(set(p["nll"]) == ids for p in points)
            assert len(records(out, arm, seed, "dynamics.jsonl")) == 32
            assert not (run / "final").exists() and not (run / "state").exists()
    assert (out / "reference" / "dynamics.jsonl").exists()
    assert not (out / "reference" / "final").exists()


@pytest.mark.parametrize(
    "arm, mu",
    [
        ("ntp", None),
        ("ntp_paired", 0.0),
        ("sftmix", 0.2),
        ("random", 0.2),
        ("mu1", 1.0),
        ("mixup", None),
    ],
)
def test_each_arm_trains_with_its_own_loss(toy, arm, mu):
    """The loss each step logged: NTP alone; L_NTP + mu L_Mixup (mu 0 on SFTMix's batches, 0.2,
    1); L_Mixup alone for Mixup only."""
    _, out, _, _ = toy
    for r in records(out, arm, 0, "metrics.jsonl"):
        if arm == "ntp":
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
        assert sorted(r["confident"] + r["unconfident"]) == sorted(
            split["confident"] + split["unconfident"]
        )
    assert randoms[0]["confident"] != randoms[1]["confident"]


def test_tables_are_the_test_ppl_at_the_validation_best_and_paired_t_intervals(toy):
    _, out, _, _ = toy
    text = (out / "results.md").read_text()
    val, test = heldout_split(out)["validation"], heldout_split(out)["test"]
    best, last = {}, {}
    for arm, name in ARMS.items():
        chosen = [int(np.argmin(run_curves(out, arm, seed, val)[1])) for seed in SEEDS]
        epochs = run_curves(out, arm, 0, test)[0]
        best[arm] = [run_curves(out, arm, seed, test)[1][c] for seed, c in zip(SEEDS, chosen)]
        last[arm] = [run_curves(out, arm, seed, test)[1][-1] for seed in SEEDS]
        row = table_row(text, name, "0, 1")
        assert row[2] == ", ".join(f"{epochs[c]:.3g}" for c in chosen)
        assert row[4:6] == [
            f"{statistics.mean(best[arm]):.3f} ± {statistics.stdev(best[arm]):.3f}",
            f"{statistics.mean(last[arm]):.3f} ± {statistics.stdev(last[arm]):.3f}",
        ]
    for a, b in study.PAIRS:
        for at, values in (("best", best), ("last", last)):
            d = [x - y for x, y in zip(values[a], values[b])]
            cauchy = math.tan(math.pi * 0.475)  # t with 1 degree of freedom, 97.5%
            mean, half = statistics.mean(d), cauchy * statistics.stdev(d) / math.sqrt(2)
            assert (
                table_row(text, f"{ARMS[a]} − {ARMS[b]}", at)[2]
                == f"{mean:+.3f} [{mean - half:+.3f}, {mean + half:+.3f}]"
            )


def test_confidence_spread_tables_hold_the_three_measures_against_ntps(toy):
    _, out, _, _ = toy
    text = (out / "results.md").read_text()

    def perplexities(arm, seed):
        return [r["perplexities"][0] for r in records(out, arm, seed, "dynamics.jsonl")]

    for measure, title, f in (
        ("paper", "std of Conf = −Perp (the paper's)", statistics.pstdev),
        ("log", "std of log Perp", lambda p: statistics.pstdev([math.log(x) for x in p])),
    ):
        values = section(text, f"{title}, mean ± std over seeds:")
        changes = section(text, f"{title}, change:")
        for arm, name in ARMS.items():
            s = [f(perplexities(arm, seed)) for seed in SEEDS]
            assert (
                table_row(values, name)[1]
                == f"{statistics.mean(s):.3f} ± {statistics.stdev(s):.3f}"
            )
        logs = [
            math.log(f(perplexities("sftmix", seed)) / f(perplexities("ntp", seed)))
            for seed in SEEDS
        ]
        m, h = statistics.mean(logs), math.tan(math.pi * 0.475) * statistics.stdev(logs) / 2**0.5
        assert table_row(changes, "SFTMix against NTP")[1] == (
            f"{100 * (math.exp(m) - 1):+.0f}% [{100 * (math.exp(m - h) - 1):+.0f}%, "
            f"{100 * (math.exp(m + h) - 1):+.0f}%]"
        )


def test_base_model_perplexity_is_the_epoch_zero_row(toy):
    _, out, _, _ = toy
    test = set(heldout_split(out)["test"])
    rows = [json.loads(line) for line in (out / "heldout" / "base.jsonl").read_text().splitlines()]
    value = ppl(
        [r["nll"] for r in rows if r["id"] in test], [r["tokens"] for r in rows if r["id"] in test]
    )
    row = table_row((out / "results.md").read_text(), "0 (base model)")
    assert row[1:7] == [f"{value:.4f}"] * 6


def test_the_held_out_records_agree_with_the_ppl_train_py_logs_at_epoch_ends(toy):
    """heldout.jsonl's per-conversation NLLs, summed over all held-out conversations, give the ppl
    that metrics.jsonl records after each epoch: the study scores the models train.py evaluated."""
    _, out, _, _ = toy
    points = {p["epoch"]: p for p in records(out, "sftmix", 1, "heldout.jsonl")}
    for r in records(out, "sftmix", 1, "metrics.jsonl"):
        if "heldout_ppl" in r:
            nll = points[r["step"] / 4]["nll"].values()
            assert ppl([x[0] for x in nll], [x[1] for x in nll]) == pytest.approx(
                r["heldout_ppl"], rel=1e-6
            )


def test_answers_side_by_side_hold_each_models_answer_under_each_question(toy):
    """Under each question, each model's answer after its title, in order; an answer may be empty
    (the tiny base model's can be), but not every one is."""
    _, out, _, _ = toy
    text = (out / "answers.md").read_text() + "\n"
    titles = {"base": "Base model", "ntp": "NTP", "sftmix": "SFTMix"}
    answers = {
        name: {
            r["question_id"]: r["choices"][0]["turns"][0]
            for r in map(json.loads, (out / "answers" / f"{name}.jsonl").read_text().splitlines())
        }
        for name in titles
    }
    assert any(a for by_question in answers.values() for a in by_question.values()), answers
    for question, turn in ((81, "Where did the cat sit?"), (82, "What did the dogs play with?")):
        under = "".join(f"**{t}**\n\n{answers[name][question]}\n\n" for name, t in titles.items())
        assert f"> {turn}\n\n{under}" in text, (under, text)
    assert (out / "heldout.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_copy_of_the_records_continues_training_nothing_and_report_only_redraws_the_same_table(
    toy, tmp_path
):
    """OUT holds no weights, so a copy of it (a fresh checkout of a committed study) is the whole
    state.
    """
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
    for name in ("study.json", "heldout-split.json"):
        (tmp_path / name).write_text((out / name).read_text())
    r = run_study("--out", tmp_path, "--report-only")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "No run has finished yet." in (tmp_path / "results.md").read_text()


def test_other_settings_in_the_same_directory_stop_with_one_line(toy, tmp_path):
    flags, out, _, _ = toy
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    settings_ = (copy / "study.json").read_text()
    r = run_study("--out", copy, *flags, "--lr", 5e-4)
    assert r.returncode == 2
    assert (
        r.stderr.count("\n") == 1
        and "study.json" in r.stderr
        and "--lr" in r.stderr
        and "Traceback" not in r.stderr
    )
    assert (copy / "study.json").read_text() == settings_


@pytest.mark.parametrize(
    "change, named",
    [
        (["--epochs", 0], "--epochs"),
        (["--lr", 0], "--lr"),
        (["--micro-batch", 3], "--micro-batch"),
        (["--seeds", -1], "--seeds"),
        (["--arms", "ntp,sftmx"], "sftmx"),
        (["--dynamics", 0], "--dynamics"),
        (["--dynamics", 9], "--dynamics 9"),  # more checkpoints than the reference epoch's 4 steps
        (["--global-batch", 64], "--global-batch 64"),  # 32 conversations fill no batch of 64
        (["--validation", 8], "--validation 8"),  # all 8 held-out conversations: no test set left
        (["--heldout-every", -1], "--heldout-every"),
        (["--mixup-epochs", 0], "--mixup-epochs"),
        (["--train-flags", "--seed 3"], "--seed"),
        (["--train-flags", "--no-such-flag"], "--no-such-flag"),
        (["--data", "no/such.jsonl"], "--data"),
        (["--questions-file", "no/such.jsonl"], "--questions-file"),
        (["--model", "no/such/model"], "config.json"),
    ],
)
def test_bad_flags_and_inputs_stop_with_one_line_before_anything_is_written(
    inputs, tmp_path, change, named, capsys
):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_:
        study.main([str(a) for a in ["--out", out, *inputs, *change]])
    r = capsys.readouterr()
    assert exit_.value.code == 2 and r.out == "", r.out + r.err
    assert r.err.count("\n") == 1 and named in r.err, r.err
    assert not out.exists() or not any(out.iterdir())
