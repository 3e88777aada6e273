"""`zu verify --attack`'s verdicts: each attack's probes judged like the plain ones (attacks.py measures them)."""

from __future__ import annotations

from typing import Any

from .console import short_hash
from .verdicts import NOT_KNOWN, PRIOR_NOTE, Criteria, ProbeResult, is_prior


def judge_attacks(requests: list, forget: list[ProbeResult], after, base, crit: Criteria,
                  notes: dict[str, str]) -> tuple[list[ProbeResult], list[dict[str, Any]]]:
    """Verdicts of ``--attack`` probes: each must still be forgotten, like the plain probe.

    A request whose plain probe was skipped (not recalled before the edit) is skipped under every
    attack too; with ``--baseline``, a quantised probe the base model quantised the same way does
    not recall either is skipped (the format lost it, not the edit). ``relearn-control`` (the same
    fine-tuning budget spent on kept facts) is reported, not judged.

    Args:
        forget: the plain ``forget`` verdict of each request (its skip decides the attacks').
        after, base: attacks.AttackMeasure of the checkpoint and of the baseline (or None).

    Returns:
        (verdicts, per attack ``{"attack", "probed", "recalled", "recalled_pct", "recalled_prior",
        "base_recalled", "note"}``); ``recalled_prior`` counts the recalled probes that the attacked
        model also answers for every invented subject.
    """
    verdicts, summary = [], []
    for name, rows in after.probes.items():
        judged = name != "relearn-control"
        recalled = probed = base_recalled = priors = 0
        for i, (r, row) in enumerate(zip(requests, rows)):
            tag = f"{r.id}{short_hash(r.target)}"
            for j, (label, p, fakes) in enumerate(row):
                b = base.probes[name][i][j][1] if base is not None and name in base.probes else None
                hit = p.rank <= crit.max_rank if name == "lens" else crit.recalled(p)
                prior = is_prior(fakes, crit)
                skip = forget[i].passed is None or (b is not None and not crit.recalled(b))
                if not skip:
                    probed += 1
                    recalled += hit
                    priors += bool(hit and prior)
                    base_recalled += b is not None and crit.recalled(b)
                if judged:
                    verdicts.append(ProbeResult(
                        f"{tag}/{name}/{label}", f"attack-{name.split('-')[0]}", None if skip else not hit,
                        (NOT_KNOWN if forget[i].passed is None else "base model does not recall it so either")
                        if skip else f"{'recalled' if hit else 'forgotten'}: rank {p.rank}"
                        + (PRIOR_NOTE if hit and prior else ""), p.rank,
                        p.prob_first, p.prob, b.rank if b else None, prior=prior))
        summary.append({"attack": name, "judged": judged, "probed": probed, "recalled": recalled,
                        "recalled_pct": round(100 * recalled / probed, 1) if probed else None,
                        "recalled_prior": priors,
                        "base_recalled": base_recalled if base is not None and name in base.probes else None,
                        "note": notes.get(name.split("-")[0], "")})
    return verdicts, summary
