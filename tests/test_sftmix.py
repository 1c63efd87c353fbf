"""The method's pieces against hand calculations and independent per-position computations."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_eval import run_main
from test_train import cli

import sftmix

ROOT = Path(__file__).resolve().parent.parent
IGNORE = -100


def random_pairs(P=3, T=9, D=6, V=11, seed=0, dtype=torch.float64):
    """P pairs with response spans of different lengths and offsets (prompt and padding are IGNORE)."""
    g = torch.Generator().manual_seed(seed)
    hidden_c, hidden_u = (
        torch.randn(P, T, D, generator=g, dtype=dtype),
        torch.randn(P, T, D, generator=g, dtype=dtype),
    )
    labels_c = torch.full((P, T), IGNORE)
    labels_u = torch.full((P, T), IGNORE)
    spans_c, spans_u = [(2, 7), (1, 3), (4, 9)], [(3, 5), (0, 8), (5, 9)]
    for p in range(P):
        labels_c[p, slice(*spans_c[p])] = torch.randint(
            0, V, (spans_c[p][1] - spans_c[p][0],), generator=g
        )
        labels_u[p, slice(*spans_u[p])] = torch.randint(
            0, V, (spans_u[p][1] - spans_u[p][0],), generator=g
        )
    W = torch.randn(V, D, generator=g, dtype=dtype)
    lam = torch.tensor([0.3, 0.9, 0.55], dtype=dtype)
    return hidden_c, labels_c, hidden_u, labels_u, lam, W


def per_position_mixup(hidden_c, labels_c, hidden_u, labels_u, lam, W):
    """The paper's definition written out one pair and one position at a time, with explicit soft
    labels.
    """
    losses = []
    for p in range(len(lam)):
        pos_c = [t for t in range(labels_c.shape[1]) if labels_c[p, t] != IGNORE]
        pos_u = [t for t in range(labels_u.shape[1]) if labels_u[p, t] != IGNORE]
        for tc, tu in zip(pos_c, pos_u):  # zip stops at n = min(n_c, n_u)
            z = lam[p] * hidden_c[p, tc] + (1 - lam[p]) * hidden_u[p, tu]
            y = lam[p] * F.one_hot(labels_c[p, tc], W.shape[0]) + (1 - lam[p]) * F.one_hot(
                labels_u[p, tu], W.shape[0]
            )
            losses.append(-(y * torch.log_softmax(W @ z, dim=0)).sum())
    return torch.stack(losses)


def test_mixup_loss_equals_per_position_definition():
    args = random_pairs()
    expected = per_position_mixup(*args)
    assert len(expected) == 2 + 2 + 4  # min(5,2), min(2,8), min(5,4)
    torch.testing.assert_close(sftmix.mixup_loss(*args), expected.mean())
    torch.testing.assert_close(sftmix.mixup_loss(*args, reduction="sum"), expected.sum())


def test_mixup_with_lambda_one_is_ntp_on_the_confident_examples_first_n_positions():
    hidden_c, labels_c, hidden_u, labels_u, _, W = random_pairs()
    lam = torch.ones(3, dtype=torch.float64)
    n = [2, 2, 4]
    ntp = [
        F.cross_entropy(hidden_c[p] @ W.T, labels_c[p], ignore_index=IGNORE, reduction="none")[
            labels_c[p] != IGNORE
        ][: n[p]]
        for p in range(3)
    ]
    torch.testing.assert_close(
        sftmix.mixup_loss(hidden_c, labels_c, hidden_u, labels_u, lam, W), torch.cat(ntp).mean()
    )


def test_mixup_loss_gradient_matches_finite_differences():
    hidden_c, labels_c, hidden_u, labels_u, lam, W = random_pairs()
    inputs = tuple(t.clone().requires_grad_() for t in (hidden_c, hidden_u, W))
    assert torch.autograd.gradcheck(
        lambda hc, hu, w: sftmix.mixup_loss(hc, labels_c, hu, labels_u, lam, w), inputs
    )


@pytest.mark.parametrize("chunk", [1024, 2])
def test_head_losses_logit_form_equals_hidden_state_form_and_per_position_ntp(chunk):
    """training's chunked logit form (mixed logits from NTP's logits) = mixup_loss's hidden form,
    values and grads
    """
    hidden_c, labels_c, hidden_u, labels_u, lam, W = random_pairs()
    at_c, at_u = labels_c != IGNORE, labels_u != IGNORE
    hidden = torch.cat(
        [hidden_c[at_c], hidden_u[at_u]]
    ).requires_grad_()  # (N, D): confident rows, then partners
    targets = torch.cat([labels_c[at_c], labels_u[at_u]])
    n_c, n_u = at_c.sum(1).tolist(), at_u.sum(1).tolist()
    off_c, off_u = np.cumsum([0] + n_c), sum(n_c) + np.cumsum([0] + n_u)
    n = [min(a, b) for a, b in zip(n_c, n_u)]
    mix_c = torch.tensor([off_c[p] + k for p in range(3) for k in range(n[p])])
    mix_u = torch.tensor([off_u[p] + k for p in range(3) for k in range(n[p])])
    lam_pos = torch.cat([lam[p].repeat(n[p]) for p in range(3)])
    rest = torch.tensor(
        sorted(set(range(len(targets))) - set(mix_c.tolist()) - set(mix_u.tolist()))
    )
    nll, mix = sftmix.head_losses(hidden, W, targets, mix_c, mix_u, lam_pos, rest, chunk=chunk)
    torch.testing.assert_close(nll, F.cross_entropy(hidden @ W.T, targets, reduction="none"))
    torch.testing.assert_close(
        mix, per_position_mixup(hidden_c, labels_c, hidden_u, labels_u, lam, W)
    )
    (grad,) = torch.autograd.grad(nll.sum() + mix.sum(), hidden)
    hc, hu = hidden_c.clone().requires_grad_(), hidden_u.clone().requires_grad_()
    ref = F.cross_entropy(
        torch.cat([hc[at_c], hu[at_u]]) @ W.T, targets, reduction="sum"
    ) + sftmix.mixup_loss(hc, labels_c, hu, labels_u, lam, W, reduction="sum")
    ref_c, ref_u = torch.autograd.grad(ref, (hc, hu))
    torch.testing.assert_close(grad, torch.cat([ref_c[at_c], ref_u[at_u]]))


def test_head_losses_soft_caps_the_mixed_logits_after_mixing():
    """with a final-logit cap c (Gemma 2), Mixup uses c tanh(W Z~ / c): the cap comes after the mix"""
    hidden_c, labels_c, hidden_u, labels_u, lam, W = random_pairs(P=1)
    h = torch.stack([hidden_c[0, 2], hidden_u[0, 3]])  # one confident and one unconfident position
    y = torch.stack([labels_c[0, 2], labels_u[0, 3]])
    nll, mix = sftmix.head_losses(
        h,
        W,
        y,
        torch.tensor([0]),
        torch.tensor([1]),
        lam[:1],
        torch.tensor([], dtype=torch.long),
        softcap=2.0,
    )
    z = lam[0] * h[0] + (1 - lam[0]) * h[1]
    logp = torch.log_softmax(2.0 * torch.tanh(W @ z / 2.0), dim=0)
    torch.testing.assert_close(mix[0], -(lam[0] * logp[y[0]] + (1 - lam[0]) * logp[y[1]]))
    torch.testing.assert_close(
        nll, F.cross_entropy(2.0 * torch.tanh(h @ W.T / 2.0), y, reduction="none")
    )


def test_confidence_is_minus_mean_perplexity_and_variability_its_population_std():
    perps = [[2.0, 4.0, 6.0, 8.0], [3.0, 3.0, 3.0, 3.0]]
    np.testing.assert_allclose(sftmix.confidence(perps), [-5.0, -3.0])
    np.testing.assert_allclose(sftmix.variability(perps), [np.sqrt(5.0), 0.0])


def test_split_is_at_the_median_with_ties_broken_by_id():
    ids = ["e", "d", "c", "b", "a", "f"]
    conf = [-1.0, -5.0, -2.0, -2.0, -9.0, -2.0]
    confident, unconfident = sftmix.split_by_confidence(ids, conf)
    assert confident == ["e", "b", "c"]  # -1, then the -2 tie ordered b, c before f
    assert unconfident == ["f", "d", "a"]


def test_odd_split_puts_the_median_example_in_the_unconfident_half():
    confident, unconfident = sftmix.split_by_confidence(["a", "b", "c"], [-1.0, -2.0, -3.0])
    assert (confident, unconfident) == (["a"], ["b", "c"])


def test_paired_batches_hold_half_confident_half_unconfident_each_example_once_per_epoch():
    confident = [f"c{i}" for i in range(10)]
    unconfident = [f"u{i}" for i in range(11)]
    for epoch in range(3):
        batches = sftmix.paired_batches(confident, unconfident, batch_size=4, seed=1, epoch=epoch)
        assert len(batches) == 5  # 10 pairs / 2 pairs per batch; the 11th unconfident example waits
        for b in batches:
            assert all(x.startswith("c") for x in b[:2]) and all(x.startswith("u") for x in b[2:])
        seen = [x for b in batches for x in b]
        assert len(seen) == len(set(seen)) == 20
    e0, e1 = (sftmix.paired_batches(confident, unconfident, 4, 1, e) for e in (0, 1))
    assert e0 != e1 and e0 == sftmix.paired_batches(confident, unconfident, 4, 1, 0)


def test_lambda_is_beta_distributed_and_drawn_from_the_seed_and_step():
    """Beta(a, a) has mean 1/2, variance s2 = 1 / (4 (2a + 1)) and fourth central moment
    m4 = s2^2 (3 - 6 / (2a + 3)) (excess kurtosis -6 / (2a + 3)). Over n draws the sample mean has
    standard deviation sqrt(s2 / n) and the sample variance sqrt((m4 - s2^2) / n) to first order:
    0.0025 and 0.000625 at a = 1/2, n = 20000. Both stay within 4 of them (Beta(a', a') with
    |a' - a| >= 0.025 fails). lam is drawn from (seed, step): again the same, another step or seed
    another."""
    a, n = 0.5, 20000
    lam = sftmix.sample_lambda(a, n, seed=3, step=7)
    s2 = 1 / (4 * (2 * a + 1))
    m4 = s2**2 * (3 - 6 / (2 * a + 3))
    assert abs(lam.double().mean().item() - 0.5) < 4 * (s2 / n) ** 0.5
    assert abs(lam.double().var().item() - s2) < 4 * ((m4 - s2**2) / n) ** 0.5
    assert torch.equal(lam, sftmix.sample_lambda(a, n, seed=3, step=7))
    assert not torch.equal(lam, sftmix.sample_lambda(a, n, seed=3, step=8))
    assert not torch.equal(lam, sftmix.sample_lambda(a, n, seed=4, step=7))


def test_split_command_writes_halves_and_reports_them(tmp_path):
    dyn = tmp_path / "dynamics.jsonl"
    dyn.write_text(
        "".join(
            json.dumps({"id": f"x{i}", "perplexities": [i + 1.0, i + 3.0]}) + "\n" for i in range(5)
        )
    )
    out = tmp_path / "split.json"
    r = subprocess.run(
        [sys.executable, ROOT / "sftmix.py", "split", "--dynamics", dyn, "--out", out],
        capture_output=True,
        text=True,
        check=True,
    )
    split = json.loads(out.read_text())
    assert split == {"confident": ["x0", "x1"], "unconfident": ["x2", "x3", "x4"]}
    assert "confident:      2 examples, confidence -3 .. -2" in r.stdout


@pytest.mark.parametrize(
    "text, out, message",
    [
        (
            '{"id": "a", "perplexities": [1.0]}\n{"id": "b"}\n',
            "s.json",
            'DIR/dynamics.jsonl:2: expected {"id": ..., "perplexities": [numbers]}',
        ),
        (
            '{"id": null, "perplexities": [2.0]}\n',
            "s.json",
            'DIR/dynamics.jsonl:1: "id": expected a string or an integer, got null',
        ),
        (
            '{"id": {"x": 1}, "perplexities": [2.0]}\n',
            "s.json",
            'DIR/dynamics.jsonl:1: "id": expected a string or an integer, got {"x": 1}',
        ),
        (
            '{"id": "a", "perplexities": [1' + "0" * 400 + "]}\n",
            "s.json",
            'DIR/dynamics.jsonl:1: "perplexities": expected a list of finite numbers > 0, got [1000',
        ),
        (
            '{"id": "a", "perplexities": [2.0]}\n{"id": "b", "perplexities": [3.0, 4.0]}\n',
            "s.json",
            'DIR/dynamics.jsonl:2: "perplexities": expected as many as on line 1 (1), got 2',
        ),
        (
            "[" * 100000 + "]" * 100000,
            "s.json",
            'DIR/dynamics.jsonl:1: expected {"id": ..., "perplexities": [numbers]} (maximum recursion',
        ),
        (
            '{"id": "a", "perplexities": [2.0]}\n{"id": "b", "perplexities": [3.0]}\n',
            "dynamics.jsonl",
            "--out DIR/dynamics.jsonl: expected a file other than the inputs, got --dynamics "
            "DIR/dynamics.jsonl",
        ),
    ],
)
def test_split_command_rejects_bad_input_in_one_line_writing_nothing(text, out, message, tmp_path):
    dyn = tmp_path / "dynamics.jsonl"
    dyn.write_text(text)
    code, stdout, err = run_main(sftmix.main, "split", *cli(dynamics=dyn, out=tmp_path / out))
    assert (code, stdout) == (2, "") and err.count("\n") == 1, err
    assert err.startswith("error: " + message.replace("DIR/", f"{tmp_path}/")), err
    assert not (tmp_path / "s.json").exists() and dyn.read_text() == text
