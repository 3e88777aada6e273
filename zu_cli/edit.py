"""Keys, neutral targets and sensitive vectors (design §2.1-2.5): what every solver in update.py needs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from .arch import ArchSpec, num_layers
from .budget import bytes_per_token, model_bytes, optim_autocast, optim_dtype, plan_batches
from .config import Hyper
from .console import Output
from .hooks import Trace, TraceDict, replay_below
from .prefix import row_batch
from .requests import Request
from .text import as_tokens, encode, encode_target, input_device, left_pad, sample, subject_positions

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
    """One row per (request, template): the templated prompt, plus the target's tokens but the last.

    A subject that opens its prompt in one token ("Italy's capital,") would be read at position 0
    of the bare prompt: the attention sink, whose hidden state grows orders of magnitude larger
    than any other's in the upper layers (SmolLM2 layer 19: norm 24,000 against ~200) and does
    not change with the subject. Read there, one row swamped the template averages and the
    delta clamp that scale with them (the closed form went to a 635 % weight change), and an
    edit of that state would not reach the prompt anyway. Such a request is read at its
    prompt's last token in every row, as a request without a subject.
    """
    rows = Rows()
    for i, req in enumerate(requests):
        subject = req.subject if req.subject and lookup_index(tok, req.prompt, req.subject) > 0 else None
        for tpl in templates:
            text = tpl.format(req.prompt)
            ids = encode(tok, text)
            look = lookup_index(tok, text, subject)
            tgt = targets[i] if targets else []
            rows.seqs.append(ids + tgt[:-1])
            rows.lookup.append(look)
            rows.owner.append(i)
            rows.targets.append(tgt)
    return rows


def kl_rows(tok, requests: list[Request]) -> Rows:
    """"{subject} is a" per request with a subject: keeps the subject's other meaning (reference).

    A subject of one token would be read at position 0, the attention sink (see ``build_rows``):
    such a request gets no KL row.
    """
    rows = Rows()
    for i, req in enumerate(requests):
        if not req.subject:
            continue
        text = f"{req.subject} is a"
        look = lookup_index(tok, text, req.subject)
        if look > 0:
            rows.seqs.append(encode(tok, text))
            rows.lookup.append(look)
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
def outputs_at(model, tok, rows: Rows, modules: list[str], n: int, inputs: bool = False,
               chunk: int = 16) -> dict[str, torch.Tensor]:
    """Each module's output (or input) at the lookup token, averaged per request over its rows.

    Rows are run ``chunk`` at a time: a pass's transient activations grow with its rows (60
    rows of SmolLM2 took 100 MB more), and only the lookup token's vector is kept.

    Returns:
        module -> (n, dim) float64 on CPU.
    """
    picked: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    for b in range(0, len(rows.seqs), chunk):
        batch = left_pad(rows.seqs[b:b + chunk], tok.pad_token_id, input_device(model))
        look = torch.tensor(rows.lookup[b:b + chunk]) + batch.offset.cpu()
        with TraceDict(model, modules, retain_input=inputs, retain_output=not inputs, stop=True) as td:
            model(**batch.kwargs())
        for m in modules:
            x = as_tokens(td[m].input if inputs else td[m].output, *batch.ids.shape)  # (rows, seq, dim)
            picked[m].append(x[torch.arange(len(look)), look.to(x.device)].to(device="cpu", dtype=torch.float64))
    owner = torch.tensor(rows.owner)
    return {m: _mean_by(owner, torch.cat(picked[m]), n) for m in modules}  # (n, dim)


def optimize_deltas(model, tok, spec: ArchSpec, rows: Rows, kl: Rows | None, modules: list[str], start: int, n: int,
                    hp: Hyper, steps: int, stop_prob: float, out: Output, label: str,
                    margin: bool = False, avoid: list[int] | None = None,
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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

    Returns:
        (delta (n, len(modules), d), base output at the lookup averaged over rows (n, len(modules), d),
        final target probability per request (n,)); float32 on CPU. The base outputs come from a
        float32 pass; only the optimisation steps run under ``hp.optim_dtype``.
    """
    allrows = _concat(rows, kl) if kl is not None and kl.seqs else rows
    n_main = len(rows.seqs)
    dev = input_device(model)
    # Only the lookup token onwards depends on the delta: the prefixes run once (prefix.py).
    batch = row_batch(model, allrows.seqs, allrows.lookup, tok.pad_token_id, dev, cached=hp.prefix_cache)
    look = batch.look
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
    use_avoid = avoid is not None and hp.z_answer > 0
    if use_avoid:  # (main rows,): where each row's target starts, and the answer token there
        av_col = torch.tensor([keep - len(t) for t in rows.targets], device=dev)
        av_id = torch.tensor(avoid, device=dev)
    delta = None
    base: dict[int, torch.Tensor] = {}

    def add_delta(output, name, _inp):
        i = modules.index(name)
        shape = output.shape
        output = as_tokens(output, *batch.shape)
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
            logits0 = model(**batch.kwargs(), logits_to_keep=keep).logits.float()
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
        cast = optim_autocast(dev, hp.optim_dtype, model)
        # Per-token values -> mean per row (over its target tokens) -> mean per request (over templates).
        per_req = lambda x: _mean_by(own, _mean_by(tgt_row, x, n_main), n)
        with replay, out.progress(label, steps) as advance:
            for _ in range(steps):
                opt.zero_grad()
                delta = u * unit
                with cast:
                    logits = model(**batch.kwargs(), logits_to_keep=keep).logits.float()
                logp = logits.log_softmax(-1)
                tok_lp = logp[tgt_row, tgt_col, tgt_id]  # (target tokens,)
                if margin:
                    sel = logits[tgt_row, tgt_col]  # (target tokens, vocab)
                    rest = sel.scatter(-1, tgt_id[:, None], float("-inf")).logsumexp(-1)
                    tok_obj = sel.gather(-1, tgt_id[:, None])[:, 0] - rest
                else:
                    tok_obj = tok_lp
                probs = per_req(tok_lp.detach()).exp().cpu()
                done = (probs > stop_prob).to(dev)  # (n,)
                loss = -per_req(tok_obj).mean()
                if kl_ref is not None:
                    cur = logp[n_main:, -1]
                    loss = loss + hp.z_kl * F.kl_div(cur, kl_ref, log_target=True, reduction="batchmean")
                loss = loss + hp.z_weight_decay * ((delta.norm(dim=-1) / hnorm.clamp_min(1e-6)) ** 2).mean()
                if use_avoid:
                    p_ans = logp[torch.arange(n_main, device=dev), av_col, av_id].exp()  # (main rows,)
                    unlike = -torch.log1p(-p_ans.clamp(max=1 - 1e-6))
                    loss = loss + hp.z_answer * _mean_by(own, unlike, n).mean()
                advance()
                if bool(done.all()):
                    break
                loss.backward()
                frozen = u.detach()[done].clone()
                opt.step()
                with torch.no_grad():  # clamp each delta's norm to a fraction of the hidden state's
                    u[done] = frozen
                    limit = hp.z_clamp * hnorm
                    scale = (limit / (u * unit).norm(dim=-1).clamp_min(1e-12)).clamp(max=1.0)
                    u.mul_(scale[..., None])
        delta = u * unit
    return delta.detach().float().cpu(), base_avg.cpu(), probs


