"""Which fine-tuned part of an edited checkpoint brings its forgotten facts back (issue 26).

    python bench/relearn_parts.py --edited OUT --base DIR --facts probes.jsonl --layers 6-10 \
        [--parts none,all,below,edited,edited-down,above,head] [--steps 30 --lr 5e-5]

The relearning attack of `zu verify --attack relearn` (the same split, budget and seed): a copy
of the edited model is fine-tuned on half of the requests (attack) and, as the control, on those
requests' neighbours. Then each part's parameters are taken from the fine-tuned copy, the rest
stay as written, and the other half's prompts and paraphrases are probed. Counted among the
probes the base model recalls. Parts as in bench/quant_parts.py, over every parameter (norms
and biases included): ``below`` the layers under the edited window, ``edited`` the edited
layers, ``edited-down`` their down-projections only, ``above`` the layers over it, ``head``
everything outside the decoder layers (embeddings, final norm, LM head).

With ``--prior`` a revived probe whose answer the *base* model also gives for an invented subject
(bench/priors.py) is counted apart: the answer follows from the rest of the name or from the
relation, which no edit of this fact removes. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from priors import priors  # noqa: E402  (bench/ is on sys.path when run as a script)
from quant_parts import part_of  # noqa: E402


@contextlib.contextmanager
def mixed(edited, tuned, which):
    """``edited``'s parameters in ``which`` parts (module name -> bool) replaced by ``tuned``'s
    inside the block, restored on exit."""
    import torch

    tuned_p = dict(tuned.named_parameters())
    saved = {}
    with torch.no_grad():
        for name, p in edited.named_parameters():
            if which(name.rsplit(".", 1)[0]):
                saved[name] = p.detach().clone()
                p.copy_(tuned_p[name])
    try:
        yield
    finally:
        with torch.no_grad():
            for name, p in edited.named_parameters():
                if name in saved:
                    p.copy_(saved[name])


def main() -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zu_cli.arch import lookup, parse_layers
    from zu_cli.attacks import _finetune, relearn_split
    from zu_cli.probes import probe
    from zu_cli.verdicts import Criteria

    ap = argparse.ArgumentParser()
    ap.add_argument("--edited", required=True)
    ap.add_argument("--base", required=True)
    ap.add_argument("--facts", required=True, help="requests with paraphrases and neighbours (JSONL)")
    ap.add_argument("--layers", required=True, help="the edited window, e.g. 6-10")
    ap.add_argument("--parts", default="none,all,below,edited,edited-down,above,head")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--lr", type=float, default=5e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--prior", action="store_true", help="count apart what the base gives for an invented subject")
    a = ap.parse_args()
    layers = parse_layers(a.layers)
    facts = [json.loads(line) for line in open(a.facts)]
    train, held = relearn_split(len(facts), a.seed)
    rows = [(facts[i]["subject"], facts[i]["prompt"], facts[i]["target"]) for i in held] + \
           [(facts[i]["subject"], p, facts[i]["target"]) for i in held for p in facts[i].get("paraphrases", [])]
    queries = [(q, t) for _, q, t in rows]
    tok = AutoTokenizer.from_pretrained(a.base)
    base = AutoModelForCausalLM.from_pretrained(a.base, dtype="float32").eval()
    real, (both,) = priors(base, tok, rows, ("Zorbin",))  # recalled by the base; and for an invented subject too
    del base
    judged = [i for i, r in enumerate(real) if r]
    prior = {i for i, b in enumerate(both) if b} if a.prior else set()
    edited = AutoModelForCausalLM.from_pretrained(a.edited, dtype="float32").eval()
    spec = lookup(edited.config)
    data = {"attack": [(facts[i]["prompt"], facts[i]["target"]) for i in train],
            "control": [(n["prompt"], n["target"]) for i in train for n in facts[i].get("neighbors", [])]}
    doc = {"edited": a.edited, "probes": len(queries), "base_recalls": len(judged), "held": len(held),
           "base_prior": len(prior) if a.prior else None,
           "budget": {"steps": a.steps, "lr": a.lr, "seed": a.seed}, "runs": {}}
    for run, pairs in data.items():
        tuned = _finetune(edited, tok, pairs, a.steps, a.lr, a.seed)
        row = {}
        for part in a.parts.split(","):
            with mixed(edited, tuned, part_of(spec, layers, part)):
                hit = [Criteria().recalled(p) for p in probe(edited, tok, queries)]
            row[part] = sum(hit[i] for i in judged)
            if a.prior:
                row[f"{part}_not_prior"] = sum(hit[i] for i in judged if i not in prior)
        doc["runs"][run] = row
        del tuned
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
