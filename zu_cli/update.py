"""Solvers and the layer-by-layer edit (design §2.5, §2.7, §2.8): closed form or --multi.

Every solver maps one layer's (W, forget keys, targets, sensitive vectors) to a new W; the loop in
``edit_layers`` is shared, so both variants recompute keys on the already-edited model and round
to the checkpoint's dtype the same way.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F

from .arch import ArchSpec
from .config import Hyper
from .console import Output
from .edit import build_rows, outputs_at
from .errors import NumericalError, UsageError
from .hooks import LayerReplay, TraceDict, layers_return_tensors
from .quantise import Quantised, check_format, format_list, roundtrip
from .requests import Request
from .text import input_device
from .solve import (MultiWeights, closed_form, guard, multi_exact, multi_gradient, multi_loss, null_space, projector,
                    stochastic_round)


# One layer's solve: (layer, W (d, f), K_f (n, f) keys averaged over the templates, T (d, n),
# M_f (n, d)), all float64 -> (new W (d, f) float64, diagnostics).
Solver = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, Any]]]


def read_weights(ckpt, spec: ArchSpec, layers: list[int]) -> tuple[dict, dict, dict]:
    """The edited layers' down-projections as stored, as the solvers see them, and their biases.

    Returns:
        (layer -> weight exactly as stored (hashed for the manifest), layer -> W (d, f) in the
        output = W @ key orientation, layer -> bias float32 or None).
    """
    raw, weights, biases = {}, {}, {}
    for l in layers:
        raw[l] = ckpt.read_tensor(spec.down_proj_weight(l))
        weights[l] = raw[l].T if spec.transposed else raw[l]  # (d, f)
        bname = spec.down_proj_module(l) + ".bias"
        biases[l] = ckpt.read_tensor(bname).to(torch.float32) if spec.bias and bname in ckpt.weight_map else None
    return raw, weights, biases


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
        info: the solver's diagnostics (condition number, sensitive directions, null-space rank...).
    """

    layer: int
    name: str
    old: torch.Tensor
    new: torch.Tensor
    rel_change: float
    info: dict[str, Any] = field(default_factory=dict)


def closed_form_solver(g: dict[int, torch.Tensor], hp: Hyper) -> Solver:
    """The multiplicative closed form W <- D W (§2.4, §2.7).

    Args:
        g: layer -> G = E[v v^T] (d, d).
        hp: lambdas, epsilon and guards.
    """

    def solve(layer, w, k, t, sens):
        p, basis = projector(sens, hp.epsilon)
        d, rep = closed_form(w, g[layer], w @ k.T, t, p, hp.lambda_g, hp.lambda_f, hp.lambda_r, hp.max_cond,
                             hp.max_rel_change, hp.project_general)
        return d @ w, {"cond": rep.cond, "directions": basis.shape[1]}

    return solve


def multi_solver(kk: dict[int, torch.Tensor], hp: Hyper) -> Solver:
    """The additive update W <- W + D P_null of --multi (§2.8), by Adam or exactly (``hp.solver``).

    Args:
        kk: layer -> E[k k^T] (f, f) over general text.
        hp: null-space threshold, loss weights, Adam settings, guards.

    Raises (from the returned solver):
        NumericalError: an empty null space, non-finite values or too large a change (exit 5).
    """
    wt = MultiWeights(hp.multi_sensitive_weight, hp.multi_target_weight, hp.multi_norm_weight, hp.multi_general_weight)

    def solve(layer, w, k, t, sens):
        null = null_space(kk[layer], hp.null_threshold)
        if null.dim == 0:
            raise NumericalError(f"layer {layer}: E[k k^T] has no eigenvalue below {hp.null_threshold:g}; "
                                 "there is no null space to edit in", hint="raise null_threshold in --config")
        _, basis = projector(sens, hp.epsilon)
        steps = None
        if hp.solver == "exact":
            dw = multi_exact(w, k.T, t, basis, null, wt)
        else:
            dw, steps = multi_gradient(w, k.T, t, basis, null, wt, hp.multi_steps, hp.multi_lr)
        guard(w, w + dw, hp.max_rel_change)
        info = {"null_dim": null.dim, "directions": basis.shape[1], "steps": steps,
                "loss": float(multi_loss(dw, w, k.T, t, basis, wt, kk[layer])),
                "loss_before": float(multi_loss(torch.zeros_like(w), w, k.T, t, basis, wt, kk[layer]))}
        return w + dw, info

    return solve


