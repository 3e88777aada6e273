"""A batch of independent small L-BFGS problems, one per request, in one forward pass each.

The neutral-target optimisation (delta.py) is separable: request i's loss depends on its own
delta only, and every step evaluates all requests in one batch of forward/backward passes.
``torch.optim.LBFGS`` treats the batch as one problem (one curvature model, one line-search step
for all), and on SmolLM2 some requests of a batch stalled near zero while the others converged. Here
each request keeps its own curvature pairs and its own step length: a step whose loss does not
fall enough (Armijo) is undone for that request alone and retried at half the length at the
next evaluation, so every evaluation costs exactly one pass, as an Adam step does.
"""

from __future__ import annotations

from typing import Callable

import torch

Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def _direction(g: torch.Tensor, mem: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
               first: float) -> torch.Tensor:
    """-H g per request by the two-loop recursion over that request's valid pairs.

    Args:
        g: gradients (n, D).
        mem: oldest first, (s (n, D), y (n, D), valid (n,) bool) per pair.
        first: length of the first step of a request without curvature pairs, in units of w.

    Returns:
        Descent directions (n, D); steepest descent where the recursion gives none.
    """
    n = g.shape[0]
    q = g.clone()
    rhos = [torch.where(v, 1 / (s * y).sum(-1).clamp_min(1e-12), torch.zeros(n, dtype=g.dtype, device=g.device))
            for s, y, v in mem]
    alphas = []
    for (s, y, _), rho in zip(reversed(mem), reversed(rhos)):
        a = rho * (s * q).sum(-1)  # (n,)
        alphas.append(a)
        q -= a[:, None] * y
    # Initial scale: s'y / y'y of each request's newest valid pair; without one, a step of length `first`.
    gamma = first / g.norm(dim=-1).clamp_min(1e-12)
    found = torch.zeros(n, dtype=torch.bool, device=g.device)
    for s, y, v in reversed(mem):
        take = v & ~found
        gamma = torch.where(take, (s * y).sum(-1) / (y * y).sum(-1).clamp_min(1e-20), gamma)
        found |= v
    r = gamma[:, None] * q
    for (s, y, _), rho, a in zip(mem, rhos, reversed(alphas)):
        r += s * (a - rho * (y * r).sum(-1))[:, None]
    d = -r
    steepest = -g * (first / g.norm(dim=-1, keepdim=True).clamp_min(1e-12))
    return torch.where(((d * g).sum(-1) < 0)[:, None], d, steepest)


def minimize(f: Objective, w: torch.Tensor, evals: int, stop_prob: float, history: int = 8,
             first: float = 0.5, c1: float = 1e-4, on_eval: Callable[[], None] | None = None) -> torch.Tensor:
    """Minimise n independent objectives with one evaluation of all of them per iteration.

    Args:
        f: w -> (loss per request (n,) differentiable in w, probability per request (n,)). Request
            i's loss must depend on w[i] only.
        w: (n, ...) leaf tensor with requires_grad, the start; left at each request's last
            accepted point.
        evals: evaluations at most (each one forward and backward pass).
        stop_prob: a request stops moving once its probability exceeds this; the loop ends when
            every request has.
        history: curvature pairs kept per request.
        first: length (in units of w) of the first step, along the steepest descent.
        c1: Armijo's sufficient-decrease constant.
        on_eval: called after each evaluation (progress).

    Returns:
        Probability per request at its returned point (n,).
    """
    n = w.shape[0]
    mem: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    step = torch.ones(n)
    done = torch.zeros(n, dtype=torch.bool)
    prev = None  # (x, loss, grad, probs) at the last accepted point
    for _ in range(evals):
        w.grad = None
        loss, probs = f(w)
        loss.sum().backward()
        if on_eval:
            on_eval()
        with torch.no_grad():
            x, g = w.detach().reshape(n, -1).clone(), w.grad.reshape(n, -1).clone()
            loss, probs = loss.detach().cpu(), probs.detach().cpu()
            if prev is not None:
                xp, lp, gp, pp = prev
                ok = done | (loss <= lp + c1 * (gp * (x - xp)).sum(-1).cpu())
                keep = ok.to(x.device)[:, None]
                x, g = torch.where(keep, x, xp), torch.where(keep, g, gp)
                loss, probs = torch.where(ok, loss, lp), torch.where(ok, probs, pp)
                step = torch.where(ok, torch.ones(n), step * 0.5)
                s, y = x - xp, g - gp
                mem = (mem + [(s, y, (ok & ((s * y).sum(-1).cpu() > 1e-12)).to(x.device))])[-history:]
            done |= probs > stop_prob
            prev = (x, loss, g, probs)
            if bool(done.all()):
                break
            d = _direction(g, mem, first)
            moved = torch.where(done, torch.zeros(n), step).to(x.device)
            w.copy_((x + moved[:, None] * d).reshape(w.shape))
    if prev is None:  # no evaluation allowed: w stays where it started
        return torch.zeros(n)
    with torch.no_grad():
        w.copy_(prev[0].reshape(w.shape))
    return prev[3]
