"""The facts a model itself knows, for calibration: zu's common-knowledge probe set, filtered by what
the model answers, split into an edit set and its neighbours; and how an edit scores on them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from .probes import perplexity, probe, read_text, token_ranks
from .requests import Request

N_EDIT = 8  # facts edited per candidate
# --multi is for tens of requests, and how much its null space must hold back grows with what is
# edited: its weight is chosen on a larger edit (on SmolLM2 an 8-fact edit chose 1e4, which at 50
# requests costs +3.4 % perplexity where 1e5 costs +2.3 %; docs/results.md).
N_EDIT_MULTI = 24
N_NEIGHBOURS = 40  # other known facts that must stay answered
PPL_CHARS = 6000  # the bundled prose's first characters, for the perplexity term (~1,300 tokens)
# The design targets a calibrated edit is held to (design §7): forgotten, paraphrases still
# recalled, neighbours kept (of those the model knew), perplexity ratio.
# And the method's own aim: the forgotten prompts re-mapped to the neutral target (EOS among the
# top ``NEUTRAL_TOP`` next tokens for most of them), not forgotten by breaking the subject's
# representation (an edit of the first layers forgets that way: EOS at rank ~25,000 on SmolLM2).
TARGETS = {"forgotten": 0.90, "paraphrases": 0.40, "neighbours": 0.75, "ppl": 1.03, "neutral": 0.5}
NEUTRAL_TOP = 10
NEUTRAL_GATE = 0.5


@dataclass(frozen=True)
class ProbeFact:
    """One calibration fact the model answers: its prompt, answer, and the paraphrases it also answers."""

    id: str
    relation: str
    subject: str
    prompt: str
    target: str
    paraphrases: tuple[str, ...]

    def request(self) -> Request:
        """The fact as a forget request (subject given; no probes)."""
        return Request(id=self.id, prompt=self.prompt, subject=self.subject, target=self.target)


def _all_facts() -> list[ProbeFact]:
    raw = json.loads(resources.files("zu_cli.data").joinpath("calibration.json").read_text(encoding="utf-8"))
    out = []
    for rel, r in raw["relations"].items():
        main, *others = r["templates"]
        for i, (subject, target) in enumerate(r["facts"]):
            out.append(ProbeFact(f"cal-{rel}-{i}", rel, subject, main.format(subject), target,
                                 tuple(t.format(subject) for t in others)))
    return out


def known_facts(model, tok) -> list[ProbeFact]:
    """The probe facts whose answer is the model's top prediction, each with only the paraphrases
    it also answers (a paraphrase the model never gave cannot show forgetting)."""
    facts = _all_facts()
    main = probe(model, tok, [(f.prompt, f.target) for f in facts])
    flat = [(f, p) for f, ok in zip(facts, main) if ok.top1 for p in f.paraphrases]
    para = probe(model, tok, [(p, f.target) for f, p in flat])
    keep: dict[str, list[str]] = {f.id: [] for f, ok in zip(facts, main) if ok.top1}
    for (f, p), res in zip(flat, para):
        if res.top1:
            keep[f.id].append(p)
    return [ProbeFact(f.id, f.relation, f.subject, f.prompt, f.target, tuple(keep[f.id])) for f in facts
            if f.id in keep]


def multi_edit_size(n_known: int) -> int:
    """How many probe facts --multi's calibration edits: ``N_EDIT_MULTI`` where the model knows enough
    to keep ``N_NEIGHBOURS`` others, fewer down to ``N_EDIT`` where it does not."""
    return min(N_EDIT_MULTI, max(N_EDIT, n_known - N_NEIGHBOURS))


def split(facts: list[ProbeFact], n_edit: int = N_EDIT) -> tuple[list[ProbeFact], list[ProbeFact]]:
    """(edit set, neighbours): up to ``n_edit`` facts taken in turn from each relation (those with
    a known paraphrase first), and up to ``N_NEIGHBOURS`` of the rest, in file order. Deterministic."""
    by_rel: dict[str, list[ProbeFact]] = {}
    for f in sorted(facts, key=lambda f: not f.paraphrases):  # stable: file order within each group
        by_rel.setdefault(f.relation, []).append(f)
    edit: list[ProbeFact] = []
    while len(edit) < n_edit and any(by_rel.values()):
        for rel in list(by_rel):
            if by_rel[rel] and len(edit) < n_edit:
                edit.append(by_rel[rel].pop(0))
    ids = {f.id for f in edit}
    return edit, [f for f in facts if f.id not in ids][:N_NEIGHBOURS]


def ppl_text() -> str:
    """The prose the perplexity term is measured on (the start of the bundled text)."""
    return read_text(None)[:PPL_CHARS]


def measure(model, tok, edit: list[ProbeFact], neighbours: list[ProbeFact], text: str) -> dict[str, Any]:
    """Raw numbers of the model as it runs now (hooks honoured): which edit facts, paraphrases and
    neighbours are answered, where EOS ranks after the edit prompts, and the perplexity."""
    top1 = lambda qs: [p.top1 for p in probe(model, tok, qs)] if qs else []
    eos = [[tok.eos_token_id]] * len(edit)
    return {"edit": top1([(f.prompt, f.target) for f in edit]),
            "neutral_ranks": token_ranks(model, tok, [f.prompt for f in edit], eos),
            "paraphrases": top1([(p, f.target) for f in edit for p in f.paraphrases]),
            "neighbours": top1([(f.prompt, f.target) for f in neighbours]), "ppl": perplexity(model, tok, text)}


def score(after: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The four rates of an edit, whether each meets its target, and one utility to rank candidates.

    Returns:
        ``forgotten``, ``paraphrases`` (still recalled), ``neighbours`` (kept, of the known),
        ``ppl`` (ratio), ``neutral`` (share of edited prompts with EOS in the top ``NEUTRAL_TOP``),
        ``misses`` (targets missed) and ``utility`` = forgotten + (1 - paraphrases) + 2 neighbours
        + neutral - 20 max(0, ppl - 1): higher is better (``rank_key``).
    """
    rate = lambda xs: sum(xs) / len(xs) if xs else 0.0
    s = {"forgotten": 1 - rate(after["edit"]), "paraphrases": rate(after["paraphrases"]),
         "neighbours": rate(after["neighbours"]) / max(rate(base["neighbours"]), 1e-9),
         "ppl": after["ppl"] / base["ppl"], "neutral": rate([r < NEUTRAL_TOP for r in after["neutral_ranks"]])}
    s["misses"] = sum([s["forgotten"] < TARGETS["forgotten"], s["paraphrases"] > TARGETS["paraphrases"],
                       s["neighbours"] < TARGETS["neighbours"], s["ppl"] > TARGETS["ppl"],
                       s["neutral"] < TARGETS["neutral"]])
    # What else broke weighs double: a forgetting gap shows in `zu verify`, damage to the rest of
    # the model does not.
    s["utility"] = (s["forgotten"] + (1 - s["paraphrases"]) + 2 * s["neighbours"] + s["neutral"]
                    - 20 * max(0.0, s["ppl"] - 1))
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}


