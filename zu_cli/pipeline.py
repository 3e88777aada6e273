"""The only place stages are chained: run_unlearn (load -> templates -> targets -> stats -> solve -> write)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .config import Hyper
from .console import Output
from .errors import UsageError

# Above this many requests the closed form keeps too few neighbours (SmolLM2-135M: 92 % kept at
# 10 facts, 61.5 % at 20 held-out ones, 58 % at 50) where --multi keeps 80 % at 50
# (docs/method.md): say so, rather than switch variants behind the user's back.
CLOSED_FORM_MANY = 10


@dataclass
class UnlearnOptions:
    """What ``zu unlearn`` was asked to do (parsed CLI options)."""

    model: Path
    forget: Path
    out: Path
    layers: str | None = None
    neutral: str = "eos"
    stats_corpus: str | None = None
    retain: Path | None = None  # facts to keep: their prompts join the general statistics
    device_map: str = "auto"
    max_memory: str | None = None
    offload_dir: str | None = None
    dtype: str = "auto"
    force: bool = False
    receipt: Path | None = None
    include_requests: bool = False
    key: Path | None = None
    multi: bool = False  # the gradient variant (§2.8); hp.solver picks Adam or the exact solve
    signer: Any = None  # a keys.SigningKey given by a library caller instead of --key


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
    keyid: str = ""
    pinned: list[str] = field(default_factory=list)  # settings a known model's architecture entry pinned
    variant: str = "closed-form"  # or multi-gradient / multi-exact, as the manifest's edit.variant


def run_unlearn(opts: UnlearnOptions, hp: Hyper, out: Output) -> UnlearnResult:
    """Edit a checkpoint so it forgets the requests, write it with its manifest (design §2-3).

    Raises:
        ZuError subclasses: bad input (2), checkpoint problems (3), numerical failure (5); nothing
        is written in any of these cases.
    """
    import torch

    from . import edit, manifest, update
    from .arch import known_settings, num_layers, resolve_layers
    from .checkpoint import check_out, load_model, open_checkpoint, write_checkpoint
    from .keys import load_signing_key
    from .requests import load_requests
    from .keep import keep_prompts, solve_moments
    from .text import neutral_ids
    from .probes import probe, token_ranks

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    requests = load_requests(opts.forget)
    keep = keep_prompts(load_requests(opts.retain) if opts.retain else [], requests)
    ckpt = open_checkpoint(opts.model)
    check_out(ckpt, opts.out, opts.force)  # refuse before any expensive work
    key = opts.signer or load_signing_key(opts.key)
    receipt = opts.receipt or opts.out.parent / f"{opts.out.name}.zu-receipt.json"
    if receipt.resolve().is_relative_to(opts.out.resolve()):
        raise UsageError(f"--receipt {receipt}: inside --out; the salt must stay with the operator")
    if not opts.multi and len(requests) > CLOSED_FORM_MANY:
        out.warn(f"{len(requests)} requests with the closed form, which removes one output direction per request: "
                 f"with more than {CLOSED_FORM_MANY} it keeps fewer neighbours and more perplexity than --multi "
                 "(docs/method.md, 'Closed form vs --multi')")
    spec = ckpt.spec
    n_layers = num_layers(spec, ckpt.config)
    auto = (opts.layers or "").strip().lower() == "auto"
    layers, how = resolve_layers(None if auto else opts.layers, spec, ckpt.config, n_layers, multi=opts.multi)
    model, tok = load_model(ckpt, opts.device_map, opts.max_memory, opts.offload_dir, opts.dtype)
    targets_neutral = neutral_ids(tok, requests, opts.neutral)
    source_digests = manifest.dir_digests(ckpt.path)
    source = manifest.sha256_file_list(source_digests)
    located = None
    if auto:
        from .locate import TraceSettings, locate

        st = TraceSettings(seed=hp.seed)
        scores, _ = locate(model, tok, spec, n_layers, requests, st, len(layers), source, out)
        layers, how = scores.window, "auto (causal tracing)"
        located = {"effect": [round(e, 5) for e in scores.effect], "window": scores.window,
                   "settings": asdict(st), "requests_traced": len(scores.requests)}
    # what was measured best for this model's window, where the user set nothing
    hp, pinned, sens_kind = known_settings(spec, ckpt.config, n_layers, layers, hp, opts.multi)
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
    z, z_prob, sensitive = edit.edit_targets(model, tok, spec, requests, layers, templates, targets_neutral, hp,
                                             sens_kind, out)
    t["targets"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    g, kk, corpus_digest = solve_moments(model, tok, spec, layers, biases, hp, opts.stats_corpus, source, keep, out,
                                         keys=opts.multi, closed=not opts.multi, requests=requests)
    t["statistics"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    solver = update.multi_solver(kk, hp) if opts.multi else update.closed_form_solver(g, hp)
    ups = update.edit_layers(model, tok, spec, requests, layers, weights, biases, z, sensitive, templates, hp, solver,
                             out)
    new_w = {u.layer: u.new for u in ups}
    with update.applied(model, spec, new_w, biases):
        after = probe(model, tok, queries)
        ranks = token_ranks(model, tok, [r.prompt for r in requests], targets_neutral)
    t["solve"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    variant = f"multi-{hp.solver}" if opts.multi else "closed-form"
    edited = {u.name: (u.new.T if spec.transposed else u.new).to(raw[u.layer].dtype) for u in ups}
    salt = manifest.new_salt()
    commits = manifest.commitments(requests, salt)
    per_req = [{"id": r.id, "tag": out.redact(r.target, r.id), "recalled_before": b.top1, "recalled_after": a.top1,
                "target_rank_after": a.rank, "neutral_rank_after": nr}
               for r, b, a, nr in zip(requests, before, after, ranks)]
    predicate = {
        "versions": manifest.versions(),
        "source": {"path_name": ckpt.path.name, "files": source_digests},
        "edit": {"variant": variant, "layers": layers,
                 "layers_chosen_by": how, "neutral": opts.neutral, "hyperparameters": hp.to_dict(),
                 "pinned_by_model": pinned,
                 "sensitive": sens_kind, "seed": hp.seed, "context_templates": len(templates),
                 "stats_corpus": {"source": "file" if opts.stats_corpus else "model-samples",
                                  "digest": corpus_digest},
                 "keep": {"prompts": len(keep), "retain_file": manifest.sha256_file(opts.retain)
                          if opts.retain else None},
                 "neutral_target_prob_min": round(float(z_prob.min()), 4), "locate": located},
        "tensors": [{"name": u.name, "shape": list(edited[u.name].shape), "dtype": str(edited[u.name].dtype),
                     "sha256_before": manifest.sha256_tensor(raw[u.layer]),
                     "sha256_after": manifest.sha256_tensor(edited[u.name]), "rel_change": round(u.rel_change, 6),
                     "solver": u.info}
                    for u in ups],
        "requests": {"count": n, "commitments": commits} if not opts.include_requests
        else {"count": n, "commitments": commits, "plaintext": [r.canonical() for r in requests]},
        "probes": {"recalled_before": sum(b.top1 for b in before), "recalled_after": sum(a.top1 for a in after),
                   "neutral_top1_after": sum(r == 0 for r in ranks), "total": n},
    }
    write_checkpoint(ckpt, opts.out, edited, force=opts.force,
                     finalize=lambda tmp: manifest.write_manifest(tmp, predicate, key))
    manifest.write_receipt(receipt, salt, commits)
    t["write"] = time.perf_counter() - t0
    return UnlearnResult(out=opts.out, layers=layers, layers_how=how,
                         updates=[{"layer": u.layer, "name": u.name, "rel_change": u.rel_change, **u.info} for u in ups],
                         requests=per_req, timings={k: round(v, 2) for k, v in t.items()}, receipt=receipt,
                         keyid=key.keyid, pinned=pinned, variant=variant)


@dataclass
class VerifyOptions:
    """What ``zu verify`` was asked to do."""

    model: Path
    forget: Path | None = None
    public_key: Path | None = None
    require_key: bool = False
    baseline: Path | None = None
    retain: Path | None = None
    text: Path | None = None
    deep: bool = False
    criteria: Any = None  # verify.Criteria; None = defaults
    device_map: str = "auto"
    dtype: str = "auto"


def run_verify(opts: VerifyOptions, out: Output):
    """Integrity of the manifest first (when there is one), then the probes (when ``--forget`` is given).

    Returns:
        A VerifyReport; its ``exit_code`` is 4 on an integrity failure (probes are then skipped),
        1 when a probe fails, else 0.

    Raises:
        ZuError subclasses for bad input (2) or an unreadable checkpoint (3).
    """
    import gc

    from . import manifest
    from .checkpoint import load_model, open_checkpoint
    from .integrity import check_integrity
    from .keys import load_public_key
    from .probes import read_text
    from .requests import load_requests
    from .verify import Criteria, VerifyReport, deep_report, judge, measure, metrics

    crit = opts.criteria or Criteria()
    pub = load_public_key(opts.public_key) if opts.public_key else None
    requests = load_requests(opts.forget) if opts.forget else []
    retain = load_requests(opts.retain) if opts.retain else []
    report = VerifyReport(model=str(opts.model))
    has_manifest = (opts.model / manifest.ENVELOPE).exists() or (opts.model / manifest.MANIFEST).exists()
    if has_manifest or opts.forget is None or pub is not None or opts.require_key:
        report.integrity = check_integrity(opts.model, pub, opts.require_key)
        report.warnings += report.integrity.warnings
        if not report.integrity.ok or opts.forget is None:
            return report
    else:
        report.warnings.append(f"{opts.model}: no zu manifest; integrity not checked")
    text = read_text(opts.text) if (opts.text or opts.baseline) else None
    measured = {}
    for role, path in (("after", opts.model), ("base", opts.baseline)):
        if path is None:
            continue
        ckpt = open_checkpoint(path)
        model, tok = load_model(ckpt, opts.device_map, None, None, opts.dtype)
        out.info(f"probing {path} ({len(requests)} requests, {len(retain)} retained facts)")
        measured[role] = measure(model, tok, ckpt.spec, requests, retain, text, opts.deep, crit)
        del model  # one model in memory at a time
        gc.collect()
    after, base = measured["after"], measured.get("base")
    report.requests, report.retain = judge(requests, retain, after, base, crit, out)
    report.metrics = metrics(after, base, crit)
    if opts.deep:
        report.deep = deep_report(requests, after, base, crit, out)
    return report


def run_prove(model: Path, receipt: Path, forget: Path, out: Output) -> list[dict[str, Any]]:
    """Which requests in ``forget`` the edit in ``model`` covered, shown redacted unless ``--reveal``.

    Raises:
        IntegrityError: the manifest does not verify or the receipt is another edit's (exit 4).
    """
    from .errors import IntegrityError
    from .integrity import check_integrity, prove, read_manifest
    from .requests import load_requests

    report = check_integrity(Path(model))
    if not report.ok:
        raise IntegrityError(report.problems[0])
    requests = load_requests(forget)
    rows = prove(read_manifest(model), receipt, requests)
    return [{**row, "tag": out.redact(r.target, r.id)} for row, r in zip(rows, requests)]


@dataclass
class LocateOptions:
    """What ``zu locate`` was asked to do."""

    model: Path
    forget: Path
    num_layers: int = 3
    settings: Any = None  # locate.TraceSettings; None = defaults
    device_map: str = "auto"
    dtype: str = "auto"


def run_locate(opts: LocateOptions, out: Output):
    """Causal tracing of the requests on the checkpoint; the suggested window of ``num_layers`` layers.

    Returns:
        (LayerScores with a redacted ``tag`` per request, whether they came from the cache).
    """
    from . import manifest
    from .arch import num_layers
    from .checkpoint import load_model, open_checkpoint
    from .locate import TraceSettings, locate
    from .requests import load_requests

    requests = load_requests(opts.forget)
    ckpt = open_checkpoint(opts.model)
    n_layers = num_layers(ckpt.spec, ckpt.config)
    if not 1 <= opts.num_layers <= n_layers:
        raise UsageError(f"--num-layers {opts.num_layers}: expected 1-{n_layers}")
    model, tok = load_model(ckpt, opts.device_map, None, None, opts.dtype)
    source = manifest.sha256_file_list(manifest.dir_digests(ckpt.path))
    scores, cached = locate(model, tok, ckpt.spec, n_layers, requests, opts.settings or TraceSettings(),
                            opts.num_layers, source, out)
    by_id = {r.id: r for r in requests}
    for q in scores.requests:
        q["tag"] = out.redact(by_id[q["id"]].target, q["id"])
    return scores, cached