def sensitive_outputs(model, tok, spec: ArchSpec, requests: list[Request], layers: list[int],
                      templates: list[str]) -> dict[int, torch.Tensor]:
    """Each edited down-projection's output at the lookup token, averaged over templates (no optimisation).

    Returns:
        layer -> (n, d) float32 on CPU.
    """
    rows = build_rows(tok, requests, templates)
    mods = [spec.down_proj_module(l) for l in layers]
    res = outputs_at(model, tok, rows, mods, len(requests))
    return {l: res[m].float() for l, m in zip(layers, mods)}


def edit_targets(model, tok, spec: ArchSpec, requests: list[Request], layers: list[int], templates: list[str],
                 neutral: list[list[int]], hp: Hyper, sensitive: str,
                 out: Output) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """What every solver needs besides the keys: neutral targets z (§2.3) and sensitive vectors (§2.4).

    Requests are optimised in consecutive batches (``plan``): each request's delta depends only
    on its own rows (Adam is invariant to the loss's scale), so the result is the one big batch's,
    while the activations kept for the backward pass stay bounded.

    Args:
        requests: the forget requests (n).
        layers: edited layers, ascending.
        templates: context templates.
        neutral: token ids of each request's neutral target.
        hp: hyperparameters.
        sensitive: how the sensitive vectors are found (``Hyper.sensitive_kind``): ``output``,
            ``pushed`` or ``delta``.

    Returns:
        (z: (n, d) the hidden state at the last edited layer that emits the neutral target, or, for
        a family whose MLP output is normalised (``ArchSpec.mlp_output``), (n, len(layers), d)
        deltas of each edited down-projection's output,
        probability of the neutral target reached per request (n,),
        layer -> M_f (n, d) sensitive down-projection outputs), float32 on CPU.
    """
    batches = plan(model, tok, spec, requests, layers, templates, neutral, hp, sensitive)
    parts = [_targets_batch(model, tok, spec, requests[b], layers, templates, neutral[b], hp, sensitive, out,
                            f" (requests {b.start + 1}-{b.stop} of {len(requests)})" if len(batches) > 1 else "")
             for b in batches]
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            {l: torch.cat([p[2][l] for p in parts]) for l in layers})