def edit_layers(model, tok, spec: ArchSpec, requests: list[Request], layers: list[int], weights: dict[int, torch.Tensor],
                biases: dict[int, torch.Tensor | None], z: torch.Tensor, sensitive: dict[int, torch.Tensor],
                templates: list[str], hp: Hyper, solver: Solver, out: Output,
                replay: bool = True) -> list[LayerUpdate]:
    """Edit each layer in order, keys recomputed on the already-edited model (§2.5).

    Each pass after the first replays the layers below the layer edited last (unchanged by it:
    ``hooks.LayerReplay``), so a pass runs from there up instead of from the embeddings.

    Args:
        weights: layer -> W (d, f) as on disk, output = W @ key orientation. Its dtype is the
            stored one: a lower precision triggers rounding here, so later layers see, and
            compensate for, exactly what will be written.
        biases: layer -> down-projection bias or None.
        z: (n, d) neutral target hidden states at the last edited layer's output, or (n, layers, d)
            deltas of each edited down-projection's output (``edit.edit_targets``).
        sensitive: layer -> M_f (n, d) sensitive output vectors.
        templates: context templates for the keys.
        solver: ``closed_form_solver(...)`` or ``multi_solver(...)``.
        replay: False to run every pass from the embeddings (the same result; for tests).

    Returns:
        One LayerUpdate per layer.

    Raises:
        NumericalError: from the solver (exit 5).
    """
    n = len(requests)
    key_rows = build_rows(tok, requests, templates)
    bare = build_rows(tok, requests, ["{}"])
    last = spec.layer_module(layers[-1])
    gen = torch.Generator().manual_seed(hp.seed)
    # Replay needs the layers edited bottom up, and decoder layers that return a plain tensor.
    replay = replay and layers == sorted(set(layers)) and \
        layers_return_tensors(model, spec.layers, input_device(model))
    key_replay, h_replay = LayerReplay(model, spec.layers, replay), LayerReplay(model, spec.layers, replay)
    quantised = quantised_below(model, spec, layers[-1], hp.quant_keys)
    rounded: dict[tuple[str, int], torch.Tensor] = {}  # (format, layer) -> an edited weight's round trip
    done: dict[int, torch.Tensor] = {}
    updates = []
    for i, layer in enumerate(layers):
        mod = spec.down_proj_module(layer)
        with applied(model, spec, done, biases):
            k = outputs_at(model, tok, key_rows, [mod], n, inputs=True, replay=key_replay.at(layer))[mod]  # (n, f)
            h = outputs_at(model, tok, bare, [last], n, replay=h_replay.at(layer))[last] \
                if z.dim() == 2 else None  # (n, d)
        w = weights[layer].to(torch.float64)  # (d, f)
        if z.dim() == 3:  # per-layer deltas: this layer's output plus its own
            t = w @ k.T + z[:, i].to(torch.float64).T  # (d, n)
        else:  # the residual still missing, spread over the layers left
            t = w @ k.T + (z.to(torch.float64) - h).T / (len(layers) - i)  # (d, n)
        if quantised:  # the same residual asked of the keys a quantised copy computes (hp.quant_keys)
            kq = quant_keys(model, tok, spec, key_rows, n, layer, quantised, done, biases, rounded)  # (F n, f)
            t = torch.cat([t, w @ kq.T + (t - w @ k.T).repeat(1, len(quantised))], 1)  # (d, (1 + F) n)
            # Each key is asked for the full residual at full weight: with the weight shared among a
            # prompt's keys, neither is met (docs/results.md, "Attacks, measured").
            k = torch.cat([k, kq])
        new, info = solver(layer, w, k, t, sensitive[layer].to(torch.float64))
        if quantised:
            info = {**info, "quant_keys": len(quantised)}
        if hp.rounding == "stochastic":
            new = stochastic_round(new, weights[layer].dtype, gen)
        else:
            new = new.to(weights[layer].dtype)
        new = new.to(torch.float32)
        done[layer] = new
        old = weights[layer].to(torch.float32)
        updates.append(LayerUpdate(layer=layer, name=spec.down_proj_weight(layer), old=old, new=new,
                                   rel_change=float((new - old).norm() / old.norm()), info=info))
        out.info(f"layer {layer}: ||dW||/||W|| = {updates[-1].rel_change:.4f}, "
                 + ", ".join(f"{key} {val:.3g}" if isinstance(val, float) else f"{key} {val}"
                             for key, val in info.items()))
    return updates


def quantised_below(model, spec: ArchSpec, top: int, formats: str) -> list[Quantised]:
    """Quantised copies (``quantise.Quantised``) of every linear weight in decoder layers 0..``top``,
    one per format in ``formats`` (comma-separated; empty: none)."""
    prefix = spec.layers + "."

    def below(name: str) -> bool:
        rest = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
        return rest.isdigit() and int(rest) <= top

    out = [Quantised(model, f, below) for f in format_list(formats)]
    if any(not q.modules for q in out):
        raise UsageError(f"quant_keys: no weight in layers 0-{top} can be quantised to "
                         f"{next(q.fmt for q in out if not q.modules)} (rows must be whole blocks)")
    return out


def quant_keys(model, tok, spec: ArchSpec, rows, n: int, layer: int, quantised: list[Quantised],
               done: dict[int, torch.Tensor], biases: dict[int, torch.Tensor | None],
               rounded: dict[tuple[str, int], torch.Tensor]) -> torch.Tensor:
    """The forget keys of ``layer`` on quantised copies of the model, the layers edited so far included.

    Quantising the weights below an edit moves the keys it reads; an edit solved for these keys as
    well holds on the quantised model (docs/method.md, "Forgetting that survives quantisation").

    Args:
        rounded: (format, layer) -> the round trip of an edited weight, filled here as layers are
            done, so each is rounded once for all the layers above it.

    Returns:
        (len(quantised) * n, f) float64, format by format.
    """
    mod = spec.down_proj_module(layer)
    out = []
    for q in quantised:
        for l, w in done.items():
            if (q.fmt, l) not in rounded:
                rounded[q.fmt, l] = roundtrip(w, q.fmt) if w.shape[-1] % check_format(q.fmt) == 0 else w
        edited = {l: rounded[q.fmt, l] for l in done}
        with q.swapped(), applied(model, spec, edited, biases):
            out.append(outputs_at(model, tok, rows, [mod], n, inputs=True)[mod])
    return torch.cat(out)
