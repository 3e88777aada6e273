"""Causal tracing (design §2.9, ROME): where does the model recall a fact? -> LayerScores.

The subject's token embeddings are corrupted with seeded Gaussian noise (3x their standard
deviation, measured on the model); then, one layer (or a small window) at a time, the clean
MLP output at the subject's last token is restored, and the target's probability that comes
back is the layer's indirect effect. All layers and noise samples of a request run as one batch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .errors import UsageError
from .hooks import TraceDict
from .text import encode, encode_target, input_device, subject_positions

KINDS = ("mlp", "hidden")
ROWS = 64  # rows per forward pass: bounds activation memory on long prompts


@dataclass(frozen=True)
class TraceSettings:
    """Tracing settings (part of the cache key).

    Attributes:
        samples: noise samples per request.
        noise: noise std as a multiple of the subject embeddings' std.
        window: layers restored together, centred on the scored layer.
        kind: ``mlp`` (the down-projection's output at the subject's last token) or ``hidden``
            (the residual stream entering the layer, at every subject token).
        seed: noise seed.
    """

    samples: int = 5
    noise: float = 3.0
    window: int = 1
    kind: str = "mlp"
    seed: int = 0


# A window is suggested only where restoring one layer brings back at least this share of what
# the corruption took, on average over the traced requests: below it, the "peak" is noise.
MIN_RECOVERED = 0.05


@dataclass
class LayerScores:
    """Per-layer effects, for every request and on average.

    Attributes:
        layers: number of layers.
        effect: mean indirect effect per layer (probability points recovered), over the traced requests.
        recovered: mean fraction of the corruption's loss recovered per layer, (p_l - p_c)/(p_clean - p_c).
        requests: per request: id, p_clean, p_corrupt, recalled (the answer is the model's top
            prediction; only those are traced), effect per layer.
        noise_std: the absolute noise std used.
        window: the suggested consecutive layers ([] when ``found`` is false).
        found: a causal effect above noise was found.
        reason: why not, when ``found`` is false.
    """

    layers: int
    effect: list[float]
    recovered: list[float]
    requests: list[dict]
    noise_std: float
    window: list[int]
    found: bool = True
    reason: str = ""

    @property
    def traced(self) -> list[dict]:
        """The requests whose answer the model gave, the only ones averaged."""
        return [q for q in self.requests if q["recalled"]]


def judge_effect(per: list[dict], n_layers: int, num_layers: int) -> tuple[list[float], list[float], list[int], bool,
                                                                           str]:
    """Average the traced requests' effects; suggest a window only where there is an effect.

    Args:
        per: per request ``{"recalled", "p_clean", "p_corrupt", "effect"}``.
        n_layers: the model's layer count.
        num_layers: the window's width.

    Returns:
        (mean effect per layer, mean recovered share per layer, window or [], found, reason).
    """
    traced = [q for q in per if q["recalled"]]
    if not traced:
        zero = [0.0] * n_layers
        return zero, zero, [], False, "the model does not give the answer of any request: nothing to trace"
    effect = [sum(q["effect"][l] for q in traced) / len(traced) for l in range(n_layers)]
    rec = [sum(q["effect"][l] / max(q["p_clean"] - q["p_corrupt"], 1e-6) for q in traced) / len(traced)
           for l in range(n_layers)]
    if max(rec) < MIN_RECOVERED:
        return effect, rec, [], False, (f"no layer restores {MIN_RECOVERED:.0%} of what corrupting the subject "
                                        f"takes (best {max(rec):.1%})")
    return effect, rec, best_window(effect, num_layers), True, ""


def best_window(effect: list[float], k: int) -> list[int]:
    """The ``k`` consecutive layers with the largest summed effect (earliest on ties)."""
    k = max(1, min(k, len(effect)))
    sums = [sum(effect[i:i + k]) for i in range(len(effect) - k + 1)]
    start = max(range(len(sums)), key=lambda i: (sums[i], -i))
    return list(range(start, start + k))


def restore_sets(n_layers: int, window: int) -> list[list[int]]:
    """For each scored layer, the layers restored together (a window centred on it, clipped)."""
    half = window // 2
    return [list(range(max(0, l - half), min(n_layers, l - half + window))) for l in range(n_layers)]


@torch.no_grad()
def embed_std(model, tok, spec, requests) -> float:
    """Standard deviation of the subjects' token embeddings as the embedding module outputs them
    (scaled embeddings such as Gemma's included)."""
    embed = model.get_submodule(spec.embed)
    dev = embed.weight.device
    vals = [embed(torch.tensor([encode(tok, r.prompt)], device=dev))[0, subject_positions(tok, r.prompt, r.subject)]
            for r in requests]
    return float(torch.cat(vals).float().std())


@torch.no_grad()
def trace_request(model, tok, spec, n_layers: int, req, noise_std: float, st: TraceSettings,
                  restore: list[list[int]] | None = None) -> dict:
    """Trace one request.

    Args:
        model, tok, spec: model, tokenizer, architecture data.
        n_layers: number of decoder layers.
        req: a Request with a subject.
        noise_std: absolute noise std.
        st: settings.
        restore: the layer sets to score (default: ``restore_sets(n_layers, st.window)``).

    Returns:
        ``{"p_clean", "p_corrupt", "p_restored": [per set], "recalled"}``: probabilities of the
        target's first token, and whether it is the clean prompt's top prediction.
    """
    dev = input_device(model)
    ids = encode(tok, req.prompt)
    subj = subject_positions(tok, req.prompt, req.subject)
    last = max(subj)
    target = encode_target(tok, req.target)[0]
    restore = restore if restore is not None else restore_sets(n_layers, st.window)
    gen = torch.Generator().manual_seed(st.seed + int(hashlib.sha256(req.id.encode()).hexdigest()[:8], 16))
    noise = torch.randn(st.samples, len(subj), _width(model, spec), generator=gen) * noise_std  # (S, n_subj, d)
    names = _restore_modules(spec, n_layers, st.kind)
    x = torch.tensor([ids], device=dev)
    with TraceDict(model, names) as td:
        clean_logits = model(input_ids=x, logits_to_keep=1).logits[0, -1].float()
        clean = {n: td[n].output[0].clone() for n in names}  # n -> (seq, d)
    p_clean = float(clean_logits.softmax(-1)[target])
    recalled = int(clean_logits.argmax()) == target
    # Row plan: S corrupted rows without restoration, then S rows per restore set.
    plan = [(s, ()) for s in range(st.samples)] + [(s, tuple(rs)) for rs in restore for s in range(st.samples)]
    probs = []
    for b in range(0, len(plan), ROWS):
        chunk = plan[b:b + ROWS]
        rows = torch.tensor([s for s, _ in chunk])

        def edit(out, name, _inp, chunk=chunk, rows=rows):
            out = out.clone()
            if name == spec.embed:
                out[:, subj] += noise[rows].to(out.device, out.dtype)
            layer = names.index(name) if st.kind == "hidden" else names.index(name) - 1  # embed: -1 / 0
            pos = subj if st.kind == "hidden" else [last]
            for r, (_, rs) in enumerate(chunk):
                if layer in rs:
                    out[r, pos] = clean[name][pos].to(out.device, out.dtype)
            return out

        with TraceDict(model, names, retain_output=False, edit_output=edit):
            logits = model(input_ids=x.expand(len(chunk), -1), logits_to_keep=1).logits[:, -1].float()
        probs.append(logits.softmax(-1)[:, target].cpu())
    p = torch.cat(probs).view(-1, st.samples).mean(1)  # (1 + len(restore),)
    return {"p_clean": p_clean, "p_corrupt": float(p[0]), "p_restored": p[1:].tolist(), "recalled": recalled}


def _width(model, spec) -> int:
    return int(model.get_submodule(spec.embed).weight.shape[-1])


def _restore_modules(spec, n_layers: int, kind: str) -> list[str]:
    """``[embed] + per layer l`` the module whose output is restored for layer l.

    ``mlp``: layer l's down-projection. ``hidden``: the residual entering layer l is the output of
    layer l-1 (the embeddings for l = 0), so restoring it at layer 0 undoes the corruption.
    """
    if kind not in KINDS:
        raise UsageError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "mlp":
        return [spec.embed] + [spec.down_proj_module(l) for l in range(n_layers)]
    return [spec.embed] + [spec.layer_module(l) for l in range(n_layers - 1)]


def cache_path(source: str, requests, st: TraceSettings) -> Path:
    """Where the scores for this checkpoint, these requests and settings are cached."""
    from .stats import cache_dir

    key = json.dumps({"source": source, "requests": [r.canonical() for r in requests], **asdict(st), "v": 2},
                     sort_keys=True)
    return cache_dir() / "locate" / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")


def locate(model, tok, spec, n_layers: int, requests, st: TraceSettings, num_layers: int, source: str,
           out) -> tuple[LayerScores, bool]:
    """Trace every request (or reuse the cached result) and suggest a window of ``num_layers`` layers.

    Args:
        model, tok, spec: model, tokenizer, architecture data.
        n_layers: the model's layer count.
        requests: requests to trace; those without a subject are skipped (nothing to corrupt).
        st: settings.
        num_layers: width of the suggested window.
        source: digest naming the checkpoint (cache key).
        out: Output, for progress and warnings.

    Returns:
        (scores, whether they came from the cache).

    Raises:
        UsageError: no request has a subject (exit 2).
    """
    usable = [r for r in requests if r.subject]
    if len(usable) < len(requests):
        out.warn(f"{len(requests) - len(usable)} request(s) without a subject skipped: tracing corrupts the subject")
    if not usable:
        raise UsageError("causal tracing needs requests with a 'subject'", hint="add the subject to each request")
    path = cache_path(source, usable, st)
    if path.is_file():
        doc = json.loads(path.read_text())
        return _scores(doc["requests"], doc["layers"], doc["noise_std"], num_layers), True
    noise_std = st.noise * embed_std(model, tok, spec, usable)
    per = []
    with out.progress("causal tracing", len(usable)) as advance:
        for r in usable:
            t = trace_request(model, tok, spec, n_layers, r, noise_std, st)
            per.append({"id": r.id, "p_clean": t["p_clean"], "p_corrupt": t["p_corrupt"], "recalled": t["recalled"],
                        "effect": [p - t["p_corrupt"] for p in t["p_restored"]]})
            advance()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"layers": n_layers, "noise_std": noise_std, "requests": per}))
    os.replace(tmp, path)
    return _scores(per, n_layers, noise_std, num_layers), False


def _scores(per: list[dict], n_layers: int, noise_std: float, num_layers: int) -> LayerScores:
    effect, rec, window, found, reason = judge_effect(per, n_layers, num_layers)
    return LayerScores(layers=n_layers, effect=effect, recovered=rec, requests=per, noise_std=noise_std,
                       window=window, found=found, reason=reason)
