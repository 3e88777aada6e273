"""The only place stages are chained: run_unlearn (load -> templates -> targets -> stats -> solve -> write)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import Hyper
from .console import Output
from .errors import UsageError
from .requests import Request


@dataclass
class UnlearnOptions:
    """What ``zu unlearn`` was asked to do (parsed CLI options)."""

    model: Path
    forget: Path
    out: Path
    layers: str | None = None
    neutral: str = "eos"
    stats_corpus: str | None = None
    device_map: str = "auto"
    max_memory: str | None = None
    offload_dir: str | None = None
    dtype: str = "auto"
    force: bool = False
    receipt: Path | None = None
    include_requests: bool = False


@dataclass
class UnlearnResult:
    """What happened, for rendering and for tests."""

    out: Path
    layers: list[int]
    layers_how: str
    updates: list[dict[str, Any]]
    requests: list[dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)
    receipt: Path | None = None


def resolve_layers(text: str | None, spec, config, n_layers: int) -> tuple[list[int], str]:
    """``--layers 17,18,19`` or the architecture's default window.

    Raises:
        UsageError: malformed list or a layer outside the model (exit 2).
    """
    if not text:
        return spec.default_layers(n_layers, int(getattr(config, "hidden_size", 0) or 0)), "architecture default"
    try:
        layers = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError as exc:
        raise UsageError(f"--layers {text!r}: expected comma-separated layer numbers") from exc
    bad = [l for l in layers if not 0 <= l < n_layers]
    if not layers or bad:
        raise UsageError(f"--layers: layer {bad[0] if bad else text!r} outside the model (0-{n_layers - 1})")
    return layers, "--layers"


def neutral_ids(tok, requests: list[Request], default: str) -> list[list[int]]:
    """Token ids of each request's neutral target (``eos`` = the tokenizer's EOS).

    Raises:
        UsageError: ``eos`` asked for but the tokenizer has none (exit 2).
    """
    from .text import encode_target

    out = []
    for r in requests:
        text = r.neutral or default
        if text.lower() in ("eos", "<eos>"):
            if tok.eos_token_id is None:
                raise UsageError("--neutral eos: the tokenizer has no EOS token", hint="pass --neutral TEXT")
            out.append([tok.eos_token_id])
        else:
            out.append(encode_target(tok, text))
    return out


def collect_stats(model, tok, spec, layers, biases, hp: Hyper, corpus: str | None, source: str,
                  out: Output) -> tuple[dict[int, Any], str]:
    """G per edited layer from the cache, or from one pass over the corpus for every missing layer.

    Returns:
        (layer -> G, digest naming the corpus and its settings).
    """
    from .stats import corpus_tokens, load_cached, samples_digest, second_moments, stats_key, store_cached

    seqs = None
    if corpus is not None:  # a file's digest is only known once read (cheap next to a model pass)
        seqs, corpus_digest = corpus_tokens(model, tok, corpus, hp.stats_samples, hp.stats_len,
                                            hp.stats_max_tokens, hp.seed)
    else:
        corpus_digest = samples_digest(hp.stats_samples, hp.stats_len, hp.seed)
    keys = {l: stats_key(source, spec.down_proj_module(l), corpus_digest) for l in layers}
    g = {l: c for l in layers if (c := load_cached(keys[l])) is not None}
    missing = [l for l in layers if l not in g]
    if missing:
        if seqs is None:
            seqs, _ = corpus_tokens(model, tok, None, hp.stats_samples, hp.stats_len, hp.stats_max_tokens, hp.seed)
        mods = [spec.down_proj_module(l) for l in missing]
        fresh = second_moments(model, seqs, mods, {spec.down_proj_module(l): biases[l] for l in missing},
                               tok.pad_token_id, out)
        for l, m in zip(missing, mods):
            g[l] = fresh[m]
            store_cached(keys[l], fresh[m])
    return g, corpus_digest


def run_unlearn(opts: UnlearnOptions, hp: Hyper, out: Output) -> UnlearnResult:
    """Edit a checkpoint so it forgets the requests, write it with its manifest (design §2-3).

    Raises:
        ZuError subclasses: bad input (2), checkpoint problems (3), numerical failure (5); nothing
        is written in any of these cases.
    """
    import torch

    from . import edit, manifest
    from .arch import num_layers
    from .checkpoint import check_out, load_model, open_checkpoint, write_checkpoint
    from .requests import load_requests
    from .text import encode_target
    from .verify import probe, token_ranks

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    requests = load_requests(opts.forget)
    ckpt = open_checkpoint(opts.model)
    check_out(ckpt, opts.out, opts.force)  # refuse before any expensive work
    spec = ckpt.spec
    layers, how = resolve_layers(opts.layers, spec, ckpt.config, num_layers(spec, ckpt.config))
    model, tok = load_model(ckpt, opts.device_map, opts.max_memory, opts.offload_dir, opts.dtype)
    targets_neutral = neutral_ids(tok, requests, opts.neutral)
    source_digests = manifest.dir_digests(ckpt.path)
    source = manifest.sha256_file_list(source_digests)
    raw, weights, biases = {}, {}, {}
    for l in layers:
        raw[l] = ckpt.read_tensor(spec.down_proj_weight(l))  # as stored: hashed for the manifest
        weights[l] = raw[l].T if spec.transposed else raw[l]  # (d, f): output = W @ key
        bname = spec.down_proj_module(l) + ".bias"
        biases[l] = ckpt.read_tensor(bname).to(torch.float32) if spec.bias and bname in ckpt.weight_map else None
    t["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    templates = edit.context_templates(model, tok, hp)
    t["templates"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    n = len(requests)
    queries = [(r.prompt, r.target) for r in requests]
    before = probe(model, tok, queries)
    last = spec.layer_module(layers[-1])
    z_rows = edit.build_rows(tok, requests, templates, targets_neutral)
    delta, h, z_prob = edit.optimize_deltas(model, tok, spec, z_rows, edit.kl_rows(tok, requests), [last], layers[-1], n,
                                            hp, hp.z_steps,
                                            hp.z_stop_prob, out, "neutral targets")
    z = (h + delta)[:, 0]  # (n, d)
    true_rows = edit.build_rows(tok, requests, templates, [encode_target(tok, r.target) for r in requests])
    mods = [spec.down_proj_module(l) for l in layers]
    if hp.sensitive == "output":
        base_out = edit.outputs_at(model, tok, true_rows, mods, n)
        sensitive = {l: base_out[m].float() for l, m in zip(layers, mods)}
    else:
        sdelta, sbase, _ = edit.optimize_deltas(model, tok, spec, true_rows, None, mods, layers[0], n, hp,
                                                hp.sens_steps, 1.1, out, "sensitive directions", margin=True)
        push = sdelta if hp.sensitive == "delta" else sbase + sdelta
        sensitive = {l: push[:, i] for i, l in enumerate(layers)}
    t["targets"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    g, corpus_digest = collect_stats(model, tok, spec, layers, biases, hp, opts.stats_corpus, source, out)
    t["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ups = edit.edit_layers(model, tok, spec, requests, layers, weights, biases, g, z, sensitive, templates, hp, out)
    new_w = {u.layer: u.new for u in ups}
    with edit.applied(model, spec, new_w, biases):
        after = probe(model, tok, queries)
        ranks = token_ranks(model, tok, [r.prompt for r in requests], targets_neutral)
    t["solve"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    edited = {u.name: (u.new.T if spec.transposed else u.new).to(raw[u.layer].dtype) for u in ups}
    salt = manifest.new_salt()
    commits = manifest.commitments(requests, salt)
    per_req = [{"id": r.id, "tag": out.redact(r.target, r.id), "recalled_before": b.top1, "recalled_after": a.top1,
                "target_rank_after": a.rank, "neutral_rank_after": nr}
               for r, b, a, nr in zip(requests, before, after, ranks)]
    predicate = {
        "versions": manifest.versions(),
        "source": {"path_name": ckpt.path.name, "files": source_digests},
        "edit": {"variant": "closed-form", "layers": layers, "layers_chosen_by": how, "neutral": opts.neutral,
                 "hyperparameters": hp.to_dict(), "seed": hp.seed, "context_templates": len(templates),
                 "stats_corpus": {"source": "file" if opts.stats_corpus else "model-samples",
                                  "digest": corpus_digest},
                 "neutral_target_prob_min": round(float(z_prob.min()), 4)},
        "tensors": [{"name": u.name, "shape": list(edited[u.name].shape), "dtype": str(edited[u.name].dtype),
                     "sha256_before": manifest.sha256_tensor(raw[u.layer]),
                     "sha256_after": manifest.sha256_tensor(edited[u.name]), "rel_change": round(u.rel_change, 6)}
                    for u in ups],
        "requests": {"count": n, "commitments": commits} if not opts.include_requests
        else {"count": n, "commitments": commits, "plaintext": [r.canonical() for r in requests]},
        "probes": {"recalled_before": sum(b.top1 for b in before), "recalled_after": sum(a.top1 for a in after),
                   "neutral_top1_after": sum(r == 0 for r in ranks), "total": n},
        "signed": False,
    }
    write_checkpoint(ckpt, opts.out, edited, force=opts.force,
                     finalize=lambda tmp: manifest.write_manifest(tmp, predicate))
    receipt = opts.receipt or opts.out.parent / f"{opts.out.name}.zu-receipt.json"
    manifest.write_receipt(receipt, salt, commits)
    t["write"] = time.perf_counter() - t0
    return UnlearnResult(out=opts.out, layers=layers, layers_how=how,
                         updates=[{"layer": u.layer, "name": u.name, "rel_change": u.rel_change, "cond": u.cond,
                                   "directions": u.rank} for u in ups],
                         requests=per_req, timings={k: round(v, 2) for k, v in t.items()}, receipt=receipt)
