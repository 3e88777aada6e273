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

    model: str | Path  # a directory or a hub id org/name[@revision]
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
    calibrate: bool = True  # find the model's own settings when --layers is not given (calibrate.py)
    signer: Any = None  # a keys.SigningKey given by a library caller instead of --key
    previous: list[Path] = field(default_factory=list)  # earlier rounds' requests: held at their edited outputs
    card: bool = True  # write or update the output's model card (README.md)


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
    calibrated: list[str] = field(default_factory=list)  # settings the model's calibration set
    variant: str = "closed-form"  # or multi-gradient / multi-exact, as the manifest's edit.variant

    @property
    def counts(self) -> dict[str, int]:
        """How many requests were forgotten, are still recalled, or were never recalled (``request_status``)."""
        return status_counts(self.requests)


def request_status(recalled_before: bool, recalled_after: bool) -> str:
    """One request's outcome: ``forgotten``, ``still recalled`` or ``not recalled before the edit``.

    A fact the model did not answer before the edit was not forgotten by it, and is never counted so.
    """
    if not recalled_before:
        return NOT_KNOWN
    return "still recalled" if recalled_after else "forgotten"


NOT_KNOWN = "not recalled before the edit"


def status_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    """``{"forgotten", "still_recalled", "not_recalled_before", "total"}`` over rows with a ``status``."""
    by = [r["status"] for r in rows]
    return {"forgotten": by.count("forgotten"), "still_recalled": by.count("still recalled"),
            "not_recalled_before": by.count(NOT_KNOWN), "total": len(by)}


