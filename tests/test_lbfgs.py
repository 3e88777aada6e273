"""The per-request quasi-Newton step of the neutral-target optimisation (``lbfgs.minimize``,
``z_optimizer: lbfgs``)."""

from __future__ import annotations

import json

import torch

from zu_cli import lbfgs
from zu_cli.checkpoint import open_checkpoint
from zu_cli.config import Hyper
from zu_cli.console import silent
from zu_cli.delta import optimize_deltas
from zu_cli.edit import build_rows, kl_rows
from zu_cli.loading import load_model
from zu_cli.requests import Request
from zu_cli.text import neutral_ids


def _quadratics(n: int, d: int, seed: int = 0):
    """n independent ill-conditioned quadratics 0.5 (x-m)' A (x-m), of scales 1e-2 to 1e2 (an
    objective w -> (loss (n,), probability (n,)) and the minimisers (n, d))."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, d, d, generator=gen, dtype=torch.float64))
    eig = torch.logspace(0, 2, d, dtype=torch.float64)  # condition number 100
    scale = torch.logspace(-2, 2, n, dtype=torch.float64)
    a = scale[:, None, None] * q @ torch.diag(eig) @ q.transpose(1, 2)  # (n, d, d)
    m = torch.randn(n, d, generator=gen, dtype=torch.float64)

    def f(w):
        r = w - m
        loss = 0.5 * torch.einsum("ni,nij,nj->n", r, a, r)
        return loss, torch.exp(-loss / scale).detach()  # "probability" 1 at the minimum
    return f, m


def test_each_request_reaches_its_own_minimum_whatever_its_scale():
    """Ten quadratics of condition number 100 and scales 1e-2..1e2, one evaluation of all per
    iteration: each ends at its minimiser, where Adam-like or steepest steps would need hundreds."""
    f, m = _quadratics(10, 8)
    w = torch.zeros(10, 8, dtype=torch.float64, requires_grad=True)
    lbfgs.minimize(f, w, evals=40, stop_prob=1.1, first=0.5)
    err = (w.detach() - m).norm(dim=-1) / m.norm(dim=-1)
    assert float(err.max()) < 1e-3, err


def test_a_request_does_not_change_another_requests_result():
    """The optimisation is separable: request 0's result alone equals its result in a batch whose
    other requests have rough objectives (some of their steps fail Armijo's test and are undone
    and retried), bit for bit."""
    f, _ = _quadratics(6, 5)
    rejected = torch.zeros(6, dtype=torch.long)
    last = []

    def rough(w):
        loss, p = f(w)
        bump = 3 * torch.sin(4 * w).sum(-1) + (w * w).sum(-1) ** 2  # not convex: quasi-Newton steps overshoot
        loss = torch.where(torch.arange(6) == 0, loss, loss + bump)
        if last:
            rejected.add_((loss.detach() > last[-1]).long())
        last.append(loss.detach())
        return loss, p
    alone = torch.zeros(1, 5, dtype=torch.float64, requires_grad=True)
    lbfgs.minimize(lambda w: tuple(x[:1] for x in f(torch.cat([w, torch.zeros(5, 5, dtype=w.dtype)]))),
                   alone, evals=12, stop_prob=1.1)
    batch = torch.zeros(6, 5, dtype=torch.float64, requires_grad=True)
    lbfgs.minimize(rough, batch, evals=12, stop_prob=1.1)
    assert int(rejected[1:].sum()) > 0 and int(rejected[0]) == 0, rejected
    assert torch.equal(batch.detach()[0], alone.detach()[0])


def test_a_request_past_the_stop_probability_stops_moving():
    """A request whose probability passes ``stop_prob`` keeps that point while the others go on;
    the loop ends once every request has passed it."""
    f, m = _quadratics(4, 6)
    calls = []
    w = torch.zeros(4, 6, dtype=torch.float64, requires_grad=True)
    probs = lbfgs.minimize(f, w, evals=60, stop_prob=0.9, on_eval=lambda: calls.append(1))
    assert bool((probs > 0.9).all()), probs
    loss, p = f(w.detach())
    torch.testing.assert_close(p, probs.to(p.dtype))  # the returned point is the one scored
    assert len(calls) < 60  # stopped once all passed
    assert float(((w.detach() - m).norm(dim=-1) / m.norm(dim=-1)).min()) > 1e-6  # not run to the minimum
    still = torch.zeros(4, 6, dtype=torch.float64, requires_grad=True)
    assert not bool(lbfgs.minimize(f, still, evals=0, stop_prob=0.9).any()) and not bool(still.detach().any())


def test_lbfgs_reaches_the_neutral_target_in_fewer_passes_than_adam(fact_model_dir):
    """On the fact model, the neutral target (EOS) at layer 1: L-BFGS with 10 passes ends with a
    higher target probability than the reference's Adam with 25, and every delta within the clamp."""
    from zu_cli.demo import Fact

    facts = [Fact(**f) for f in json.loads((fact_model_dir / "facts.json").read_text())][:4]
    reqs = [Request(id=f"f{i}", prompt=f.prompt(), subject=None, target=f.answer) for i, f in enumerate(facts)]
    ckpt = open_checkpoint(fact_model_dir)
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    rows = build_rows(tok, reqs, ["{}"], neutral_ids(tok, reqs, "eos"))
    hp = Hyper(optim_dtype="float32", z_clamp=0.75)
    run = lambda method, steps: optimize_deltas(model, tok, ckpt.spec, rows, kl_rows(tok, reqs),
                                                [ckpt.spec.layer_module(1)], 1, len(reqs), hp, steps, 1.1, silent(),
                                                "t", method=method)
    adam, base, p_adam = run("adam", 25)
    quasi, _, p_quasi = run("lbfgs", 10)
    assert float(p_quasi.min()) > float(p_adam.min()), (p_quasi, p_adam)
    assert float(p_quasi.mean()) > float(p_adam.mean()), (p_quasi, p_adam)
    limit = hp.z_clamp * base.norm(dim=-1)  # (n, modules)
    assert bool((quasi.norm(dim=-1) <= limit * (1 + 1e-5)).all())
