"""Which quantised part of an edited checkpoint brings its forgotten facts back (issue 26).

    python bench/quant_parts.py --edited OUT --base DIR --facts probes.jsonl --layers 6-10 \
        [--formats Q4_0,Q5_0] [--parts none,all,below,edited,edited-down,not-edited-down,above,head]

Each part's linear weights are round-tripped through a GGUF format (zu_cli/quantise.py), the
rest stay as written, and the facts' prompts and paraphrases are probed. Counted, as `zu verify
--attack quant --baseline` counts them, among the probes the base model recalls both unquantised
and with every linear weight round-tripped. Parts: ``below`` the layers under the edited window,
``edited`` every linear of the edited layers, ``edited-down`` their down-projections only,
``above`` the layers over it, ``head`` linears outside the decoder layers (the LM head, and the
embeddings when tied), ``all``, ``none``. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def part_of(spec, layers: list[int], part: str):
    """Module name -> whether ``part`` round-trips it (``spec``: the model's zu ArchSpec)."""
    lo, hi = min(layers), max(layers)
    prefix = spec.layers + "."

    def layer(name: str) -> int | None:
        head = name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else ""
        return int(head) if head.isdigit() else None

    def which(name: str) -> bool:
        l = layer(name)
        down = l is not None and lo <= l <= hi and name == spec.down_proj_module(l)
        return {"all": True, "none": False, "head": l is None,
                "below": l is not None and l < lo, "above": l is not None and l > hi,
                "edited": l is not None and lo <= l <= hi,
                "edited-down": down, "not-edited-down": not down}[part]
    return which


def recalled(model, tok, queries, fmt: str | None, where) -> list[bool]:
    """Per query: still recalled (verify's criteria) with ``where``'s linears round-tripped through ``fmt``."""
    import contextlib

    from zu_cli.probes import probe
    from zu_cli.quantise import Quantised
    from zu_cli.verdicts import Criteria

    ctx = Quantised(model, fmt, where).swapped() if fmt else contextlib.nullcontext()
    with ctx:
        return [Criteria().recalled(p) for p in probe(model, tok, queries)]


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zu_cli.arch import lookup, parse_layers

    ap = argparse.ArgumentParser()
    ap.add_argument("--edited", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--facts", required=True, help="requests with paraphrases (JSONL)")
    ap.add_argument("--layers", required=True, help="the edited window, e.g. 6-10")
    ap.add_argument("--formats", default="Q4_0,Q5_0")
    ap.add_argument("--parts", default="none,all,below,edited,edited-down,above,head")
    a = ap.parse_args()
    layers = parse_layers(a.layers)
    facts = [json.loads(line) for line in open(a.facts)]
    queries = [(f["prompt"], f["target"]) for f in facts] + \
              [(p, f["target"]) for f in facts for p in f.get("paraphrases", [])]
    tok = AutoTokenizer.from_pretrained(a.base)
    base = AutoModelForCausalLM.from_pretrained(a.base, dtype="float32").eval()
    edited = AutoModelForCausalLM.from_pretrained(a.edited, dtype="float32").eval()
    spec = lookup(base.config)
    base_fp = recalled(base, tok, queries, None, None)
    doc = {"edited": a.edited, "probes": len(queries), "prompts": len(facts), "formats": {}}
    for fmt in a.formats.split(","):
        base_q = recalled(base, tok, queries, fmt, part_of(spec, layers, "all"))
        judged = [i for i, (x, y) in enumerate(zip(base_fp, base_q)) if x and y]
        row = {"base_recalls": len(judged)}
        for part in a.parts.split(","):
            hit = recalled(edited, tok, queries, fmt if part != "none" else None, part_of(spec, layers, part))
            row[part] = sum(hit[i] for i in judged)
        doc["formats"][fmt] = row
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
