"""How many of a fact file's probes a model answers for an invented subject (issues 25 and 26).

    python bench/priors.py --model DIR --facts FILE [--n 10 --offset 0] [--list] [--names Zorbin,Quellan]

Each prompt and paraphrase is also asked about an invented subject: the subject's last word
replaced by ``Zorbin`` ("Aleksandr Ptushko" -> "Aleksandr Zorbin", "Paracelsus" -> "Zorbin").
Neighbours are counted but not asked (the file does not name their subjects). A probe the model
recalls for the real subject *and* for the invented one is a *prior*: the answer follows from the
rest of the name or from the relation, not from this subject, and no edit that forgets this one
fact removes it. Prints one JSON document: per probe
kind, how many the model recalls and how many of those are priors under the first name
(``--list``: which). With several ``--names`` (default: zu verify's three), the document adds, per
kind, the priors under each name and how many are priors under all of them (what ``zu verify``
calls a prior, with its names) and under any.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zu_cli.probes import INVENTED, invented  # noqa: E402  (after the path insert)


def probes_of(facts: list[dict]) -> dict[str, list[tuple[str, str, str]]]:
    """Per kind (prompt, paraphrase, neighbour): (subject, prompt, target) of every probe."""
    return {"prompt": [(f["subject"], f["prompt"], f["target"]) for f in facts],
            "paraphrase": [(f["subject"], p, f["target"]) for f in facts for p in f.get("paraphrases", [])],
            "neighbour": [(f["subject"], n["prompt"], n["target"]) for f in facts for n in f.get("neighbors", [])]}


def priors(model, tok, rows: list[tuple[str, str, str]],
           names: tuple[str, ...] = INVENTED) -> tuple[list[bool], list[list[bool]]]:
    """Per (subject, prompt, target): recalled; and per name, recalled for the subject invented with
    that name as well (one batch for all)."""
    from zu_cli.probes import probe_priors
    from zu_cli.verdicts import Criteria

    crit = Criteria()
    real, fakes = probe_priors(model, tok, [(q, t, s) for s, q, t in rows], names)
    rec = [crit.recalled(p) for p in real]
    return rec, [[r and f is not None and crit.recalled(f[k]) for r, f in zip(rec, fakes)]
                 for k in range(len(names))]


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--facts", required=True)
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="name the prior probes")
    ap.add_argument("--names", default=",".join(INVENTED), help="invented names to try, comma-separated "
                    "(default: zu verify's, whose prior is a prior under all of them)")
    a = ap.parse_args()
    facts = [json.loads(line) for line in open(a.facts)][a.offset:a.offset + a.n]
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype="float32").eval()
    doc = {"model": a.model, "facts": a.facts, "n": len(facts), "offset": a.offset, "kinds": {}}
    names = [n.strip() for n in a.names.split(",") if n.strip()]
    for kind, rows in probes_of(facts).items():
        real, each = priors(model, tok, rows, tuple(names))
        both = each[0]
        entry = {"probes": len(rows), "recalled": sum(real), "prior": sum(both)}
        if len(names) > 1:
            entry["prior_by_name"] = {n: sum(b) for n, b in zip(names, each)}
            entry["prior_under_all"] = sum(all(col) for col in zip(*each))
            entry["prior_under_any"] = sum(any(col) for col in zip(*each))
        if a.list:
            entry["priors"] = [f"{q} -> {t} ({invented(s, q, names[0])})" for (s, q, t), b in zip(rows, both) if b]
        doc["kinds"][kind] = entry
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