def rank_key(s: dict[str, Any]) -> tuple:
    """Sort key: an edit that re-maps most prompts to the neutral target first (below
    ``NEUTRAL_GATE`` the forgetting comes from breaking the subject, not from the method), then the
    higher utility; a failed edit last. Missed targets are reported, not ranked: a count treats
    33 % and 70 % of neighbours kept alike (measured: it chose SmolLM2's 12-14, 33 % of neighbours).

    The gate was 0.25: on SmolLM2 it let layers 0-2 through (EOS in the top 10 for 3 of 8 probe
    prompts), which on the dev facts left 10 % recalled, 77 % of neighbours, +2.3 % perplexity
    and EOS at median rank 17,180, where 8-10 gives 0 %, 92 %, +1.4 %, rank 6.
    """
    return (s.get("neutral", 0.0) < NEUTRAL_GATE, -s.get("utility", -1e9))


def multi_rank_key(s: dict[str, Any]) -> tuple:
    """Sort key of ``--multi``'s null-space weights: utility without the neutral share. Within one
    window the weights differ only in how much of the edit the null space lets through, so the
    neutral share measures the edit's strength, which ``forgotten`` already counts; counted again
    it chose SmolLM2's weakest protection (1e4: on 50 dev facts 73 % of neighbours, +4.5 %
    perplexity, where 1e5 keeps 80 % at +2.9 %)."""
    return (-(s.get("utility", -1e9) - s.get("neutral", 0.0)),)
