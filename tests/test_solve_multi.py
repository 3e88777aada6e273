"""Pure math of --multi in solve.py (design §2.8) on random tensors."""

import pytest
import torch

from zu_cli.errors import NumericalError

from zu_cli.solve import MultiWeights, multi_exact, multi_gradient, multi_loss, null_space, projector

WT = MultiWeights()


def _problem(d=16, f=64, n=5, general_rank=40, seed=0):
    """A layer whose general keys live in a ``general_rank``-dim subspace; forget keys partly outside it."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, f, generator=g, dtype=torch.float64) / f ** 0.5
    basis = torch.linalg.qr(torch.randn(f, f, generator=g, dtype=torch.float64))[0]
    general = torch.randn(4000, general_rank, generator=g, dtype=torch.float64) @ basis[:, :general_rank].T  # (N, f)
    kkt = general.T @ general / len(general)
    k = torch.randn(f, n, generator=g, dtype=torch.float64)  # forget keys (f, n)
    t = w @ k + torch.randn(d, n, generator=g, dtype=torch.float64)
    _, v = projector(torch.randn(n, d, generator=g, dtype=torch.float64), 0.01)
    return w, k, t, v, kkt, general


def test_null_space_is_orthogonal_to_general_keys():
    *_, kkt, general = _problem()
    null = null_space(kkt, 2e-2)
    p = null.projector
    assert null.dim == 64 - 40
    assert torch.allclose(p @ p, p, atol=1e-10) and torch.allclose(p, p.T)
    assert (general @ p).abs().max() < 1e-8  # general keys have no component in it


def test_exact_is_a_stationary_point_in_the_null_space():
    w, k, t, v, kkt, _ = _problem()
    null = null_space(kkt, 2e-2)
    p = null.projector
    dw = multi_exact(w, k, t, v, null, WT)
    assert torch.allclose(dw @ p, dw, atol=1e-10)  # rows in the null space
    d = dw.clone().requires_grad_(True)  # dW = D P with D = dW (dW P = dW): the gradient in D must vanish
    multi_loss(d @ p, w, k, t, v, WT).backward()
    assert d.grad.norm() < 1e-8 * (1 + multi_loss(dw, w, k, t, v, WT))
    # Any other update in the null space does worse.
    other = dw + 1e-3 * torch.randn_like(dw) @ p
    assert multi_loss(other, w, k, t, v, WT) > multi_loss(dw, w, k, t, v, WT)


def test_general_keys_do_not_move_and_forget_targets_are_approached():
    w, k, t, v, kkt, general = _problem()
    dw = multi_exact(w, k, t, v, null_space(kkt, 2e-2), WT)
    assert (general @ dw.T).abs().max() < 1e-8  # W k is unchanged for every general key
    before = (w @ k - t).norm()
    after = ((w + dw) @ k - t).norm()
    assert after < 0.1 * before


def test_gradient_path_approaches_the_exact_minimum():
    w, k, t, v, kkt, _ = _problem()
    null = null_space(kkt, 2e-2)
    exact = multi_loss(multi_exact(w, k, t, v, null, WT), w, k, t, v, WT)
    start = multi_loss(torch.zeros_like(w), w, k, t, v, WT)
    dw, steps = multi_gradient(w, k, t, v, null, WT, steps=3000, lr=1e-2)
    assert torch.allclose(dw @ null.projector, dw, atol=1e-10)
    got = multi_loss(dw, w, k, t, v, WT)
    assert exact <= got + 1e-9  # never better than the minimiser
    assert got - exact < 0.01 * (start - exact)  # and most of the way there
    assert steps == 3000


@pytest.mark.parametrize("threshold", [1e-12, 1e3])
def test_threshold_controls_the_null_space(threshold):
    *_, kkt, _ = _problem()
    assert null_space(kkt, threshold).dim == (64 if threshold > 1e2 else 24)


def _soft_problem(seed=1):
    """General keys excite every direction, some barely: no exact null space, only a soft one."""
    w, k, t, v, _, _ = _problem(seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    scales = torch.logspace(-3, 0, 64, dtype=torch.float64)  # per-direction spread of general keys
    general = torch.randn(4000, 64, generator=g, dtype=torch.float64) * scales
    return w, k, t, v, general.T @ general / len(general)


def test_general_weight_exact_is_the_minimiser_of_the_full_loss():
    w, k, t, v, kkt = _soft_problem()
    wt = MultiWeights(general=1e3)
    null = null_space(kkt, 1e3)  # every direction: the general term alone protects general text
    dw = multi_exact(w, k, t, v, null, wt)
    d = dw.clone().requires_grad_(True)
    multi_loss(d, w, k, t, v, wt, kkt).backward()
    assert d.grad.norm() < 1e-7 * (1 + multi_loss(dw, w, k, t, v, wt, kkt))
    other = dw + 1e-3 * torch.randn_like(dw)
    assert multi_loss(other, w, k, t, v, wt, kkt) > multi_loss(dw, w, k, t, v, wt, kkt)


def test_general_weight_moves_general_outputs_less():
    w, k, t, v, kkt = _soft_problem()
    null = null_space(kkt, 1e3)
    moved = {}
    for general in (0.0, 1e3):
        dw = multi_exact(w, k, t, v, null, MultiWeights(general=general))
        moved[general] = float(torch.trace(dw @ kkt @ dw.T))  # E||dW k||^2 over general keys
    assert moved[1e3] < 0.5 * moved[0.0]


def test_gradient_path_with_general_weight_approaches_the_exact_minimum():
    w, k, t, v, kkt = _soft_problem()
    wt = MultiWeights(general=10.0)
    null = null_space(kkt, 1e3)
    exact = multi_loss(multi_exact(w, k, t, v, null, wt), w, k, t, v, wt, kkt)
    start = multi_loss(torch.zeros_like(w), w, k, t, v, wt, kkt)
    dw, _ = multi_gradient(w, k, t, v, null, wt, steps=3000, lr=1e-2)
    got = multi_loss(dw, w, k, t, v, wt, kkt)
    assert exact <= got + 1e-9 and got - exact < 0.01 * (start - exact)


def test_exact_refuses_an_unweighted_null_direction():
    w, k, t, v, kkt, _ = _problem()
    with pytest.raises(NumericalError):
        multi_exact(w, k, t, v, null_space(kkt, 2e-2), MultiWeights(norm=0.0))
