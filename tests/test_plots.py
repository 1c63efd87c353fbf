"""scripts/plots.py: the data map and the training curves, read back from the figures matplotlib saved, against the
numbers they were drawn from; an unwritable --out is one line before any work."""
import json
import math
import statistics
import sys
from pathlib import Path

import matplotlib.figure
import numpy as np
import pytest

from test_eval import check_unwritable_out, run_main, write_dynamics, write_jsonl

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import plots  # noqa: E402


def run_plots(*argv):
    """`python scripts/plots.py ARGV` in this process: (exit code, stdout, stderr)."""
    return run_main(plots.main, *argv)


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
    code, _, err = run_plots("datamap", "--dynamics", dynamics, "--out", tmp_path / "map.png")
    assert code == 0, err
    assert (tmp_path / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "map.png").stat().st_size > 1000
    (tmp_path / "split.json").write_text(json.dumps({"confident": [f"ex{i}" for i in range(12)],
                                                     "unconfident": [f"ex{i}" for i in range(12, 24)]}))
    code, _, err = run_plots("datamap", "--dynamics", dynamics, "--split", tmp_path / "split.json",
                            "--out", tmp_path / "split_map.png")
    assert code == 0, err
    assert (tmp_path / "split_map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_datamap_without_matplotlib_says_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    code, _, err = run_plots("datamap", "--dynamics", write_dynamics(tmp_path / "d.jsonl"), "--out", tmp_path / "m.png")
    assert (code, err) == (2, "error: datamap needs matplotlib: pip install matplotlib\n")
    assert not (tmp_path / "m.png").exists()


def test_datamap_shows_every_point_inside_the_frame_and_spreads_the_bulk(tmp_path, saved_figures):
    rng = np.random.default_rng(0)  # heavy-tailed: a log-normal bulk, a tail, two extreme outliers
    perplexities = [list(1 + np.exp(rng.normal(1.2, 0.6)) * np.exp(rng.normal(0, 0.05, 4))) for _ in range(300)]
    perplexities += [list(1 + np.exp(rng.uniform(3, 6)) * np.exp(rng.normal(0, 0.1, 4))) for _ in range(20)]
    perplexities += [[6211.0, 5000.0, 7000.0, 8000.0], [1.0, 1.0, 1.0, 1.0]]
    dynamics = write_jsonl(tmp_path / "dynamics.jsonl",
                           [{"id": f"ex{i}", "perplexities": p} for i, p in enumerate(perplexities)])
    code, _, err = run_plots("datamap", "--dynamics", dynamics, "--out", tmp_path / "maps" / "map.png")
    assert code == 0, err
    assert (tmp_path / "maps" / "map.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = saved_figures[0].axes[0]
    drawn = np.concatenate([np.asarray(c.get_offsets()) for c in ax.collections])  # (N, 2) data coordinates
    hand = [(statistics.pstdev(p), statistics.fmean(p)) for p in perplexities]  # (variability, -confidence)
    np.testing.assert_allclose(np.sort(drawn, axis=0), np.sort(np.array(hand), axis=0), rtol=1e-9)
    points, frame = ax.transData.transform(drawn), ax.get_window_extent()  # display pixels
    assert ((points[:, 0] > frame.x0) & (points[:, 0] < frame.x1)).all()
    assert ((points[:, 1] > frame.y0) & (points[:, 1] < frame.y1)).all()
    for axis, size in ((0, frame.width), (1, frame.height)):  # linear axes would squeeze this into < 1%
        low, high = np.percentile(points[:, axis], [10, 90])
        assert high - low > 0.1 * size
    assert "confidence" in ax.get_ylabel() and "variability" in ax.get_xlabel()
    labels = [t.get_text() for t in ax.get_yticklabels() if t.get_text()]
    assert labels and all(t.startswith("−") for t in labels)  # confidences: minus the mean perplexity


def write_metrics(run, mixup):
    """A run's metrics.jsonl, 30 steps; a held-out perplexity at steps 15 and 30 (the ends of two epochs)."""
    run.mkdir(parents=True)
    records = [{"step": s, "epoch": (s - 1) // 15, "lr": 1e-5 * min(s / 3, 1) * (31 - s) / 30, "loss": 0.0,
                "ntp_loss": 3 - s / 20 + (s % 3) / 10, "mixup_loss": (4 - s / 25) * mixup, "grad_norm": 1.0,
                "tokens_per_s": 100.0} | ({"heldout_nll": 1 - s / 100, "heldout_ppl": math.exp(1 - s / 100) + mixup}
                                          if s % 15 == 0 else {}) for s in range(1, 31)]
    write_jsonl(run / "metrics.jsonl", records)
    return records


def test_curves_draws_one_line_per_run_in_each_panel_from_the_metrics(tmp_path, saved_figures):
    records = {"ntp": write_metrics(tmp_path / "ntp", mixup=0), "sftmix": write_metrics(tmp_path / "sftmix", mixup=1)}
    out = tmp_path / "plots" / "curves.png"
    code, _, err = run_plots("curves", tmp_path / "ntp", tmp_path / "sftmix", "--out", out)
    assert code == 0, err
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    panels = {ax.get_title(): ax for ax in saved_figures[0].axes if ax.get_title()}
    assert set(panels) == {"NTP loss", "Mixup loss", "learning rate", "held-out perplexity (per epoch)"}
    for title, key in (("NTP loss", "ntp_loss"), ("Mixup loss", "mixup_loss"), ("learning rate", "lr"),
                       ("held-out perplexity (per epoch)", "heldout_ppl")):
        runs = ["sftmix"] if key == "mixup_loss" else ["ntp", "sftmix"]  # an NTP run has no Mixup loss
        lines = panels[title].get_lines()
        labelled = [line for line in lines if not line.get_label().startswith("_")]
        assert [line.get_label() for line in labelled] == runs, title
        for run in runs:
            steps, values = zip(*[(r["step"], r[key]) for r in records[run] if key in r])
            assert any(list(line.get_xdata()) == list(steps) and list(line.get_ydata()) == list(values)
                       for line in lines), (title, run)  # the raw values (a loss is also drawn smoothed)


@pytest.mark.parametrize("command", [["datamap", "--dynamics", "nope.jsonl"], ["curves", "nope"]])
@pytest.mark.parametrize("where", ["a directory", "under a file"])
def test_an_out_that_cannot_be_written_is_one_line_before_any_work(command, where, tmp_path):
    check_unwritable_out(run_plots, command, where, tmp_path)
