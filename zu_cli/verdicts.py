"""`zu verify`'s verdicts: probe a checkpoint for forgotten and kept knowledge, judge it, report (design §4).

A model is measured once (``measure``); the verdicts compare those numbers with the criteria and,
with ``--baseline``, with the base model's numbers (``judge``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .console import Output, short_hash
from .errors import EXIT_INTEGRITY, EXIT_OK, EXIT_VERIFY_FAILED
from .probes import Probe, greedy, lens_ranks, perplexity, probe, probe_priors, says


@dataclass(frozen=True)
class Criteria:
    """Pass criteria (docs/verify.md).

    Attributes:
        max_rank: a forgotten target still counts as recalled when its first token ranks at most
            this (0 = top-1 only).
        max_prob: ... or when the whole target's probability after the prompt exceeds this.
        max_ppl_ratio: perplexity after / before allowed (needs ``--baseline``).
        extra_tokens: greedy continuation length beyond the target's own token count.
        deep_k: the logit lens calls a target decodable when it ranks below this.
    """

    max_rank: int = 0
    max_prob: float = 0.25
    max_ppl_ratio: float = 1.05
    extra_tokens: int = 4
    deep_k: int = 10

    def recalled(self, p: Probe) -> bool:
        """A forgotten target is still there."""
        return p.rank <= self.max_rank or p.prob > self.max_prob


@dataclass
class Measure:
    """One model's numbers on a request set (no verdicts)."""

    forget: list[Probe]
    continuation: list[str]
    para: list[list[Probe]]
    nbr: list[list[Probe]]
    retain: list[Probe]
    ppl: float | None = None
    lens: list[list[int]] | None = None
    # The forget prompts and paraphrases about invented subjects (probes.probe_priors), in the
    # order of ``forget`` and ``para``; None where nothing was invented (no subject in the text).
    priors: list[list[Probe] | None] = field(default_factory=list)
    para_priors: list[list[list[Probe] | None]] = field(default_factory=list)


def measure(model, tok, spec, requests: list, retain: list, text: str | None, deep: bool, crit: Criteria,
            priors: bool = True) -> Measure:
    """Every probe of ``zu verify`` on one model, batched by kind.

    Args:
        model, tok, spec: the loaded model, its tokenizer, its architecture data.
        requests: forget requests (their paraphrases and neighbours are probed too).
        retain: requests whose targets must be kept.
        text: prose for perplexity, or None.
        deep: run the logit lens.
        crit: the criteria (greedy length).
        priors: probe the prompts and paraphrases about an invented subject too (off for a
            baseline, whose priors are not judged).
    """
    from .text import encode_target

    subjects = [r.subject if priors else None for r in requests]  # None: nothing is invented
    forget, fakes = probe_priors(model, tok, [(r.prompt, r.target, s) for r, s in zip(requests, subjects)])
    pp, para_fakes = probe_priors(model, tok, [(p, r.target, s) for r, s in zip(requests, subjects)
                                               for p in r.paraphrases])
    nn = probe(model, tok, [(n.prompt, n.target) for r in requests for n in r.neighbors])

    def split(flat, sizes):
        out, i = [], 0
        for s in sizes:
            out.append(flat[i:i + s])
            i += s
        return out

    sizes = [len(r.paraphrases) for r in requests]
    return Measure(
        forget=forget,
        continuation=greedy(model, tok, [r.prompt for r in requests],
                            [len(encode_target(tok, r.target)) + crit.extra_tokens for r in requests]),
        para=split(pp, sizes),
        nbr=split(nn, [len(r.neighbors) for r in requests]),
        retain=probe(model, tok, [(r.prompt, r.target) for r in retain]),
        ppl=perplexity(model, tok, text) if text else None,
        lens=lens_ranks(model, tok, spec, [r.prompt for r in requests], [r.target for r in requests]) if deep
        else None,
        priors=fakes, para_priors=split(para_fakes, sizes))


@dataclass
class ProbeResult:
    """One verdict (one JUnit test case). ``passed`` None = skipped (e.g. the base model never knew it)."""

    name: str
    kind: str
    passed: bool | None
    detail: str
    rank: int | None = None  # of the target's first token (0 = top-1)
    prob_first: float | None = None  # probability of that first token
    prob: float | None = None  # probability of the whole target (teacher forced)
    base_rank: int | None = None
    text: str | None = None  # sensitive: only filled with --reveal
    # A must-be-forgotten probe: whether the same model also gives the target with the subject's
    # last word invented, for every name in probes.INVENTED (a "prior": the answer follows from the
    # rest of the prompt); None when the probe's text does not hold the subject, or other kinds.
    prior: bool | None = None


