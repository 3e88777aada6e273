"""The only place stages are chained: run_unlearn (load -> templates -> targets -> stats -> solve -> write).

Which layers it edits, and the ``zu locate`` and ``zu calibrate`` runs, are ``pipeline_layers``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
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
    base: Path | None = None  # re-edit the chain's original with previous + forget (rebase.py)
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
    from .pipeline_layers import choose_layers
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
    rebased = len(earlier) if opts.base else 0
    if opts.base:  # one edit of every request so far: the earlier ones are edited, not held
        from .rebase import every_request

        requests, earlier = every_request(earlier, requests), []
    keep = keep_prompts(load_requests(opts.retain) if opts.retain else [], requests, earlier)
    key = opts.signer or load_signing_key(opts.key)
    receipt = opts.receipt or opts.out.parent / f"{opts.out.name}.zu-receipt.json"
    if receipt.resolve().is_relative_to(opts.out.resolve()):
        raise UsageError(f"--receipt {receipt}: inside --out; the salt must stay with the operator")
    with out.stage("opening the checkpoint"):
        ckpt = open_checkpoint(opts.model)
        parent_dir = ckpt.path  # the checkpoint whose history the output extends
        if opts.base:  # the output is built from the chain's original instead
            check_out(ckpt, opts.out, opts.force)
            ckpt = open_checkpoint(opts.base)
    check_out(ckpt, opts.out, opts.force)  # refuse before any expensive work
    source_digests = manifest.dir_digests(ckpt.path)
    fingerprint = manifest.sha256_file_list(source_digests)
    lineage = input_lineage(parent_dir, fingerprint, out)
    if opts.base:
        from .rebase import rebased_lineage

        lineage = rebased_lineage(parent_dir, lineage, fingerprint, rebased, ckpt.path)
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
    # Every round of a chain uses the base model's calibration and statistics: a round's edit is
    # small, and recomputing them per round would make round 16 cost what 16 first runs cost.
    source = lineage["base_fingerprint"]
    layers, how, located, profile = choose_layers(asked, ckpt, model, tok, n_layers, requests, hp, source, opts, out)
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
    z, z_prob, sensitive = _targets(model, tok, spec, requests, layers, templates, targets_neutral, hp, sens_kind,
                                    fingerprint, out)
    t["targets"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    g, kk, corpus_digest = solve_moments(model, tok, spec, layers, biases, hp, opts.stats_corpus, source, keep, out,
                                         keys=opts.multi, closed=not opts.multi, requests=requests,
                                         weights=fingerprint)
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
                         finalize=lambda tmp: seal(tmp, predicate, key, card, parent_dir), on_file=advance)
    manifest.write_receipt(receipt, salt, commits)
    t["write"] = time.perf_counter() - t0
    return UnlearnResult(out=opts.out, layers=layers, layers_how=how,
                         updates=[{"layer": u.layer, "name": u.name, "rel_change": u.rel_change, **u.info} for u in ups],
                         requests=per_req, timings={k: round(v, 2) for k, v in t.items()}, receipt=receipt,
                         keyid=key.keyid, calibrated=calibrated, variant=variant)


def _targets(model, tok, spec, requests: list, layers: list[int], templates: list[str], neutral: list[list[int]],
             hp: Hyper, sens_kind: str, fingerprint: str, out: Output):
    """``edit.edit_targets``, reading requests already optimised on these weights from the cache
    (``targets_cache``; off with ``cache_targets: false``)."""
    from . import edit, targets_cache
    from .budget import optim_dtype
    from .text import input_device

    def compute(idx: list[int]):
        return edit.edit_targets(model, tok, spec, [requests[i] for i in idx], layers, templates,
                                 [neutral[i] for i in idx], hp, sens_kind, out)

    if not hp.cache_targets:
        return compute(list(range(len(requests))))
    keys = targets_cache.request_keys(fingerprint, requests, neutral, layers, templates, hp, sens_kind,
                                      optim_dtype(input_device(model), hp.optim_dtype))
    found, hits = targets_cache.cached_targets(keys, layers, compute)
    if hits:
        out.info(f"targets: {hits} of {len(requests)} requests from the cache")
    return found


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


def seal(tmp: Path, predicate: dict[str, Any], key, card, parent_dir: Path) -> None:
    """Finish the output folder before its rename: the parent's manifest into the history (copied
    from ``parent_dir`` when the output was built from ``--base``), the model card, then the
    manifest and signature over everything (the card and history included)."""
    from .card import write_card
    from .lineage import carry_parent
    from .manifest import write_manifest
    from .rebase import carry_history

    if predicate["lineage"].get("rebased"):
        carry_history(tmp, parent_dir, predicate["lineage"])
    else:
        carry_parent(tmp, predicate["lineage"])
    if card is not None:
        write_card(tmp, card)
    write_manifest(tmp, predicate, key)
