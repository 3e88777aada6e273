"""Keys, neutral targets and sensitive vectors (design §2.1-2.5): what every solver in update.py needs."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from .arch import ArchSpec, num_layers
from .budget import bytes_per_token, model_bytes, optim_dtype, plan_batches, trim_heap
from .config import Hyper
from .console import Output
from .delta import mean_by, optimize_deltas
from .hooks import TraceDict
from .quantise import format_list, quantised_copies
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


@torch.no_grad()
def outputs_at(model, tok, rows: Rows, modules: list[str], n: int, inputs: bool = False,
               chunk: int = 16, replay=None) -> dict[str, torch.Tensor]:
    """Each module's output (or input) at the lookup token, averaged per request over its rows.

    Rows are run ``chunk`` at a time: a pass's transient activations grow with its rows (60
    rows of SmolLM2 took 100 MB more), and only the lookup token's vector is kept. Each row is cut
    after its lookup token: in a causal model the tokens after it cannot change it, and a
    prompt's words after the subject were a quarter of the tokens these passes ran. ``replay``
    (a ``hooks.LayerReplay`` already ``at`` this pass) skips the layers an earlier pass over the
    same rows recorded.

    Returns:
        module -> (n, dim) float64 on CPU.
    """
    picked: dict[str, list[torch.Tensor]] = {m: [] for m in modules}
    for b in range(0, len(rows.seqs), chunk):
        seqs = [s[:at + 1] for s, at in zip(rows.seqs[b:b + chunk], rows.lookup[b:b + chunk])]
        batch = left_pad(seqs, tok.pad_token_id, input_device(model))
        look = torch.tensor(rows.lookup[b:b + chunk]) + batch.offset.cpu()
        with replay.chunk(b // chunk) if replay else contextlib.nullcontext(), \
                TraceDict(model, modules, retain_input=inputs, retain_output=not inputs, stop=True) as td:
            model(**batch.kwargs())
        for m in modules:
            x = as_tokens(td[m].input if inputs else td[m].output, *batch.ids.shape)  # (rows, seq, dim)
            picked[m].append(x[torch.arange(len(look)), look.to(x.device)].to(device="cpu", dtype=torch.float64))
    owner = torch.tensor(rows.owner)
    return {m: mean_by(owner, torch.cat(picked[m]), n) for m in modules}  # (n, dim)


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
    quantised = quantised_copies(model, hp.z_quant)
    parts = []
    for b in batches:
        parts.append(_targets_batch(model, tok, spec, requests[b], layers, templates, neutral[b], hp, sensitive, out,
                                    f" (requests {b.start + 1}-{b.stop} of {len(requests)})" if len(batches) > 1 else "",
                                    quantised))
        trim_heap()  # the next batch's peak then starts from what this one keeps, not what it freed
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            {l: torch.cat([p[2][l] for p in parts]) for l in layers})


def plan(model, tok, spec: ArchSpec, requests: list[Request], layers: list[int], templates: list[str],
         neutral: list[list[int]], hp: Hyper, sensitive: str) -> list[slice]:
    """The request batches of the targets stage: ``hp.batch_requests`` at a time, or (0) as many as
    keep about ``hp.activation_budget`` times the model's weight bytes for the backward pass.

    Args:
        requests, layers, templates, neutral, hp, sensitive: as for ``edit_targets``; the tokens a
            step runs per row (from the lookup token on when ``hp.prefix_cache``: the prefix is
            cached, not kept for the backward pass) and the layers back-propagated through (from
            the first edited layer when the sensitive vectors are pushed, else from the last) size
            each request.

    Returns:
        Consecutive slices over ``requests``.
    """
    pushed = sensitive != "output"  # a second optimisation, through the down-projections of every layer
    sizes = []
    for r, t in zip(requests, neutral):
        rows = build_rows(tok, [r], templates, [t])
        steps = [len(s) - l if hp.prefix_cache and l > 0 else len(s) for s, l in zip(rows.seqs, rows.lookup)]
        # +1 row: "{subject} is a"; a pushed row also holds the true answer.
        sizes.append((len(rows.seqs) + 1, max(steps) + (len(encode_target(tok, r.target)) if pushed else 0)))
    start = layers[0] if pushed else layers[-1]
    per_token = bytes_per_token(model, spec.down_proj_module(layers[0]), num_layers(spec, model.config) - start,
                                optim_dtype(input_device(model), hp.optim_dtype))
    per_token *= 1 + len(format_list(hp.z_quant))  # each quantised copy's pass is kept for the backward too
    return plan_batches(sizes, per_token, int(hp.activation_budget * model_bytes(model)), hp.batch_requests)


def _targets_batch(model, tok, spec: ArchSpec, requests: list[Request], layers: list[int], templates: list[str],
                   neutral: list[list[int]], hp: Hyper, sensitive: str, out: Output,
                   where: str = "", quantised: list = ()) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]]:
    """``edit_targets`` for one batch of requests (``quantised``: the copies of ``hp.z_quant``)."""
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
                                       avoid=_answer_tokens(tok, requests, z_rows),
                                       method=hp.z_optimizer, quantised=quantised)  # (n, L, d)
        return z, z_prob, _sensitive(model, tok, spec, requests, layers, templates, hp, sensitive, out, where)
    delta, _, z_prob = optimize_deltas(model, tok, spec, z_rows, kl_rows(tok, requests), [last], layers[-1], n, hp,
                                       hp.z_steps, hp.z_stop_prob, out, "neutral targets" + where,
                                       avoid=_answer_tokens(tok, requests, z_rows), method=hp.z_optimizer,
                                       quantised=quantised)
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