@dataclass
class VerifyReport:
    """Everything ``zu verify`` found; ``exit_code`` follows design §4."""

    model: str
    integrity: Any = None  # integrity.IntegrityReport or None when there is no manifest to check
    requests: list[dict[str, Any]] = field(default_factory=list)
    retain: list[ProbeResult] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    deep: dict[str, Any] | None = None
    warnings: list[str] = field(default_factory=list)
    attacks: list[ProbeResult] = field(default_factory=list)  # --attack verdicts (attacks.py)
    attack_summary: list[dict[str, Any]] = field(default_factory=list)

    def all_probes(self) -> list[ProbeResult]:
        """Every verdict, in report order."""
        return ([p for r in self.requests for p in r["probes"]] + self.retain + self.metrics.get("gates", [])
                + self.attacks)

    @property
    def exit_code(self) -> int:
        """4 integrity failure, 1 a failed probe, else 0."""
        if self.integrity is not None and not self.integrity.ok:
            return EXIT_INTEGRITY
        return EXIT_VERIFY_FAILED if any(p.passed is False for p in self.all_probes()) else EXIT_OK

    def to_json(self) -> dict[str, Any]:
        """The JSON document (docs/verify.md)."""
        probes = self.all_probes()
        return {"model": self.model, "exit_code": self.exit_code,
                "integrity": None if self.integrity is None else self.integrity.to_json(),
                "requests": [{**r, "probes": [asdict(p) for p in r["probes"]]} for r in self.requests],
                "retain": [asdict(p) for p in self.retain],
                "metrics": {k: v for k, v in self.metrics.items() if k != "gates"},
                "gates": [asdict(p) for p in self.metrics.get("gates", [])],
                "deep": self.deep, "warnings": self.warnings,
                "attacks": {"summary": self.attack_summary, "probes": [asdict(p) for p in self.attacks]},
                "summary": {"probes": len(probes), "passed": sum(p.passed is True for p in probes),
                            "failed": sum(p.passed is False for p in probes),
                            "skipped": sum(p.passed is None for p in probes)}}


NOT_KNOWN = "not recalled before the edit"


def _kept(name: str, kind: str, p: Probe, b: Probe | None) -> ProbeResult:
    if b is not None and not b.top1:
        return ProbeResult(name, kind, None, "base model did not answer it either", p.rank, p.prob_first, p.prob,
                           b.rank)
    return ProbeResult(name, kind, p.top1, "still answered" if p.top1 else f"lost: rank {p.rank}",
                       p.rank, p.prob_first, p.prob, b.rank if b else None)


PRIOR_NOTE = "; also for invented subjects (a prior)"


def is_prior(fakes: list[Probe] | None, crit: Criteria) -> bool | None:
    """Whether the target is recalled for every invented subject (None: nothing was invented)."""
    return None if fakes is None else all(crit.recalled(f) for f in fakes)


def _gone(name: str, kind: str, p: Probe, b: Probe | None, crit: Criteria, known: bool = True,
          fakes: list[Probe] | None = None) -> ProbeResult:
    """A must-be-forgotten probe; skipped (never a pass) when the model did not recall it before the edit.

    ``fakes`` are the same model's probes with the subject invented; a recall they all share is
    named a prior in the detail, and still fails (the model still says the target).
    """
    prior = is_prior(fakes, crit)
    if not known or (b is not None and not crit.recalled(b)):
        return ProbeResult(name, kind, None, NOT_KNOWN, p.rank, p.prob_first, p.prob, b.rank if b else None,
                           prior=prior)
    rec = crit.recalled(p)
    detail = (f"recalled: rank {p.rank}, p={p.prob:.3g}" + (PRIOR_NOTE if prior else "") if rec
              else f"forgotten: rank {p.rank}, p={p.prob:.3g}")
    return ProbeResult(name, kind, not rec, detail, p.rank, p.prob_first, p.prob, b.rank if b else None,
                       prior=prior)


def _status(forget: ProbeResult) -> str:
    """A request's outcome from its ``forget`` probe: forgotten, still recalled, or not recalled before."""
    return NOT_KNOWN if forget.passed is None else "forgotten" if forget.passed else "still recalled"


