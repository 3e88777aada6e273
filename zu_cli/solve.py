"""Pure tensor math of the edits: closed form (design §2.4, §2.7) and --multi (§2.8); no model, no I/O.

Shapes: d = d_model, f = d_ff, n = number of forget requests. W is (d, f) in the
"output = W @ key" orientation whatever the checkpoint's storage layout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import NumericalError


def projector(sensitive: torch.Tensor, epsilon: float, rtol: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """P = (1 + eps) I - V V^T, V spanning the sensitive output vectors.

    Args:
        sensitive: M_f, (n, d): one sensitive down-projection output per row.
        epsilon: the reference's 0.01; keeps P well conditioned.
        rtol: singular values below rtol * the largest are treated as zero (rank deficiency).

    Returns:
        (P (d, d), V (d, r)), float64.
    """
    m = sensitive.to(torch.float64)
    # M_f^T = U S V^T in the design's notation; here rows are vectors, so the directions are M's right singular vectors.
    _, s, vh = torch.linalg.svd(m, full_matrices=False)  # vh: (min(n, d), d)
    keep = s > rtol * s.max().clamp_min(1e-300)
    v = vh[keep].T  # (d, r)
    eye = torch.eye(m.shape[1], dtype=torch.float64, device=m.device)
    return (1.0 + epsilon) * eye - v @ v.T, v


@dataclass(frozen=True)
class SolveReport:
    """Diagnostics of one closed-form solve."""

    cond: float
    rel_change: float
    residual: float


def closed_form(w: torch.Tensor, g: torch.Tensor, v_f: torch.Tensor, t: torch.Tensor, p: torch.Tensor,
                lambda_g: float, lambda_f: float, lambda_r: float, max_cond: float = 1e12,
                max_rel_change: float = 0.5, project_general: bool = True) -> tuple[torch.Tensor, SolveReport]:
    """Multiplicative update D minimising
    lambda_g E||D W k - P W k||^2 + lambda_f sum ||D v_f - P t_f||^2 + lambda_r ||D W - P W||_F^2.

    Normal equations: D B = A with A = P (lambda_g G + lambda_f T V_f^T + lambda_r W W^T),
    B = lambda_g G + lambda_f V_f V_f^T + lambda_r W W^T (symmetric), solved in float64.

    Args:
        w: W (d, f).
        g: G = E[v v^T] (d, d) over general text (v = W k, bias removed).
        v_f: (d, n), W K_f: the forget keys' current outputs.
        t: (d, n), targets for those outputs.
        p: (d, d) projector.
        lambda_g, lambda_f, lambda_r: weights of the three terms.
        max_cond: largest acceptable condition number of B.
        max_rel_change: largest acceptable ||D W - W|| / ||W||.
        project_general: map general keys to P W k (reference); False keeps them at W k and
            applies P to the forget targets only: A = lambda_g G + lambda_f P T V_f^T + lambda_r W W^T.

    Returns:
        (D (d, d) float64, SolveReport).

    Raises:
        NumericalError: NaN/Inf, B too ill-conditioned, or a relative change above the bound (exit 5).
    """
    w64, g64, vf, t64, p64 = (x.to(torch.float64) for x in (w, g, v_f, t, p))
    wwt = w64 @ w64.T  # (d, d)
    b = lambda_g * g64 + lambda_f * vf @ vf.T + lambda_r * wwt
    if project_general:
        a = p64 @ (lambda_g * g64 + lambda_f * t64 @ vf.T + lambda_r * wwt)
    else:
        a = lambda_g * g64 + lambda_f * p64 @ t64 @ vf.T + lambda_r * wwt
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        raise NumericalError("non-finite values in the normal equations", hint="check the statistics and the model's weights")
    cond = float(torch.linalg.cond(b))
    if not cond < max_cond:
        raise NumericalError(f"normal equations ill-conditioned (condition number {cond:.3g} > {max_cond:.3g})",
                             hint="raise lambda_r or collect statistics over more text")
    d = torch.linalg.solve(b, a.T).T  # D B = A  <=>  B^T D^T = A^T, and B is symmetric
    rel = guard(w64, d @ w64, max_rel_change)
    residual = float(torch.linalg.norm(d @ b - a) / torch.linalg.norm(a).clamp_min(1e-300))
    return d, SolveReport(cond=cond, rel_change=rel, residual=residual)


def guard(w: torch.Tensor, new_w: torch.Tensor, max_rel_change: float) -> float:
    """Refuse an update that is not finite or moves W too far.

    Args:
        w: W before (d, f); new_w: W after.
        max_rel_change: largest acceptable ||new_w - w|| / ||w||.

    Returns:
        The relative change.

    Raises:
        NumericalError: non-finite values or a change above the bound (exit 5).
    """
    if not torch.isfinite(new_w).all():
        raise NumericalError("the solve produced non-finite values")
    rel = float(torch.linalg.norm(new_w - w) / torch.linalg.norm(w))
    if rel > max_rel_change:
        raise NumericalError(f"edit would change the weight by {rel:.1%} (bound {max_rel_change:.0%})",
                             hint="fewer requests per run, or raise max_rel_change in --config")
    return rel


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """Round float values to a lower-precision float dtype without bias.

    Round-to-nearest silently undoes weight changes smaller than half a unit in the last place
    (bf16 keeps 8 significant bits), which erases most of a small rank-n edit; rounding up or
    down with probability proportional to the distance keeps the edit in expectation.

    Args:
        x: values (any float dtype).
        dtype: target dtype (bfloat16 or float16); other dtypes are a plain cast.
        generator: for reproducible rounding.

    Returns:
        Tensor of ``dtype``.
    """
    x32 = x.to(torch.float32).contiguous()
    if dtype == torch.bfloat16:
        # bf16 is the top half of a float32: add uniform noise below the kept bits, then truncate.
        noise = torch.randint(0, 1 << 16, x32.shape, generator=generator, dtype=torch.int32, device=x32.device)
        bits = (x32.view(torch.int32) + noise) & -65536  # -65536 == 0xFFFF0000 as int32
        return bits.view(torch.float32).to(torch.bfloat16)
    if dtype == torch.float16:
        near = x32.to(torch.float16)
        near32 = near.to(torch.float32)
        other = torch.nextafter(near, torch.where(x32 > near32, torch.tensor(float("inf")),
                                                  torch.tensor(float("-inf"))).to(torch.float16))
        gap = (other.to(torch.float32) - near32).abs()
        frac = torch.where(gap > 0, (x32 - near32).abs() / gap, torch.zeros_like(x32))
        u = torch.rand(x32.shape, generator=generator, device=x32.device)
        return torch.where(u < frac, other, near)
    return x.to(dtype)


@dataclass(frozen=True)
class NullSpace:
    """The directions of key space general text barely excites (design §2.8, as AlphaEdit).

    Attributes:
        basis: U (f, m), orthonormal eigenvectors of E[k k^T] with eigenvalues below the threshold.
        evals: their eigenvalues (m,): how much general text still excites each direction.
    """

    basis: torch.Tensor
    evals: torch.Tensor

    @property
    def dim(self) -> int:
        """m, the rank of the null space."""
        return self.basis.shape[1]

    @property
    def projector(self) -> torch.Tensor:
        """P_null = U U^T (f, f)."""
        return self.basis @ self.basis.T


def null_space(kkt: torch.Tensor, threshold: float) -> NullSpace:
    """Eigenvectors of the general key covariance with eigenvalues below ``threshold``.

    Args:
        kkt: E[k k^T] (f, f) over general text, k the down-projection's input.
        threshold: eigenvalues below it count as the null space (reference: 2e-2).

    Returns:
        The NullSpace (float64); ``dim`` 0 when no eigenvalue is below the threshold.
    """
    evals, evecs = torch.linalg.eigh(kkt.to(torch.float64))  # ascending; kkt is symmetric PSD
    keep = evals < threshold
    return NullSpace(basis=evecs[:, keep], evals=evals[keep].clamp_min(0.0))


@dataclass(frozen=True)
class MultiWeights:
    """Weights of the --multi loss (design §2.8), an additive dW in the null space:

    sensitive * ||V^T (W+dW) K||^2 + target * ||(W+dW) K - T||^2 + norm * ||dW||^2
    + general * E||dW k||^2 over general keys k (zu's addition; 0 is the reference's loss).
    """

    sensitive: float = 1.0
    target: float = 100.0
    norm: float = 0.1
    general: float = 0.0


def multi_loss(dw: torch.Tensor, w: torch.Tensor, k: torch.Tensor, t: torch.Tensor, basis: torch.Tensor,
               wt: MultiWeights, kkt: torch.Tensor | None = None) -> torch.Tensor:
    """The --multi objective for an additive update (design §2.8).

    Args:
        dw: dW (d, f); w: W (d, f); k: forget keys K_f (f, n); t: targets T (d, n);
        basis: V (d, r), orthonormal sensitive output directions.
        kkt: E[k k^T] (f, f), needed when ``wt.general`` is not 0.

    Returns:
        Scalar loss.
    """
    out = (w + dw) @ k  # (d, n)
    loss = (wt.sensitive * (basis.T @ out).square().sum() + wt.target * (out - t).square().sum()
            + wt.norm * dw.square().sum())
    if wt.general and kkt is not None:
        loss = loss + wt.general * torch.trace(dw @ kkt.to(dw.dtype) @ dw.T)  # E||dW k||^2 = tr(dW E[kk^T] dW^T)
    return loss


def _diag_weights(null: NullSpace, wt: MultiWeights) -> torch.Tensor:
    """(m,) weight of ||dW u_j||^2 in the loss: norm + general * eigenvalue (u_j are eigenvectors of E[kk^T])."""
    return wt.norm + wt.general * null.evals


def multi_exact(w: torch.Tensor, k: torch.Tensor, t: torch.Tensor, basis: torch.Tensor, null: NullSpace,
                wt: MultiWeights) -> torch.Tensor:
    """The exact minimiser of ``multi_loss`` over dW = X U^T (rows in the null space; the loss is quadratic).

    With Ku = U^T K (m, n) and M = diag(norm + general * eigenvalues) (m, m), the gradient vanishes
    where Q X Ku Ku^T + X M = R Ku^T, Q = target I + sensitive V V^T and
    R = target (T - W K) - sensitive V V^T W K. Q has two eigenvalues (on span V and off it), and
    Ku^T (q Ku Ku^T + M)^-1 = (q Ku^T M^-1 Ku + I)^-1 Ku^T M^-1, so the solve is two n x n systems.

    Args:
        w: W (d, f); k: K_f (f, n); t: T (d, n); basis: V (d, r) orthonormal; null: the NullSpace.

    Returns:
        dW (d, f) float64, rows in the null space.

    Raises:
        NumericalError: a zero weight on some null direction (norm and general both 0).
    """
    w, k, t, v, u = (x.to(torch.float64) for x in (w, k, t, basis, null.basis))
    m_diag = _diag_weights(null, wt).to(torch.float64)  # (m,)
    if not bool((m_diag > 0).all()):
        raise NumericalError("the exact --multi solve needs multi_norm_weight > 0 (or multi_general_weight > 0)")
    ku = u.T @ k  # (m, n)
    ku_m = ku / m_diag[:, None]  # M^-1 Ku (m, n)
    wk = w @ k  # (d, n)
    vvt = v @ v.T  # (d, d)
    r = wt.target * (t - wk) - wt.sensitive * vvt @ wk  # (d, n)
    gram = ku.T @ ku_m  # Ku^T M^-1 Ku (n, n)
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    x = torch.zeros(w.shape[0], u.shape[1], dtype=torch.float64, device=w.device)  # (d, m)
    for q, part in ((wt.target + wt.sensitive, vvt @ r), (wt.target, r - vvt @ r)):
        coef = torch.linalg.solve(q * gram + eye, part.T).T  # part (q Ku^T M^-1 Ku + I)^-1 (d, n); gram is symmetric
        x = x + coef @ ku_m.T
    return x @ u.T


def multi_gradient(w: torch.Tensor, k: torch.Tensor, t: torch.Tensor, basis: torch.Tensor, null: NullSpace,
                   wt: MultiWeights, steps: int = 500, lr: float = 1e-3) -> tuple[torch.Tensor, int]:
    """Minimise ``multi_loss`` over dW = D P_null with Adam on D, from D = 0 (the reference's path).

    The loss only needs D P_null K = D Kp and ||D P_null||^2 = ||D U||^2 (P_null = U U^T), so a
    step costs O(d f (n + m)) rather than the O(d f^2) of forming D P_null; the gradients are
    the same.

    Args:
        w, k, t, basis, null: as ``multi_exact``.
        steps: Adam steps (reference 500); stops early once the loss is below 1e-8.
        lr: Adam learning rate (reference 1e-3).

    Returns:
        (dW (d, f) float64, steps taken).
    """
    w, k, t, v, u = (x.to(torch.float64) for x in (w, k, t, basis, null.basis))
    m_diag = _diag_weights(null, wt).to(torch.float64)  # (m,)
    kp = u @ (u.T @ k)  # P_null K (f, n)
    wk = w @ k  # (d, n)
    d = torch.zeros_like(w, requires_grad=True)
    opt = torch.optim.Adam([d], lr=lr)
    taken = 0
    with torch.enable_grad():
        for taken in range(1, steps + 1):
            opt.zero_grad()
            out = wk + d @ kp  # (d, n)
            loss = (wt.sensitive * (v.T @ out).square().sum() + wt.target * (out - t).square().sum()
                    + ((d @ u).square() * m_diag).sum())
            if float(loss.detach()) < 1e-8:
                break
            loss.backward()
            opt.step()
    return (d.detach() @ u) @ u.T, taken