def plan(model, tok, spec: ArchSpec, requests: list[Request], layers: list[int], templates: list[str],
         neutral: list[list[int]], hp: Hyper, sensitive: str) -> list[slice]:
    """The request batches of the targets stage: ``hp.batch_requests`` at a time, or (0) as many as
    keep about ``hp.activation_budget`` times the model's weight bytes for the backward pass.

    Args:
        requests, layers, templates, neutral, hp, sensitive: as for ``edit_targets``; the rows'
            lengths and the layers back-propagated through (from the first edited layer when the
            sensitive vectors are pushed, else from the last) size each request.

    Returns:
        Consecutive slices over ``requests``.
    """
    pushed = sensitive != "output"  # a second optimisation, through the down-projections of every layer
    rows = [build_rows(tok, [r], templates, [t]) for r, t in zip(requests, neutral)]
    sizes = [(len(z.seqs) + 1, max(len(s) for s in z.seqs) + (len(encode_target(tok, r.target)) if pushed else 0))
             for z, r in zip(rows, requests)]  # +1: the "{subject} is a" row
    start = layers[0] if pushed else layers[-1]
    per_token = bytes_per_token(model, spec.down_proj_module(layers[0]), num_layers(spec, model.config) - start,
                                optim_dtype(input_device(model), hp.optim_dtype))
    return plan_batches(sizes, per_token, int(hp.activation_budget * model_bytes(model)), hp.batch_requests)


def _targets_batch(model, tok, spec: ArchSpec, requests: list[Request], layers: list[int], templates: list[str],
                   neutral: list[list[int]], hp: Hyper, sensitive: str, out: Output,
                   where: str = "") -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """``edit_targets`` for one batch of requests."""
    n = len(requests)
    last = spec.layer_module(layers[-1])
    z_rows = build_rows(tok, requests, templates, neutral)
    if spec.mlp_output == "normed":
        # A norm between the MLP and the residual stream (Gemma 2/3): a residual offset cannot be
        # spread over the layers by adding to their outputs, so the deltas are found where the
        # edit acts, at every edited down-projection at once; each layer's target is its output
        # plus its own delta (update.edit_layers).
        mods = [spec.down_proj_module(l) for l in layers]
        z, _, z_prob = optimize_deltas(model, tok, spec, z_rows, kl_rows(tok, requests), mods, layers[0], n, hp,
                                       hp.z_steps, hp.z_stop_prob, out, "neutral targets" + where,
                                       avoid=_answer_tokens(tok, requests, z_rows))  # (n, L, d)
        return z, z_prob, _sensitive(model, tok, spec, requests, layers, templates, hp, sensitive, out, where)
    delta, _, z_prob = optimize_deltas(model, tok, spec, z_rows, kl_rows(tok, requests), [last], layers[-1], n, hp,
                                       hp.z_steps, hp.z_stop_prob, out, "neutral targets" + where,
                                       avoid=_answer_tokens(tok, requests, z_rows))
    # z is the bare prompt's own state plus the delta, as in the reference (MEMIT's compute_z):
    # update.edit_layers measures the residual z - h on the bare prompt, so a template-averaged
    # base here would add the bare prompt's offset from that average to every target (at an
    # attention-sink token it cancelled the edit outright).
    bare = outputs_at(model, tok, build_rows(tok, requests, ["{}"]), [last], n)[last]  # (n, d) float64
    z = bare.float() + delta[:, 0]  # (n, d)
    return z, z_prob, _sensitive(model, tok, spec, requests, layers, templates, hp, sensitive, out, where)


def _answer_tokens(tok, requests: list[Request], rows: Rows) -> list[int]:
    """The first token of each row's request's true answer (what ``z_answer`` pushes down)."""
    first = [encode_target(tok, r.target)[0] for r in requests]
    return [first[i] for i in rows.owner]


def _sensitive(model, tok, spec: ArchSpec, requests: list[Request], layers: list[int], templates: list[str],
               hp: Hyper, sensitive: str, out: Output, where: str) -> dict[int, torch.Tensor]:
    """The sensitive vectors M_f per layer (n, d): the outputs, or pushed toward the true target."""
    n = len(requests)
    if sensitive == "output":
        return sensitive_outputs(model, tok, spec, requests, layers, templates)
    # The answer's direction: push each layer's output further toward the true target (reference).
    true_rows = build_rows(tok, requests, templates, [encode_target(tok, r.target) for r in requests])
    mods = [spec.down_proj_module(l) for l in layers]
    sdelta, sbase, _ = optimize_deltas(model, tok, spec, true_rows, None, mods, layers[0], n, hp, hp.sens_steps, 1.1,
                                       out, "sensitive directions" + where, margin=True)
    push = sdelta if sensitive == "delta" else sbase + sdelta
    return {l: push[:, i] for i, l in enumerate(layers)}
