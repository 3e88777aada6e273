"""Pure math of solve.py on random tensors."""

import torch

from zu_cli.solve import closed_form, projector, stochastic_round


def _problem(d=24, f=48, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, f, generator=g, dtype=torch.float64) / f ** 0.5
    keys = torch.randn(2000, f, generator=g, dtype=torch.float64)
    v = keys @ w.T
    G = v.T @ v / len(v)
    k_f = torch.randn(n, f, generator=g, dtype=torch.float64) * 3
    v_f = w @ k_f.T
    t = v_f + torch.randn(d, n, generator=g, dtype=torch.float64)
    return w, G, v_f, t, keys


def test_projector_annihilates_sensitive_vectors():
    m = torch.randn(4, 32, dtype=torch.float64)
    p, v = projector(m, epsilon=0.0)
    assert v.shape == (32, 4)
    assert torch.allclose(p @ m.T, torch.zeros(32, 4, dtype=torch.float64), atol=1e-10)
    p_eps, _ = projector(m, epsilon=0.01)
    assert torch.allclose(p_eps @ m.T, 0.01 * m.T, atol=1e-10)  # only the epsilon part is left
    x = torch.randn(32, dtype=torch.float64)
    x -= v @ (v.T @ x)  # orthogonal to the sensitive span: untouched (up to 1 + eps)
    assert torch.allclose(p_eps @ x, 1.01 * x)


def test_rank_deficient_sensitive_set():
    a = torch.randn(1, 16, dtype=torch.float64)
    _, v = projector(torch.cat([a, 2 * a, -a]), epsilon=0.01)
    assert v.shape[1] == 1


def test_solution_satisfies_normal_equations():
    w, G, v_f, t, _ = _problem()
    p, _ = projector(torch.randn(3, w.shape[0], dtype=torch.float64), 0.01)
    lg, lf, lr = 15000.0, 50.0, 1.0
    d, rep = closed_form(w, G, v_f, t, p, lg, lf, lr)
    wwt = w @ w.T
    a = p @ (lg * G + lf * t @ v_f.T + lr * wwt)
    b = lg * G + lf * v_f @ v_f.T + lr * wwt
    assert torch.allclose(d @ b, a, rtol=1e-8, atol=1e-8 * a.abs().max())
    assert rep.residual < 1e-10
    # the gradient of the objective vanishes at D
    grad = lg * (d - p) @ G + lf * (d @ v_f - p @ t) @ v_f.T + lr * (d - p) @ wwt
    assert grad.abs().max() < 1e-8 * a.abs().max()


def test_keys_outside_forget_set_barely_move_and_targets_are_met():
    w, G, v_f, t, keys = _problem(d=64, f=128, n=2)
    # General term unprojected, no sensitive directions, reference weights: the forget keys move
    # most of the way to their targets while typical keys barely move.
    p = torch.eye(w.shape[0], dtype=torch.float64)
    d, _ = closed_form(w, G, v_f, t, p, 15000.0, 50.0, 1.0, project_general=False)
    general = keys[:500] @ w.T
    moved = ((general @ d.T - general).norm(dim=1) / general.norm(dim=1)).median()
    hit = ((d @ v_f - t).norm() / (t - v_f).norm())
    assert moved < 0.05, moved
    assert hit < 0.5, hit


def test_guards_raise_numerical_error():
    import pytest

    from zu_cli.errors import NumericalError

    w, G, v_f, t, _ = _problem()
    p = torch.eye(w.shape[0], dtype=torch.float64)
    with pytest.raises(NumericalError, match="change"):
        closed_form(w, G, v_f, t * 100, p, 1.0, 1e6, 1e-6, max_rel_change=1e-3)
    with pytest.raises(NumericalError, match="non-finite"):
        closed_form(w, G * float("nan"), v_f, t, p, 1.0, 1.0, 1.0)
    with pytest.raises(NumericalError, match="ill-conditioned"):
        closed_form(w, torch.zeros_like(G), v_f, t, p, 1.0, 1.0, 0.0)
    assert NumericalError("x").exit_code == 5


def test_stochastic_rounding_keeps_small_edits():
    w = torch.randn(256, 64).to(torch.bfloat16).float()
    delta = 1e-4 * torch.randn(256, 64)  # far below bf16's half-ulp for most weights
    along = lambda change: float((change * delta).sum() / (delta * delta).sum())  # share of the edit kept
    assert along((w + delta).to(torch.bfloat16).float() - w) < 0.2  # round-to-nearest loses the edit
    for seed in range(3):  # one stochastic rounding keeps it along its own direction
        kept = along(stochastic_round(w + delta, torch.bfloat16, torch.Generator().manual_seed(seed)).float() - w)
        assert 0.75 < kept < 1.25, kept
    f16 = w.to(torch.float16).float()
    kept = along(stochastic_round(f16 + delta, torch.float16, torch.Generator().manual_seed(0)).float() - f16)
    assert 0.75 < kept < 1.25
    assert stochastic_round(w, torch.bfloat16).float().equal(w)  # representable values are kept exactly
