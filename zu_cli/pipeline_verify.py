"""The order of ``zu verify`` and ``zu manifest prove``: integrity first, then probes (design §3-4)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .console import Output


@dataclass
class VerifyOptions:
    """What ``zu verify`` was asked to do."""

    model: str | Path  # a directory or a hub id
    forget: Path | None = None
    public_key: Path | None = None
    require_key: bool = False
    baseline: str | Path | None = None
    retain: Path | None = None
    text: Path | None = None
    deep: bool = False
    criteria: Any = None  # verify.Criteria; None = defaults
    device_map: str = "auto"
    dtype: str = "auto"
    attacks: list[str] = field(default_factory=list)  # attacks.ATTACKS to run (--attack)
    attack_settings: Any = None  # attacks.AttackSettings; None = defaults


def run_verify(opts: VerifyOptions, out: Output, on_integrity: Callable[[Any], None] | None = None):
    """Integrity of the manifest first (when there is one), then the probes (when ``--forget`` is given).

    Args:
        opts: the options.
        out: progress and warnings.
        on_integrity: called with the IntegrityReport as soon as it is known, before any probe
            runs (the CLI prints its verdict there, so the output follows the order of the checks).

    Returns:
        A VerifyReport; its ``exit_code`` is 4 on an integrity failure (probes are then skipped),
        1 when a probe fails, else 0.

    Raises:
        ZuError subclasses for bad input (2) or an unreadable checkpoint (3).
    """
    import gc

    from . import manifest
    from .checkpoint import open_checkpoint, resolve_path
    from .loading import check_load_options, load_model
    from .integrity import check_integrity
    from .keys import load_public_key
    from .probes import read_text
    from .requests import load_requests
    from .verdicts import Criteria, VerifyReport, deep_report, judge, measure, metrics

    check_load_options(opts.device_map, opts.dtype)
    if opts.attacks and opts.forget is None:
        from .errors import UsageError

        raise UsageError("--attack needs --forget: the attacks probe those requests")
    crit = opts.criteria or Criteria()
    pub = load_public_key(opts.public_key) if opts.public_key else None
    requests = load_requests(opts.forget) if opts.forget else []
    retain = load_requests(opts.retain) if opts.retain else []
    text = read_text(opts.text) if (opts.text or opts.baseline) else None
    path, _ = resolve_path(opts.model)
    report = VerifyReport(model=str(opts.model))
    stmt = None
    # Integrity before anything reads the checkpoint: a tampered file is exit 4, not a load error.
    if manifest.has_manifest(path) or opts.forget is None or pub is not None or opts.require_key:
        with out.stage("checking the signed manifest"):
            report.integrity = check_integrity(path, pub, opts.require_key)
            stmt = report.integrity.statement
        report.warnings += report.integrity.warnings
        if on_integrity is not None:
            on_integrity(report.integrity)
        if not report.integrity.ok or opts.forget is None:
            return report
    else:
        report.warnings.append(f"{opts.model}: no zu manifest; integrity not checked")
    measured, attacked = {}, {}
    for role, where in (("after", path), ("base", opts.baseline)):
        if where is None:
            continue
        c = open_checkpoint(where)
        with out.stage(f"loading {c.name}"):
            model, tok = load_model(c, opts.device_map, None, None, opts.dtype)
        with out.stage(f"probing {c.name} ({len(requests)} requests, {len(retain)} retained facts)"):
            measured[role] = measure(model, tok, c.spec, requests, retain, text, opts.deep, crit,
                                     priors=role == "after")
        if opts.attacks:
            attacked[role] = _attack(model, tok, c, requests, opts, stmt, role, out)
        del model  # one model in memory at a time
        gc.collect()
    after, base = measured["after"], measured.get("base")
    unknown = set((stmt or {}).get("predicate", {}).get("probes", {}).get("not_recalled_before_ids", []))
    report.requests, report.retain = judge(requests, retain, after, base, crit, out, unknown)
    report.metrics = metrics(after, base, crit)
    if opts.deep:
        report.deep = deep_report(requests, after, base, crit, out)
    if opts.attacks:
        from .verdicts_attacks import judge_attacks

        forget = [r["probes"][0] for r in report.requests]
        report.attacks, report.attack_summary = judge_attacks(requests, forget, attacked["after"],
                                                              attacked.get("base"), crit, attacked["after"].notes)
    return report


def _attack(model, tok, c, requests: list, opts: VerifyOptions, stmt, role: str, out: Output):
    """The asked attacks on one loaded model; on the baseline only ``quant`` (what the format alone costs)."""
    from .attacks import AttackSettings, run

    asked = opts.attacks if role == "after" else [a for a in opts.attacks if a == "quant"]
    layers = (stmt or {}).get("predicate", {}).get("edit", {}).get("layers")
    with out.stage(f"attacking {c.name}: {', '.join(asked) or 'nothing'}"):
        return run(model, tok, c.spec, requests, asked, opts.attack_settings or AttackSettings(), layers,
                   priors=role == "after")


def run_prove(model: Path, receipt: Path, forget: Path, out: Output) -> list[dict[str, Any]]:
    """Which requests in ``forget`` the edit in ``model`` covered, shown redacted unless ``--reveal``.

    Raises:
        IntegrityError: the manifest does not verify or the receipt is another edit's (exit 4).
    """
    from .errors import IntegrityError
    from .integrity import check_integrity, prove, read_manifest
    from .requests import load_requests

    requests = load_requests(forget)
    report = check_integrity(Path(model))
    if not report.ok:
        raise IntegrityError(report.problems[0])
    rows = prove(read_manifest(model), receipt, requests)
    return [{**row, "tag": out.redact(r.target, r.id)} for row, r in zip(rows, requests)]