def run_unlearn(opts: UnlearnOptions, hp: Hyper, out: Output) -> UnlearnResult:
    """Edit a checkpoint so it forgets the requests, write it with its manifest (design §2-3).

    Every option and input file is checked before the model is loaded.

    Raises:
        ZuError subclasses: bad input (2), checkpoint problems (3), numerical failure (5), an
        output that cannot be written (6); nothing is written in any of these cases.
    """
    from . import edit, manifest, update
    from .arch import check_layers, num_layers, parse_layers
    from .checkpoint import check_out, open_checkpoint, write_checkpoint
    from .loading import check_load_options, load_model
    from .keep import keep_prompts, solve_moments
    from .calibrate import settings
    from .keys import load_signing_key
    from .budget import optim_dtype
    from .probes import probe, token_ranks
    from .requests import load_requests
    from .text import input_device, neutral_ids

    t: dict[str, float] = {}
    t0 = time.perf_counter()
    check_load_options(opts.device_map, opts.dtype, opts.max_memory)
    asked = parse_layers(opts.layers)  # None (the model's own window), "auto" or layer numbers
    requests = load_requests(opts.forget)
    earlier = [r for path in opts.previous for r in load_requests(path)]
    keep = keep_prompts(load_requests(opts.retain) if opts.retain else [], requests, earlier)
    key = opts.signer or load_signing_key(opts.key)
    receipt = opts.receipt or opts.out.parent / f"{opts.out.name}.zu-receipt.json"
    if receipt.resolve().is_relative_to(opts.out.resolve()):
        raise UsageError(f"--receipt {receipt}: inside --out; the salt must stay with the operator")
    with out.stage("opening the checkpoint"):
        ckpt = open_checkpoint(opts.model)
    check_out(ckpt, opts.out, opts.force)  # refuse before any expensive work
    spec = ckpt.spec
    n_layers = num_layers(spec, ckpt.config)
    if isinstance(asked, list):
        check_layers(asked, n_layers)
    if not opts.multi and len(requests) > CLOSED_FORM_MANY:
        out.warn(f"{len(requests)} requests with the closed form, which removes one output direction per request: "
                 f"with more than {CLOSED_FORM_MANY} it keeps fewer neighbours and more perplexity than --multi "
                 "(docs/method.md, 'Closed form vs --multi')")
    with out.stage("loading the model"):
        model, tok = load_model(ckpt, opts.device_map, opts.max_memory, opts.offload_dir, opts.dtype)
    targets_neutral = neutral_ids(tok, requests, opts.neutral)
    source_digests = manifest.dir_digests(ckpt.path)
    lineage = input_lineage(ckpt.path, manifest.sha256_file_list(source_digests), out)
    # Every round of a chain uses the base model's calibration and statistics: a round's edit is
    # small, and recomputing them per round would make round 16 cost what 16 first runs cost.
    source = lineage["base_fingerprint"]
    layers, how, located, profile = _choose_layers(asked, ckpt, model, tok, n_layers, requests, hp, source, opts, out)
    hp, calibrated, sens_kind = settings(profile, layers, hp, opts.multi)
    raw, weights, biases = update.read_weights(ckpt, spec, layers)
    t["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    with out.stage("context templates"):
        templates = edit.context_templates(model, tok, hp)
    t["templates"] = time.perf_counter() - t0

    t0 = time.perf_counter()
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
    with update.applied(model, spec, {u.layer: u.new for u in ups}, biases):
        after = probe(model, tok, queries)
        ranks = token_ranks(model, tok, [r.prompt for r in requests], targets_neutral)
    t["solve"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    variant = f"multi-{hp.solver}" if opts.multi else "closed-form"
    edited = {u.name: (u.new.T if spec.transposed else u.new).to(raw[u.layer].dtype) for u in ups}
    per_req = [{"id": r.id, "tag": out.redact(r.target, r.id), "recalled_before": b.top1, "recalled_after": a.top1,
                "status": request_status(b.top1, a.top1), "target_rank_after": a.rank, "neutral_rank_after": nr}
               for r, b, a, nr in zip(requests, before, after, ranks)]
    salt = manifest.new_salt()
    commits = manifest.commitments(requests, salt)
    predicate = manifest.edit_predicate(
        created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), lineage=lineage,
        source={"path_name": ckpt.name, "files": source_digests, **({"hub": ckpt.hub} if ckpt.hub else {})},
        edit={"variant": variant, "layers": layers, "layers_chosen_by": how, "neutral": opts.neutral,
              "hyperparameters": hp.to_dict(), "from_calibration": calibrated, "sensitive": sens_kind,
              "optim_dtype_used": optim_dtype(input_device(model), hp.optim_dtype),
              "seed": hp.seed, "calibration": profile.summary() if profile else None,
              "context_templates": len(templates),
              "stats_corpus": {"source": "file" if opts.stats_corpus else "model-samples", "digest": corpus_digest},
              "keep": {"prompts": len(keep), "retain_file": manifest.sha256_file(opts.retain) if opts.retain else None,
                       "previous_requests": len(earlier)},
              "neutral_target_prob_min": round(float(z_prob.min()), 4), "locate": located},
        tensors=[{"name": u.name, "shape": list(edited[u.name].shape), "dtype": str(edited[u.name].dtype),
                  "sha256_before": manifest.sha256_tensor(raw[u.layer]),
                  "sha256_after": manifest.sha256_tensor(edited[u.name]), "rel_change": round(u.rel_change, 6),
                  "solver": u.info} for u in ups],
        requests=requests, commits=commits, include_plaintext=opts.include_requests,
        probes={**status_counts(per_req), "recalled_before": sum(b.top1 for b in before),
                "recalled_after": sum(a.top1 for a in after), "neutral_top1_after": sum(r == 0 for r in ranks),
                "not_recalled_before_ids": [r["id"] for r in per_req if r["status"] == NOT_KNOWN]})
    with out.progress("writing the checkpoint", len(list(ckpt.path.rglob("*")))) as advance:
        card = card_info(ckpt, predicate, key) if opts.card else None
        write_checkpoint(ckpt, opts.out, edited, force=opts.force,
                         finalize=lambda tmp: seal(tmp, predicate, key, card), on_file=advance)
    manifest.write_receipt(receipt, salt, commits)
    t["write"] = time.perf_counter() - t0
    return UnlearnResult(out=opts.out, layers=layers, layers_how=how,
                         updates=[{"layer": u.layer, "name": u.name, "rel_change": u.rel_change, **u.info} for u in ups],
                         requests=per_req, timings={k: round(v, 2) for k, v in t.items()}, receipt=receipt,
                         keyid=key.keyid, calibrated=calibrated, variant=variant)


def input_lineage(src: Path, fingerprint: str, out: Output) -> dict[str, Any]:
    """The new edit's ``lineage``: a first edit, or an edit of a zu output whose signed manifest
    checks out (one that does not is not a parent: say so, and start a new chain)."""
    from .integrity import check_integrity
    from .lineage import parent_record

    record = parent_record(src, fingerprint)
    if "parent" not in record:
        return record
    report = check_integrity(src)
    if report.ok:
        return record
    out.warn(f"{src}: carries a zu manifest that does not verify ({report.problems[0]}); this edit starts a new "
             "history instead of extending it")
    return {"depth": 1, "base_fingerprint": fingerprint}


def card_info(ckpt, predicate: dict[str, Any], key):
    """The model card's facts about this edit (card.CardInfo); no request text."""
    from .card import CardInfo
    from .manifest import signature_format

    lineage = predicate["lineage"]
    return CardInfo(base_model=ckpt.hub["repo_id"] if ckpt.hub else ckpt.path.name, date=predicate["created"][:10],
                    variant=predicate["edit"]["variant"], layers=predicate["edit"]["layers"],
                    requests=predicate["requests"]["count"], keyid=key.keyid,
                    signature=signature_format(key.algorithm)[1],
                    earlier_edits=lineage["depth"] - 1)


def seal(tmp: Path, predicate: dict[str, Any], key, card) -> None:
    """Finish the output folder before its rename: the parent's manifest into the history, the
    model card, then the manifest and signature over everything (the card and history included)."""
    from .card import write_card
    from .lineage import carry_parent
    from .manifest import write_manifest

    carry_parent(tmp, predicate["lineage"])
    if card is not None:
        write_card(tmp, card)
    write_manifest(tmp, predicate, key)


def _choose_layers(asked, ckpt, model, tok, n_layers: int, requests, hp: Hyper, source: str, opts: UnlearnOptions,
                   out: Output) -> tuple[list[int], str, dict[str, Any] | None, Any]:
    """The edited window: ``--layers`` as given; ``auto``: causal tracing on the requests; else the
    model's calibrated window (calibrating it now if this model was never calibrated), or with
    ``--no-calibrate`` the default relative window.

    Returns:
        (layers, how they were chosen, the tracing record or None, the calibration Profile or None).
    """
    from .calibrate import CalibrationUnavailable, default_window, ensure_profile, multi_window

    if isinstance(asked, list):
        return asked, "--layers", None, None
    first = ckpt.spec.first_window_layer(ckpt.config)
    default = default_window(n_layers, first=first)
    if opts.multi:
        default = multi_window(default, first)
    if asked is None and opts.calibrate:
        try:
            prof, cached = ensure_profile(ckpt, model, tok, source, out, multi=opts.multi)
        except CalibrationUnavailable as exc:
            out.warn(f"{exc}: editing the default window {default} (pass --layers to choose)")
            return default, "default window (calibration unavailable)", None, None
        return (prof.multi_layers if opts.multi else prof.layers), \
            "calibration" + (" (cached)" if cached else ""), None, prof
    if asked is None:
        return default, "default window (--no-calibrate)", None, None
    from .locate import TraceSettings, locate

    st = TraceSettings(seed=hp.seed)
    scores, _ = locate(model, tok, ckpt.spec, n_layers, requests, st, len(default), source, out)
    record = {"effect": [round(e, 5) for e in scores.effect], "window": scores.window, "settings": asdict(st),
              "requests_traced": len(scores.traced), "found": scores.found}
    if not scores.found:
        out.warn(f"--layers auto: causal tracing found no causal effect ({scores.reason}); editing the default "
                 f"window {default}")
        return default, "default (causal tracing found no effect)", record, None
    return scores.window, "auto (causal tracing)", record, None


@dataclass
class LocateOptions:
    """What ``zu locate`` was asked to do."""

    model: str | Path
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
    from .checkpoint import open_checkpoint
    from .loading import check_load_options, load_model
    from .locate import TraceSettings, locate
    from .requests import load_requests

    check_load_options(opts.device_map, opts.dtype)
    requests = load_requests(opts.forget)
    with out.stage("opening the checkpoint"):
        ckpt = open_checkpoint(opts.model)
    n_layers = num_layers(ckpt.spec, ckpt.config)
    if not 1 <= opts.num_layers <= n_layers:
        raise UsageError(f"--num-layers {opts.num_layers}: expected 1-{n_layers}")
    with out.stage("loading the model"):
        model, tok = load_model(ckpt, opts.device_map, None, None, opts.dtype)
    source = manifest.sha256_file_list(manifest.dir_digests(ckpt.path))
    scores, cached = locate(model, tok, ckpt.spec, n_layers, requests, opts.settings or TraceSettings(),
                            opts.num_layers, source, out)
    by_id = {r.id: r for r in requests}
    for q in scores.requests:
        q["tag"] = out.redact(by_id[q["id"]].target, q["id"])
    return scores, cached


def run_calibrate(model: str | Path, multi: bool, force: bool, device_map: str, dtype: str, out: Output):
    """``zu calibrate``: the model's profile from the cache, or calibrated now (and cached).

    Returns:
        (Profile, whether it came from the cache).

    Raises:
        ZuError subclasses: bad options (2), an unreadable model or too few known facts (3).
    """
    from . import manifest
    from .calibrate import CalibrationUnavailable, calibrate, ensure_profile, store_profile
    from .errors import CheckpointError
    from .checkpoint import open_checkpoint
    from .loading import check_load_options, load_model

    check_load_options(device_map, dtype)
    with out.stage("opening the checkpoint"):
        ckpt = open_checkpoint(model)
    with out.stage("loading the model"):
        mdl, tok = load_model(ckpt, device_map, None, None, dtype)
    with out.stage("fingerprinting the weights"):
        source = manifest.sha256_file_list(manifest.dir_digests(ckpt.path))
    try:
        if not force:
            return ensure_profile(ckpt, mdl, tok, source, out, multi=multi)
        prof = calibrate(ckpt, mdl, tok, source, out, multi=multi)
    except CalibrationUnavailable as exc:
        raise CheckpointError(str(exc), hint="edit with --layers (zu locate suggests a window)") from exc
    store_profile(prof)
    return prof, False
