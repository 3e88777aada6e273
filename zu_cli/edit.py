"""Keys, neutral targets and sensitive vectors (design §2.1-2.5) -> a new down-projection per layer."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F

from .arch import ArchSpec
from .config import Hyper
from .console import Output
from .hooks import Trace, TraceDict, replay_below
from .requests import Request
from .text import as_tokens, encode, input_device, left_pad, sample, subject_positions

TEMPLATE_SEEDS = ["The", "Therefore", "Because", "I", "You"]


@dataclass
class Rows:
    """Flattened (request x template) token sequences.

    Attributes:
        seqs: token ids per row.
        lookup: unpadded index of the lookup token (the subject's last token) per row.
        owner: request index per row.
        n_target: number of trailing target tokens whose prediction is scored (0: none).
        targets: those target ids per row.
    """

    seqs: list[list[int]] = field(default_factory=list)
    lookup: list[int] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    targets: list[list[int]] = field(default_factory=list)


def lookup_index(tok, text: str, subject: str | None) -> int:
    """Index of the subject's last token in ``encode(tok, text)``; the last token without a subject.

    Offsets from a fast tokenizer decide (``text.subject_positions``), so BPE merges and
    leading-space variants are handled.
    """
    if not subject:
        return len(encode(tok, text)) - 1
    return max(subject_positions(tok, text, subject))


def context_templates(model, tok, hp: Hyper) -> list[str]:
    """The bare ``"{}"`` plus ``hp.n_prefixes`` short model-generated prefixes (deterministic per seed)."""
    if hp.n_prefixes <= 0:
        return ["{}"]
    gen = torch.Generator().manual_seed(hp.seed)
    seeds = [TEMPLATE_SEEDS[i % len(TEMPLATE_SEEDS)] for i in range(hp.n_prefixes)]
    texts = [tok.decode(s, skip_special_tokens=True) for s in sample(model, tok, seeds, hp.prefix_len, gen)]
    # Braces would break str.format; the reference swaps them for spaces too.
    return ["{}"] + [t.replace("{", " ").replace("}", " ").strip() + ". {}" for t in texts]


def build_rows(tok, requests: list[Request], templates: list[str], targets: list[list[int]] | None = None) -> Rows:
    """One row per (request, template): the templated prompt, plus the target's tokens but the last."""
    rows = Rows()
    for i, req in enumerate(requests):
        for tpl in templates:
            text = tpl.format(req.prompt)
            ids = encode(tok, text)
            look = lookup_index(tok, text, req.subject)
            tgt = targets[i] if targets else []
            rows.seqs.append(ids + tgt[:-1])
            rows.lookup.append(look)
            rows.owner.append(i)
            rows.targets.append(tgt)
    return rows


def kl_rows(tok, requests: list[Request]) -> Rows:
    """"{subject} is a" per request with a subject: keeps the subject's other meaning (reference)."""
    rows = Rows()
    for i, req in enumerate(requests):
        if req.subject:
            text = f"{req.subject} is a"
            rows.seqs.append(encode(tok, text))
            rows.lookup.append(lookup_index(tok, text, req.subject))
            rows.owner.append(i)
            rows.targets.append([])
    return rows


def _mean_by(owner: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """Mean of the rows of ``x`` (rows, ...) grouped by ``owner`` (rows,) into (n, ...)."""
    acc = torch.zeros((n,) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device).index_add_(0, owner, x)
    cnt = torch.bincount(owner, minlength=n).clamp_min(1).to(x.dtype)
    return acc / cnt.reshape((n,) + (1,) * (x.dim() - 1))


def _concat(a: Rows, b: Rows) -> Rows:
    return Rows(a.seqs + b.seqs, a.lookup + b.lookup, a.owner + b.owner, a.targets + b.targets)


@torch.no_grad()
def outputs_at(model, tok, rows: Rows, modules: list[str], n: int, inputs: bool = False) -> dict[str, torch.Tensor]:
    """Each module's output (or input) at the lookup token, averaged per request over its rows.

    Returns:
        module -> (n, dim) float64 on CPU.
    """
    batch = left_pad(rows.seqs, tok.pad_token_id, input_device(model))
    look = torch.tensor(rows.lookup) + batch.offset.cpu()
    owner = torch.tensor(rows.owner)
    with TraceDict(model, modules, retain_input=inputs, retain_output=not inputs, stop=True) as td:
        model(**batch.kwargs())
    res = {}
    for m in modules:
        x = as_tokens(td[m].input if inputs else td[m].output, *batch.ids.shape).to(device="cpu", dtype=torch.float64)
        res[m] = _mean_by(owner, x[torch.arange(len(rows.seqs)), look], n)  # (n, dim)
    return res


def optimize_deltas(model, tok, spec: ArchSpec, rows: Rows, kl: Rows | None, modules: list[str], start: int, n: int,
                    hp: Hyper, steps: int, stop_prob: float, out: Output, label: str,
                    margin: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Find one additive vector per (request, module) at the lookup token that makes the model emit
    each row's target (reference compute_z, batched over all requests).

    Args:
        rows: prompt rows with targets (their last len(target)-1 tokens appended).
        kl: "{subject} is a" rows whose next-token distribution should not move, or None.
        modules: modules whose output gets the vector (a decoder layer, or down-projections).
        start: index of the lowest decoder layer among ``modules``; layers below it are run once
            and replayed in the optimisation steps (their output cannot change).
        n: number of requests.
        hp: hyperparameters (lr, clamp, KL weight, weight decay).
        steps: Adam steps.
        stop_prob: stop once every request's mean target probability exceeds this.
        margin: maximise the target's logit margin over the rest of the vocabulary instead of its
            log-probability. For pushing toward an answer the model already gives with
            probability ~1 the log-probability is flat (its gradient underflows to zero), the
            margin is not; only the push's direction is used.

    Returns:
        (delta (n, len(modules), d), base output at the lookup averaged over rows (n, len(modules), d),
        final target probability per request (n,)); float32 on CPU.
    """
    allrows = _concat(rows, kl) if kl is not None and kl.seqs else rows
    n_main = len(rows.seqs)
    dev = input_device(model)
    batch = left_pad(allrows.seqs, tok.pad_token_id, dev)
    look = (torch.tensor(allrows.lookup) + batch.offset.cpu()).to(dev)
    owner = torch.tensor(allrows.owner, device=dev)
    keep = max(len(t) for t in rows.targets)  # vocabulary projection only where a loss is taken
    # Positions (within the kept logits) predicting each target token, and the token ids.
    tgt_row, tgt_col, tgt_id = [], [], []
    for r, t in enumerate(rows.targets):
        for j, tid in enumerate(t):
            tgt_row.append(r)
            tgt_col.append(keep - len(t) + j)
            tgt_id.append(tid)
    tgt_row, tgt_col, tgt_id = (torch.tensor(x, device=dev) for x in (tgt_row, tgt_col, tgt_id))
    delta = None
    base: dict[int, torch.Tensor] = {}

    def add_delta(output, name, _inp):
        i = modules.index(name)
        shape = output.shape
        output = as_tokens(output, *batch.ids.shape)
        if i not in base:
            base[i] = output[torch.arange(len(allrows.seqs), device=output.device), look.to(output.device)].detach()
        d = delta[:, i].to(device=output.device, dtype=output.dtype)[owner.to(output.device)]  # (rows, d)
        output = output.clone()
        output[torch.arange(len(allrows.seqs), device=output.device), look.to(output.device)] += d
        return output.reshape(shape)

    kl_ref = None
    probs = torch.zeros(n)
    with TraceDict(model, modules, retain_output=False, edit_output=add_delta, detach=False):
        with torch.no_grad(), Trace(model, spec.layer_module(start), retain_input=True) as first:
            delta = torch.zeros(n, len(modules), 1, device=dev)  # broadcasts on the first pass
            logits0 = model(**batch.kwargs(), logits_to_keep=keep, use_cache=False).logits.float()
        # Replaying the lower layers is exact only when a decoder layer returns a plain tensor.
        replay = replay_below(model, spec.layers, start, first.input) if first.plain_output and start > 0 \
            else contextlib.nullcontext()
        dim = base[0].shape[-1]
        own = owner[:n_main]
        # (n, modules, d): each request's unedited output at the lookup, averaged over templates.
        base_avg = torch.stack([_mean_by(own, base[i][:n_main].float().to(dev), n) for i in range(len(modules))], 1)
        hnorm = base_avg.norm(dim=-1)  # (n, modules)
        if n_main < len(allrows.seqs):
            kl_ref = logits0[n_main:, -1].log_softmax(-1).detach()
        # Adam moves each coordinate by about lr per step whatever the scale, so the delta is
        # parametrised in units of the hidden state's RMS: the reference's lr then means the same
        # on a model whose residual norms are 10 or 1000 (SmolLM2's are in the hundreds).
        unit = (hnorm / dim ** 0.5).detach()[..., None]  # (n, modules, 1)
        u = torch.zeros(n, len(modules), dim, device=dev, requires_grad=True)
        opt = torch.optim.Adam([u], lr=hp.z_lr)
        # Per-token values -> mean per row (over its target tokens) -> mean per request (over templates).
        per_req = lambda x: _mean_by(own, _mean_by(tgt_row, x, n_main), n)
        with replay, out.progress(label, steps) as advance:
            for _ in range(steps):
                opt.zero_grad()
                delta = u * unit
                logits = model(**batch.kwargs(), logits_to_keep=keep, use_cache=False).logits.float()
                logp = logits.log_softmax(-1)
                tok_lp = logp[tgt_row, tgt_col, tgt_id]  # (target tokens,)
                if margin:
                    sel = logits[tgt_row, tgt_col]  # (target tokens, vocab)
                    rest = sel.scatter(-1, tgt_id[:, None], float("-inf")).logsumexp(-1)
                    tok_obj = sel.gather(-1, tgt_id[:, None])[:, 0] - rest
                else:
                    tok_obj = tok_lp
                probs = per_req(tok_lp.detach()).exp().cpu()
                prob = float(probs.min())
                loss = -per_req(tok_obj).mean()
                if kl_ref is not None:
                    cur = logp[n_main:, -1]
                    loss = loss + hp.z_kl * F.kl_div(cur, kl_ref, log_target=True, reduction="batchmean")
                loss = loss + hp.z_weight_decay * ((delta.norm(dim=-1) / hnorm.clamp_min(1e-6)) ** 2).mean()
                advance()
                if prob > stop_prob:
                    break
                loss.backward()
                opt.step()
                with torch.no_grad():  # clamp each delta's norm to a fraction of the hidden state's
                    limit = hp.z_clamp * hnorm
                    scale = (limit / (u * unit).norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
                    u.mul_(scale[..., None])
        delta = u * unit
    return delta.detach().float().cpu(), base_avg.cpu(), probs


@contextlib.contextmanager
def applied(model, spec: ArchSpec, new_weights: dict[int, torch.Tensor],
            biases: dict[int, torch.Tensor | None]) -> Iterator[None]:
    """Run the model as if layer l's down-projection weight were ``new_weights[l]`` (d, f).

    The weights in the model are not touched (they may be offloaded); the module's output is
    recomputed from its input instead: v = W_new k + b.
    """
    names = {spec.down_proj_module(l): l for l in new_weights}
    cache: dict[tuple, torch.Tensor] = {}

    def replace(output, name, inp):
        key = (name, inp.device, inp.dtype)
        if key not in cache:
            cache[key] = new_weights[names[name]].to(device=inp.device, dtype=inp.dtype)
        b = biases.get(names[name])
        return F.linear(inp, cache[key], None if b is None else b.to(device=inp.device, dtype=inp.dtype))

    if not names:
        yield
        return
    with TraceDict(model, list(names), retain_output=False, edit_output=replace):
        yield


@dataclass
class LayerUpdate:
    """The edit of one down-projection.

    Attributes:
        layer: layer index.
        name: state-dict key of the weight.
        old: W before, (d, f) float32 in the output = W @ key orientation.
        new: W after, (d, f) float32, already rounded to the checkpoint's dtype when it is lower.
        rel_change: ||new - old|| / ||old||.
        cond: condition number of the normal equations.
        rank: number of sensitive directions removed.
    """

    layer: int
    name: str
    old: torch.Tensor
    new: torch.Tensor
    rel_change: float
    cond: float
    rank: int


def edit_layers(model, tok, spec: ArchSpec, requests: list[Request], layers: list[int], weights: dict[int, torch.Tensor],
                biases: dict[int, torch.Tensor | None], g: dict[int, torch.Tensor], z: torch.Tensor,
                sensitive: dict[int, torch.Tensor], templates: list[str], hp: Hyper,
                out: Output) -> list[LayerUpdate]:
    """Closed-form edit of each layer in order, keys recomputed on the already-edited model (§2.5, §2.7).

    Args:
        weights: layer -> W (d, f) as on disk, output = W @ key orientation. Its dtype is the
            stored one: a lower precision triggers rounding here, so later layers see, and
            compensate for, exactly what will be written.
        biases: layer -> down-projection bias or None.
        g: layer -> G (d, d).
        z: (n, d) neutral target hidden states at the last edited layer's output.
        sensitive: layer -> M_f (n, d) sensitive output vectors.
        templates: context templates for the keys.

    Returns:
        One LayerUpdate per layer.

    Raises:
        NumericalError: from the solve (exit 5).
    """
    from .solve import closed_form, projector, stochastic_round

    n = len(requests)
    key_rows = build_rows(tok, requests, templates)
    bare = build_rows(tok, requests, ["{}"])
    last = spec.layer_module(layers[-1])
    gen = torch.Generator().manual_seed(hp.seed)
    done: dict[int, torch.Tensor] = {}
    updates = []
    for i, layer in enumerate(layers):
        mod = spec.down_proj_module(layer)
        with applied(model, spec, done, biases):
            k = outputs_at(model, tok, key_rows, [mod], n, inputs=True)[mod]  # (n, f)
            h = outputs_at(model, tok, bare, [last], n)[last]  # (n, d)
        w = weights[layer].to(torch.float64)  # (d, f)
        v_f = w @ k.T  # (d, n)
        t = v_f + (z.to(torch.float64) - h).T / (len(layers) - i)  # spread the residual over the layers left
        p, basis = projector(sensitive[layer], hp.epsilon)
        d, rep = closed_form(w, g[layer], v_f, t, p, hp.lambda_g, hp.lambda_f, hp.lambda_r, hp.max_cond,
                             hp.max_rel_change, hp.project_general)
        new = d @ w
        if hp.rounding == "stochastic":
            new = stochastic_round(new, weights[layer].dtype, gen)
        else:
            new = new.to(weights[layer].dtype)
        new = new.to(torch.float32)
        done[layer] = new
        old = weights[layer].to(torch.float32)
        updates.append(LayerUpdate(layer=layer, name=spec.down_proj_weight(layer), old=old, new=new,
                                   rel_change=float((new - old).norm() / old.norm()), cond=rep.cond,
                                   rank=basis.shape[1]))
        out.info(f"layer {layer}: ||dW||/||W|| = {updates[-1].rel_change:.4f}, cond {rep.cond:.2e}, "
                 f"{basis.shape[1]} sensitive directions")
    return updates