def judge(requests: list, retain: list, after: Measure, base: Measure | None, crit: Criteria,
          out: Output, unknown: set[str] = frozenset()) -> tuple[list[dict[str, Any]], list[ProbeResult]]:
    """Verdicts per request (forget, greedy, paraphrases, neighbours) and per retained fact.

    Names are ``<id>#<hash of target>/<probe>``: no sensitive text unless ``out.reveal``.

    Args:
        unknown: ids of requests the edit's manifest records as not recalled before the edit
            (used when there is no ``--baseline`` to measure it).

    Returns:
        (per request ``{"id", "tag", "status", "passed", "probes"}``, retained-fact verdicts). A
        request the model did not recall before the edit is skipped, never counted forgotten.
    """
    rows = []
    for i, r in enumerate(requests):
        tag = f"{r.id}{short_hash(r.target)}"
        b = base  # short name: used on every probe below
        forget = _gone(f"{tag}/forget", "forget", after.forget[i], b.forget[i] if b else None, crit,
                       known=r.id not in unknown, fakes=after.priors[i])
        said = says(after.continuation[i], r.target)
        greedy = ProbeResult(f"{tag}/greedy", "greedy", not said, "greedy text still says the target" if said
                             else "greedy text does not say the target")
        if forget.passed is None:
            greedy.passed, greedy.detail = None, NOT_KNOWN
        probes = [forget, greedy]
        probes += [_gone(f"{tag}/paraphrase-{j + 1}", "paraphrase", p, b.para[i][j] if b else None, crit,
                         fakes=after.para_priors[i][j])
                   for j, p in enumerate(after.para[i])]
        probes += [_kept(f"{tag}/neighbor-{j + 1}", "neighbor", p, b.nbr[i][j] if b else None)
                   for j, p in enumerate(after.nbr[i])]
        if out.reveal:  # each probe's own text, in probe order
            texts = ([f"{r.prompt} -> {r.target}", after.continuation[i]]
                     + [f"{q} -> {r.target}" for q in r.paraphrases]
                     + [f"{n.prompt} -> {n.target}" for n in r.neighbors])
            for p, t in zip(probes, texts):
                p.text = t
        rows.append({"id": r.id, "tag": out.redact(r.target, r.id), "status": _status(forget),
                     "passed": all(p.passed is not False for p in probes), "probes": probes})
    kept = [_kept(f"{r.id}{short_hash(r.target)}/retain", "retain", p, base.retain[i] if base else None)
            for i, (r, p) in enumerate(zip(retain, after.retain))]
    if out.reveal:
        for p, r in zip(kept, retain):
            p.text = f"{r.prompt} -> {r.target}"
    return rows, kept


def metrics(after: Measure, base: Measure | None, crit: Criteria) -> dict[str, Any]:
    """Efficacy / Generalization / Specificity (% still top-1) and perplexity, after and (with a baseline) before."""
    pct = lambda xs: round(100 * sum(xs) / len(xs), 1) if xs else None

    def of(m: Measure) -> dict[str, Any]:
        return {"Eff": pct([p.top1 for p in m.forget]), "Gen": pct([p.top1 for g in m.para for p in g]),
                "Spe": pct([p.top1 for g in m.nbr for p in g]), "PPL": None if m.ppl is None else round(m.ppl, 3)}

    doc: dict[str, Any] = {"after": of(after), "gates": []}
    if base is not None:
        doc["before"] = of(base)
        spe_b = doc["before"]["Spe"]
        doc["spe_retained"] = round(doc["after"]["Spe"] / spe_b, 3) if spe_b else None
        if after.ppl is not None and base.ppl is not None:
            ratio = after.ppl / base.ppl
            doc["ppl_ratio"] = round(ratio, 4)
            doc["gates"].append(ProbeResult("perplexity", "perplexity", ratio <= crit.max_ppl_ratio,
                                            f"ratio {ratio:.4f} (limit {crit.max_ppl_ratio})"))
    return doc


def deep_report(requests: list, after: Measure, base: Measure | None, crit: Criteria, out: Output) -> dict[str, Any]:
    """Per layer: how many targets are still decodable (rank < k) from the residual stream, and the ranks."""
    def count(m: Measure) -> list[int]:
        return [sum(ranks[l] < crit.deep_k for ranks in m.lens) for l in range(len(m.lens[0]))] if m.lens else []

    return {"k": crit.deep_k, "decodable_after": count(after), "decodable_before": count(base) if base else None,
            "ranks": {out.redact(r.target, r.id): ranks for r, ranks in zip(requests, after.lens or [])}}
