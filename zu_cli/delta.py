"""The delta optimisation (design §2.3-2.4): one additive vector per request, at its lookup token,
that makes the model emit a target (the reference's compute_z, batched over every request)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .arch import ArchSpec
from .budget import optim_autocast
from .config import Hyper
from .console import Output
from . import lbfgs
from .hooks import Trace, TraceDict, replay_below
from .prefix import RowGroups
from .text import as_tokens, input_device

if TYPE_CHECKING:
    from .edit import Rows
    from .quantise import Quantised


def mean_by(owner: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows of ``x`` (rows, ...) grouped by ``owner`` (rows,) into (n, ...)."""
    acc = torch.zeros((n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device).index_add_(0, owner, x)
    cnt = torch.bincount(owner, minlength=n).clamp_min(1).to(x.dtype)
    return acc / cnt.reshape((n,) + (1,) * (x.dim() - 1))


class _Passes:
    """Forward passes of every row group with each request's delta added at its rows' lookup tokens.

    ``delta`` (n, modules, d), set by the caller before a pass, is read by ``add_delta``, the output
    hook of each optimised module.
    """

    def __init__(self, model, spec: ArchSpec, groups: RowGroups, modules: list[str], owner: torch.Tensor,
                 start: int, keep: int):
        self.model, self.spec, self.groups, self.modules = model, spec, groups, modules
        self.owner, self.start, self.keep = owner, start, keep
        self.delta: torch.Tensor | None = None
        self.part = groups.parts[0]  # the group being run
        self.recorded: dict[int, list[torch.Tensor]] | None = None  # module -> per group (k, d), first pass only
        self.inputs: list[torch.Tensor] = []  # per group: the input of layer ``start``, replayed by every step
        self.replayable = False

    def add_delta(self, output: torch.Tensor, name: str, _inp) -> torch.Tensor:
        """Output hook: the module's output plus the delta at the lookup token of each row of the group."""
        i = self.modules.index(name)
        shape = output.shape
        output = as_tokens(output, *self.part.batch.shape)  # (k, S, d)
        at = (torch.arange(len(self.part.rows), device=output.device), self.part.batch.look.to(output.device))
        if self.recorded is not None:
            self.recorded[i].append(output[at].detach())
        d = self.delta[:, i].to(device=output.device, dtype=output.dtype)  # (n, d)
        output = output.clone()
        output[at] += d[self.owner[self.part.rows].to(output.device)]
        return output.reshape(shape)

    @torch.no_grad()
    def first(self) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """The pass before any step (``delta`` zero): it records what the steps replay.

        Returns:
            (logits (rows, keep, vocab) float32, module index -> its output at the lookup (rows, d)),
            both in row order.
        """
        self.recorded = {i: [] for i in range(len(self.modules))}
        logits = []
        for part in self.groups.parts:
            self.part = part
            with Trace(self.model, self.spec.layer_module(self.start), retain_input=True) as below:
                logits.append(self._logits(part))
            self.inputs.append(below.input)
            # Replaying the lower layers is exact only when a decoder layer returns a plain tensor.
            self.replayable = below.plain_output and self.start > 0
        base = {i: torch.cat(v)[self.groups.order] for i, v in self.recorded.items()}
        self.recorded = None
        return torch.cat(logits)[self.groups.order], base

    def step(self, cast) -> torch.Tensor:
        """One pass with the current deltas, layers below ``start`` replayed; logits (rows, keep, vocab) float32."""
        logits = []
        for part, below in zip(self.groups.parts, self.inputs):
            self.part = part
            replay = replay_below(self.model, self.spec.layers, self.start, below) if self.replayable \
                else contextlib.nullcontext()
            with replay, cast:
                logits.append(self._logits(part))
        return torch.cat(logits)[self.groups.order]

    def _logits(self, part) -> torch.Tensor:
        """The group's last ``keep`` logits (k, keep, vocab) float32. A group of rows shorter than
        ``keep`` (their targets are shorter too) gets unread columns in front."""
        logits = self.model(**part.batch.kwargs(), logits_to_keep=self.keep).logits.float()
        return F.pad(logits, (0, 0, self.keep - logits.shape[1], 0))


def _target_index(rows: "Rows", keep: int, dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per scored target token: its row, its column among the kept logits, its id (each (tokens,))."""
    tgt_row, tgt_col, tgt_id = [], [], []
    for r, t in enumerate(rows.targets):
        for j, tid in enumerate(t):
            tgt_row.append(r)
            tgt_col.append(keep - len(t) + j)
            tgt_id.append(tid)
    return tuple(torch.tensor(x, device=dev, dtype=torch.long) for x in (tgt_row, tgt_col, tgt_id))


def optimize_deltas(model, tok, spec: ArchSpec, rows: "Rows", kl: "Rows | None", modules: list[str], start: int,
                    n: int, hp: Hyper, steps: int, stop_prob: float, out: Output, label: str,
                    margin: bool = False, avoid: list[int] | None = None, method: str = "adam",
                    quantised: "list[Quantised] | tuple" = (),
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find one additive vector per (request, module) at the lookup token that makes the model emit
    each row's target (reference compute_z, batched over all requests).

    Rows are run in groups of similar length (``prefix.RowGroups``), and from their lookup token
    on only when ``hp.prefix_cache``; the result does not depend on the grouping.

    Args:
        rows: prompt rows with targets (their last len(target)-1 tokens appended).
        kl: "{subject} is a" rows whose next-token distribution should not move, or None.
        modules: modules whose output gets the vector (a decoder layer, or down-projections).
        start: index of the lowest decoder layer among ``modules``; layers below it are run once
            and replayed in the optimisation steps (their output cannot change).
        n: number of requests.
        hp: hyperparameters (lr, clamp, KL weight, weight decay).
        steps: optimiser steps (each one forward and backward pass of every row).
        stop_prob: a request's delta stops moving once its mean target probability exceeds this
            (the reference optimises one request at a time and stops each on its own); the
            loop ends when every request is there.
        margin: maximise the target's logit margin over the rest of the vocabulary instead of its
            log-probability. For pushing toward an answer the model already gives with
            probability ~1 the log-probability is flat (its gradient underflows to zero), the
            margin is not; only the push's direction is used.
        avoid: per row of ``rows``, a token (the true answer's first) whose probability where the
            target starts is pushed down with weight ``hp.z_answer`` (unlikelihood,
            -log(1 - p)); None or a zero weight: not used.
        method: ``adam`` (the reference: Adam at ``hp.z_lr``, the delta's norm clamped after each
            step) or ``lbfgs`` (a quasi-Newton step per request, ``lbfgs.minimize``, the clamp a
            smooth bound on the delta's norm).
        quantised: quantised copies of the model (``hp.z_quant``): each delta must also make its
            target on each of them, every step a pass of each (same loss, summed); a request
            stops once its lowest target probability exceeds ``stop_prob``.

    Returns:
        (delta (n, len(modules), d), base output at the lookup averaged over rows (n, len(modules), d),
        final target probability per request (n,), the lowest over the copies); float32 on CPU. The
        base outputs come from a float32 pass; only the optimisation steps run under ``hp.optim_dtype``.
    """
    allrows = rows if kl is None or not kl.seqs else type(rows)(
        rows.seqs + kl.seqs, rows.lookup + kl.lookup, rows.owner + kl.owner, rows.targets + kl.targets)
    n_main = len(rows.seqs)
    dev = input_device(model)
    groups = RowGroups(model, allrows.seqs, allrows.lookup, tok.pad_token_id, dev, cached=hp.prefix_cache)
    keep = max(len(t) for t in rows.targets)  # vocabulary projection only where a loss is taken
    tgt_row, tgt_col, tgt_id = _target_index(rows, keep, dev)
    use_avoid = avoid is not None and hp.z_answer > 0
    if use_avoid:  # (main rows,): where each row's target starts, and the answer token there
        av_col = torch.tensor([keep - len(t) for t in rows.targets], device=dev)
        av_id = torch.tensor(avoid, device=dev)
    own_all = torch.tensor(allrows.owner, device=dev)
    passes = _Passes(model, spec, groups, modules, own_all, start, keep)
    own = passes.owner[:n_main]
    active = [passes]  # the _Passes whose delta the hooks add (one per model copy)
    qgroups = []
    for q in quantised:  # each copy's own rows (their prefixes' KV cache), built before the hooks are in
        with q.swapped():
            qgroups.append(RowGroups(model, allrows.seqs, allrows.lookup, tok.pad_token_id, dev, cached=hp.prefix_cache))
    with TraceDict(model, modules, retain_output=False, detach=False,
                   edit_output=lambda o, name, inp: active[0].add_delta(o, name, inp)):
        passes.delta = torch.zeros(n, len(modules), 1, device=dev)  # broadcasts on the first pass
        logits0, base = passes.first()
        kl_ref = lambda lg: lg[n_main:, -1].log_softmax(-1).detach() if n_main < len(allrows.seqs) else None
        variants = [(passes, contextlib.nullcontext, kl_ref(logits0))]
        for q, qg in zip(quantised, qgroups):  # the copy's own replayed inputs and "{subject} is a" reference
            with q.swapped():
                qp = _Passes(model, spec, qg, modules, own_all, start, keep)
                qp.delta, active[0] = passes.delta, qp
                variants.append((qp, q.swapped, kl_ref(qp.first()[0])))
                active[0] = passes
        dim = base[0].shape[-1]
        # (n, modules, d): each request's unedited output at the lookup, averaged over templates.
        base_avg = torch.stack([mean_by(own, base[i][:n_main].float().to(dev), n) for i in range(len(modules))], 1)
        hnorm = base_avg.norm(dim=-1)  # (n, modules)
        cast = optim_autocast(dev, hp.optim_dtype, model)
        # Per-token values -> mean per row (over its target tokens) -> mean per request (over templates).
        per_req = lambda x: mean_by(own, mean_by(tgt_row, x, n_main), n)

        def objective(logp: torch.Tensor, ref: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            """One copy's terms from its log-probabilities (rows, keep, vocab): (target loss with the KL
            term (n,), answer unlikelihood (n,) or 0, target probability (n,))."""
            tok_lp = logp[tgt_row, tgt_col, tgt_id]  # (target tokens,)
            if margin:  # the target's log-odds against the rest of the vocabulary (log-softmax cancels)
                sel = logp[tgt_row, tgt_col]  # (target tokens, vocab)
                tok_obj = tok_lp - sel.scatter(-1, tgt_id[:, None], float("-inf")).logsumexp(-1)
            else:
                tok_obj = tok_lp
            loss = -per_req(tok_obj)
            if ref is not None:  # KL(reference || current) per "{subject} is a" row, mean per request
                kl = (ref.exp() * (ref - logp[n_main:, -1])).sum(-1)
                loss = loss + hp.z_kl * mean_by(passes.owner[n_main:], kl, n)
            unlikely = 0.0
            if use_avoid:
                p_ans = logp[torch.arange(n_main, device=dev), av_col, av_id].exp()  # (main rows,)
                unlikely = hp.z_answer * mean_by(own, -torch.log1p(-p_ans.clamp(max=1 - 1e-6)), n)
            return loss, unlikely, per_req(tok_lp.detach()).exp().cpu()

        def losses(delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            """One pass of each copy with ``delta`` (n, modules, d): (loss per request (n,), target
            probability (n,), the lowest over the copies)."""
            terms = []
            for vp, ctx, ref in variants:
                vp.delta, active[0] = delta, vp
                with ctx():
                    terms.append(objective(vp.step(cast).log_softmax(-1), ref))
            active[0] = passes
            loss = terms[0][0]
            for t in terms[1:]:
                loss = loss + t[0]
            loss = loss + hp.z_weight_decay * ((delta.norm(dim=-1) / hnorm.clamp_min(1e-6)) ** 2).mean(-1)
            for t in terms:
                loss = loss + t[1]
            return loss, torch.stack([t[2] for t in terms]).amin(0)

        limit = (hp.z_clamp * hnorm)[..., None]  # (n, modules, 1)
        with out.progress(label, steps) as advance:
            if method == "lbfgs":
                # delta = limit * w / sqrt(1 + |w|^2): the clamp as a smooth bound, so a quasi-Newton
                # step needs no projection (a projected step breaks its curvature pairs).
                squash = lambda w: limit * w / (1 + (w * w).sum(-1, keepdim=True)).sqrt()
                w = torch.zeros(n, len(modules), dim, device=dev, requires_grad=True)
                probs = lbfgs.minimize(lambda x: losses(squash(x)), w, steps, stop_prob, on_eval=advance)
                delta = squash(w).detach()
            else:
                delta, probs = _adam(losses, hnorm, limit, dim, steps, stop_prob, hp.z_lr, advance)
    return delta.float().cpu(), base_avg.cpu(), probs


def _adam(losses, hnorm: torch.Tensor, limit: torch.Tensor, dim: int, steps: int, stop_prob: float, lr: float,
          advance) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's optimiser: Adam on the deltas, each clamped to ``limit`` after every step.

    Args:
        losses: delta (n, modules, d) -> (loss per request (n,), target probability (n,)).
        hnorm: the hidden state's norm per request and module (n, modules).
        limit: the clamp (n, modules, 1).
        dim: the delta's width d.

    Returns:
        (delta (n, modules, d), target probability per request (n,) before the last step).
    """
    n, m, _ = limit.shape
    # Adam moves each coordinate by about lr per step whatever the scale, so the delta is
    # parametrised in units of the hidden state's RMS: the reference's lr then means the same on a
    # model whose residual norms are 10 or 1000 (SmolLM2's are in the hundreds).
    unit = (hnorm / dim ** 0.5).detach()[..., None]  # (n, modules, 1)
    u = torch.zeros(n, m, dim, device=hnorm.device, requires_grad=True)
    opt = torch.optim.Adam([u], lr=lr)
    probs = torch.zeros(n)
    for _ in range(steps):
        opt.zero_grad()
        loss, probs = losses(u * unit)
        done = (probs > stop_prob).to(u.device)  # (n,)
        advance()
        if bool(done.all()):
            break
        loss.mean().backward()
        frozen = u.detach()[done].clone()
        opt.step()
        with torch.no_grad():  # clamp each delta's norm to a fraction of the hidden state's
            u[done] = frozen
            u.mul_((limit / (u * unit).norm(dim=-1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0))
    return (u * unit).detach(), probs
