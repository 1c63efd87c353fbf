"""scripts/report.py: compare's table against eval.py's own commands and transformers, dynamics'
against a hand computation, the data map and the training curves read back from the figures
matplotlib saved against the numbers they were drawn from; an unwritable --out or a flag out of
range is one line before any work."""

import json
import math
import statistics
import sys
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest
from safetensors.torch import load_file, save_file
from test_eval import (  # noqa: F401  (fixtures)
    CONVERSATIONS,
    MC,
    E,
    accuracies,
    check_unwritable_out,
    hf,
    hf_scored,
    medmcqa,
    response_nll,
    run_eval,
    run_main,
    table_cells,
    write_dynamics,
    write_jsonl,
    write_ori_pqal,
)
from test_train import cli

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import report  # noqa: E402


def run_report(*argv):
    """`python scripts/report.py ARGV` in this process: (exit code, stdout, stderr)."""
    return run_main(report.main, *argv)


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved during the test, kept for inspection after the code closes it."""
    figures, real = [], matplotlib.figure.Figure.savefig

    def recording(fig, *args, **kwargs):
        figures.append(fig)
        return real(fig, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", recording)
    return figures


def test_datamap_writes_a_png(tmp_path):
    dynamics = write_dynamics(tmp_path / "dynamics.jsonl")
    code, _, err = run_report("datamap", "--dynamics", dynamics, "--out", tmp_path / "map.png")
    assert code == 0, err
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "map.png").stat().st_size > 1000
    (tmp_path / "split.json").write_text(
        json.dumps(
            {
                "confident": [f"ex{i}" for i in range(12)],
                "unconfident": [f"ex{i}" for i in range(12, 24)],
            }
        )
    )
    code, _, err = run_report(
        "datamap",
        *cli(dynamics=dynamics, split=tmp_path / "split.json", out=tmp_path / "split_map.png"),
    )
    assert code == 0, err
    assert (tmp_path / "split_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_datamap_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, _, err = run_report(
        "datamap", "--dynamics", write_dynamics(tmp_path / "d.jsonl"), "--out", tmp_path / "m.png"
    )
    assert (code, err) == (2, "error: datamap needs matplotlib: pip install matplotlib\n")
    assert not (tmp_path / "m.png").exists()


def test_datamap_shows_every_point_inside_the_frame_and_spreads_the_bulk(tmp_path, saved_figures):
    rng = np.random.default_rng(0)  # heavy-tailed: a log-normal bulk, a tail, two extreme outliers
    perplexities = [
        list(1 + np.exp(rng.normal(1.2, 0.6)) * np.exp(rng.normal(0, 0.05, 4))) for _ in range(300)
    ]
    perplexities += [
        list(1 + np.exp(rng.uniform(3, 6)) * np.exp(rng.normal(0, 0.1, 4))) for _ in range(20)
    ]
    perplexities += [[6211.0, 5000.0, 7000.0, 8000.0], [1.0, 1.0, 1.0, 1.0]]
    dynamics = write_jsonl(
        tmp_path / "dynamics.jsonl",
        [{"id": f"ex{i}", "perplexities": p} for i, p in enumerate(perplexities)],
    )
    code, _, err = run_report(
        "datamap", "--dynamics", dynamics, "--out", tmp_path / "maps" / "map.png"
    )
    assert code == 0, err
    assert (tmp_path / "maps" / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = saved_figures[0].axes[0]
    # (N, 2) data coordinates
    drawn = np.concatenate([np.asarray(c.get_offsets()) for c in ax.collections])
    # (variability, -confidence)
    hand = [(statistics.pstdev(p), statistics.fmean(p)) for p in perplexities]
    np.testing.assert_allclose(np.sort(drawn, axis=0), np.sort(np.array(hand), axis=0), rtol=1e-9)
    points, frame = ax.transData.transform(drawn), ax.get_window_extent()  # display pixels
    assert ((points[:, 0] > frame.x0) & (points[:, 0] < frame.x1)).all()
    assert ((points[:, 1] > frame.y0) & (points[:, 1] < frame.y1)).all()
    # linear axes would squeeze this into < 1%
    for axis, size in ((0, frame.width), (1, frame.height)):
        low, high = np.percentile(points[:, axis], [10, 90])
        assert high - low > 0.1 * size
    assert "confidence" in ax.get_ylabel() and "variability" in ax.get_xlabel()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    # confidences: minus the mean perplexity
    assert labels and all(t.startswith("−") for t in labels)


def write_metrics(run, mixup):
    """A run's metrics.jsonl, 30 steps; a held-out perplexity at steps 15 and 30 (the ends of two
    epochs).
    """
    run.mkdir(parents=True)
    records = [
        {
            "step": s,
            "epoch": (s - 1) // 15,
            "lr": 1e-5 * min(s / 3, 1) * (31 - s) / 30,
            "loss": 0.0,
            "ntp_loss": 3 - s / 20 + (s % 3) / 10,
            "mixup_loss": (4 - s / 25) * mixup,
            "grad_norm": 1.0,
            "tokens_per_s": 100.0,
        }
        | (
            {"heldout_nll": 1 - s / 100, "heldout_ppl": math.exp(1 - s / 100) + mixup}
            if s % 15 == 0
            else {}
        )
        for s in range(1, 31)
    ]
    write_jsonl(run / "metrics.jsonl", records)
    return records


def test_curves_draws_one_line_per_run_in_each_panel_from_the_metrics(tmp_path, saved_figures):
    records = {
        "ntp": write_metrics(tmp_path / "ntp", mixup=0),
        "sftmix": write_metrics(tmp_path / "sftmix", mixup=1),
    }
    out = tmp_path / "plots" / "curves.png"
    code, _, err = run_report("curves", tmp_path / "ntp", tmp_path / "sftmix", "--out", out)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = {ax.get_title(): ax for ax in saved_figures[0].axes if ax.get_title()}
    assert set(panels) == {
        "NTP loss",
        "Mixup loss",
        "learning rate",
        "held-out perplexity (per epoch)",
    }
    for title, key in (
        ("NTP loss", "ntp_loss"),
        ("Mixup loss", "mixup_loss"),
        ("learning rate", "lr"),
        ("held-out perplexity (per epoch)", "heldout_ppl"),
    ):
        # an NTP run has no Mixup loss
        runs = ["sftmix"] if key == "mixup_loss" else ["ntp", "sftmix"]
        lines = panels[title].get_lines()
        labelled = [line for line in lines if not line.get_label().startswith("_")]
        assert [line.get_label() for line in labelled] == runs, title
        for run in runs:
            steps, values = zip(*[(r["step"], r[key]) for r in records[run] if key in r])
            assert any(
                list(line.get_xdata()) == list(steps) and list(line.get_ydata()) == list(values)
                # the raw values (a loss is also drawn smoothed)
                for line in lines
            ), (title, run)


COMMANDS = {  # every command; its other inputs do not exist, so an error about --out came first
    "compare": ["compare", "nope", "--data", "nope.jsonl"],
    "dynamics": ["dynamics", "nope.jsonl"],
    "datamap": ["datamap", "--dynamics", "nope.jsonl"],
    "curves": ["curves", "nope"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_an_out_that_cannot_be_written_is_one_line_before_any_work(command, where, tmp_path):
    check_unwritable_out(run_report, COMMANDS[command], where, tmp_path)


def test_a_numeric_flag_out_of_range_is_one_line_before_any_work(tmp_path):
    code, _, err = run_report(*COMMANDS["compare"], "--max-len", 1, "--out", tmp_path / "table.md")
    assert (code, err) == (2, "error: --max-len: expected >= 2, got 1\n")
    assert not (tmp_path / "table.md").exists()


def test_compare_reports_each_benchmark_and_their_mean_as_mc_does(tiny_model_dir, tmp_path):
    files = {
        "MedMCQA": write_jsonl(tmp_path / "dev.json", medmcqa(1)),
        "PubMedQA": write_ori_pqal(tmp_path / "ori_pqal.json"),
    }
    code, table, err = run_report(
        "compare",
        tiny_model_dir,
        tiny_model_dir,
        "--names",
        "A",
        "B",
        *(a for name, f in files.items() for a in ("--mc", f"{name}={f}")),
    )
    assert code == 0, err
    cells = table_cells(table)
    assert set(cells) == {f"{b} accuracy, {k} ↑" for b in files for k in E.SCORES} | {
        f"mean of MedMCQA, PubMedQA, {k} ↑" for k in E.SCORES
    }
    for name, file in files.items():  # the second code path: mc on each file alone
        code, out, err = run_eval("mc", "--model", tiny_model_dir, "--data", file)
        assert code == 0, err
        for kind, accuracy in accuracies(out).items():
            assert cells[f"{name} accuracy, {kind} ↑"][:2] == [accuracy, accuracy]
    for kind in E.SCORES:
        mean = (
            cells[f"MedMCQA accuracy, {kind} ↑"][0] + cells[f"PubMedQA accuracy, {kind} ↑"][0]
        ) / 2
        assert cells[f"mean of MedMCQA, PubMedQA, {kind} ↑"][0] == pytest.approx(mean, abs=1e-4)


def test_compare_puts_runs_side_by_side_with_difference_and_ratio(smollm2_dir, hf_scored, tmp_path):  # noqa: F811
    # a run directory; its model's logits are 0.8 times the first's
    run_b = tmp_path / "sftmix_run" / "final"
    run_b.mkdir(parents=True)
    state = load_file(smollm2_dir / "model.safetensors")
    # logits = W (0.8 w * x / rms(x)), W linear
    state["model.norm.weight"] = state["model.norm.weight"] * 0.8
    save_file(state, run_b / "model.safetensors")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (run_b / name).write_bytes((smollm2_dir / name).read_bytes())
    code, table, err = run_report(
        "compare",
        smollm2_dir,
        tmp_path / "sftmix_run",
        "--names",
        "ntp",
        "sftmix",
        *cli(
            data=write_jsonl(tmp_path / "heldout.jsonl", CONVERSATIONS),
            mc=write_jsonl(tmp_path / "mc.jsonl", MC[:2]),
            out=tmp_path / "table.md",
        ),
    )
    assert code == 0, err
    assert (tmp_path / "table.md").read_text() == table  # stdout holds the table alone
    lines = table.splitlines()
    assert lines[0] == "| metric | ntp | sftmix | sftmix − ntp | sftmix ÷ ntp |"
    cells = {
        line.split(" | ")[0][2:]: [float(c) for c in line.strip("| ").split(" | ")[1:]]
        for line in lines[2:]
    }
    assert set(cells) == {
        "ppl ↓",
        "NLL per token ↓",
        "mc accuracy, summed ↑",
        "mc accuracy, per-token ↑",
        "mc accuracy, per-character ↑",
    }
    for temperature, column in ((1.0, 0), (1 / 0.8, 1)):
        expected = response_nll(hf_scored, temperature)
        nll_per_token = sum(nll for nll, _ in expected.values()) / sum(
            n for _, n in expected.values()
        )
        assert cells["NLL per token ↓"][column] == pytest.approx(nll_per_token, abs=5e-4)
        assert cells["ppl ↓"][column] == pytest.approx(math.exp(nll_per_token), rel=5e-4)
    for a, b, diff, ratio in cells.values():  # from the rounded cells: within the rounding
        assert diff == pytest.approx(b - a, abs=2e-4) and ratio == pytest.approx(
            b / a, abs=2e-4 * (1 + b / a)
        )
    assert cells["mc accuracy, summed ↑"][0] == 1.0


def test_dynamics_reports_confidence_mean_and_spread_as_computed_by_hand(tmp_path):
    runs = {
        "NTP": [[2.0, 3.0, 4.0], [5.0, 5.5, 6.0], [9.0, 12.0, 15.0], [1.5, 1.5, 1.8]],
        "SFTMix": [[2.0, 2.5, 3.0], [4.0, 4.5, 5.0], [7.0, 8.0, 10.0], [1.5, 1.6, 1.7]],
    }
    (tmp_path / "ntp").mkdir()
    # a run directory, and a file given directly
    paths = [
        write_jsonl(
            tmp_path / "ntp" / "dynamics.jsonl",
            [{"id": f"e{i}", "perplexities": p} for i, p in enumerate(runs["NTP"])],
        ),
        write_jsonl(
            tmp_path / "sftmix.jsonl",
            [{"id": f"e{i}", "perplexities": p} for i, p in enumerate(runs["SFTMix"])],
        ),
    ]
    code, table, err = run_report(
        "dynamics",
        tmp_path / "ntp",
        paths[1],
        "--names",
        "NTP",
        "SFTMix",
        "--out",
        tmp_path / "tables" / "dynamics.md",
    )
    assert code == 0, err
    assert (tmp_path / "tables" / "dynamics.md").read_text() == table
    cells = table_cells(table)
    for column, name in enumerate(runs):
        conf = [-statistics.fmean(p) for p in runs[name]]
        assert cells["confidence mean"][column] == pytest.approx(statistics.fmean(conf), abs=1e-4)
        value = cells["confidence spread (std over examples)"][column]
        assert value == pytest.approx(statistics.pstdev(conf), abs=1e-4)
        assert cells["variability mean"][column] == pytest.approx(
            statistics.fmean(statistics.pstdev(p) for p in runs[name]), abs=1e-4
        )
    spread = cells["confidence spread (std over examples)"]
    assert spread[3] == pytest.approx(spread[1] / spread[0], abs=1e-3)  # the SFTMix ÷ NTP column


def test_the_table_command_sets_up_no_device_or_process_group(tmp_path, monkeypatch):
    def no_setup(*args):
        raise AssertionError("setup called by a command that runs no model")

    monkeypatch.setattr(report.E, "setup", no_setup)
    dynamics = write_dynamics(tmp_path / "dynamics.jsonl")
    code, table, err = run_report("dynamics", dynamics)
    assert code == 0 and table.startswith("| metric |"), err
