"""Unlearn N dev facts on a checkpoint and measure Eff/Gen/Spe/PPL on the written output vs the base.

    python bench/quality.py --model DIR --facts tests/data/facts-dev.jsonl --n 10 [--set k=v ...]

Requests are edited WITHOUT their paraphrases and neighbours, which are then probed (unseen).
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def queries(facts: list[dict]) -> dict[str, list[tuple[str, str]]]:
    """The (prompt, target) probes of ``facts`` by kind: the prompts, their paraphrases, their neighbours."""
    return {"main": [(f["prompt"], f["target"]) for f in facts],
            "para": [(p, f["target"]) for f in facts for p in f.get("paraphrases", [])],
            "nbr": [(nb["prompt"], nb["target"]) for f in facts for nb in f.get("neighbors", [])]}


def quality(model, tok, facts: list[dict], text: str, per_probe: bool = False) -> dict:
    """Eff/Gen/Spe (% still top-1) and perplexity of the model as it runs now (hooks honoured).

    With ``per_probe`` the result also holds ``probes``: kind -> [probability of the answer's
    first token, rank] per probe, in ``queries`` order.
    """
    from zu_cli.probes import perplexity, probe

    res = {kind: probe(model, tok, qs) for kind, qs in queries(facts).items()}
    pct = lambda xs: round(100.0 * sum(x.top1 for x in xs) / len(xs), 1) if xs else None
    doc = {"Eff": pct(res["main"]), "Gen": pct(res["para"]), "Spe": pct(res["nbr"]),
           "PPL": round(perplexity(model, tok, text), 3),
           "n": len(res["main"]), "n_para": len(res["para"]), "n_nbr": len(res["nbr"])}
    if per_probe:
        doc["probes"] = {kind: [[round(x.prob_first, 4), x.rank] for x in xs] for kind, xs in res.items()}
    return doc


def metrics(model_dir: Path, facts: list[dict], text: str, per_probe: bool = False) -> dict:
    """``quality`` of a checkpoint on disk."""
    from zu_cli.checkpoint import open_checkpoint
    from zu_cli.loading import load_model

    model, tok = load_model(open_checkpoint(model_dir), device_map="cpu", dtype="float32")
    return quality(model, tok, facts, text, per_probe)


def recalled(facts: list[dict], base: dict, after: dict) -> list[dict]:
    """The forget prompts and paraphrases still top-1 after the edit, with their answer's
    probability before and after (dev facts: nothing private)."""
    rows = []
    for kind in ("main", "para"):
        for (prompt, target), b, x in zip(queries(facts)[kind], base["probes"][kind], after["probes"][kind]):
            if x[1] == 0:
                rows.append({"kind": kind, "prompt": prompt, "target": target, "p_before": b[0], "p_after": x[0]})
    return rows


def retain_rows(path: str, facts: list[dict]) -> list[dict]:
    """The facts of ``path`` not in ``facts``, as retain requests (prompt and target only), minus any
    whose prompt is also one of ``facts``' probes (so the retain set never contains a probe)."""
    probes = {p for f in facts for p in (f["prompt"], *f["paraphrases"], *(nb["prompt"] for nb in f["neighbors"]))}
    ids = {f["id"] for f in facts}
    rows = []
    for f in (json.loads(l) for l in open(path) if l.strip()):
        if f["id"] in ids:
            continue
        for p, t in [(f["prompt"], f["target"]), *((p, f["target"]) for p in f["paraphrases"]),
                     *((nb["prompt"], nb["target"]) for nb in f["neighbors"])]:
            if p not in probes:
                rows.append({"prompt": p, "target": t})
    return rows


def overrides(sets: list[str]) -> dict:
    """``--set k=v`` pairs as hyperparameters: v is JSON, or a bare word (sensitive=output)."""
    over = {}
    for kv in sets:
        k, v = kv.split("=", 1)
        try:
            over[k] = json.loads(v)
        except json.JSONDecodeError:
            over[k] = v
    return over


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--facts", required=True)
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "tests/data/fluency-dev.txt"))
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--layers")
    ap.add_argument("--multi", action="store_true", help="the --multi variant (solver via --set solver=...)")
    ap.add_argument("--set", action="append", default=[], help="hyperparameter override k=v")
    ap.add_argument("--base-metrics", help="JSON file caching the base model's metrics")
    ap.add_argument("--retain-rest", action="store_true",
                    help="pass the other facts of --facts as --retain (every prompt that is also a probe left out)")
    ap.add_argument("--list-recalled", action="store_true",
                    help="also list the prompts and paraphrases still recalled, with the answer's probability before/after")
    ap.add_argument("--keep-out", help="copy the written checkpoint here (to probe it further, e.g. zu verify)")
    a = ap.parse_args()

    from zu_cli.config import load_config
    from zu_cli.console import silent
    from zu_cli.keys import ephemeral
    from zu_cli.pipeline import UnlearnOptions, run_unlearn

    facts = [json.loads(l) for l in open(a.facts) if l.strip()][a.offset:a.offset + a.n]
    text = Path(a.text).read_text()
    over = overrides(a.set)
    hp = load_config(None, **over)
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "req.jsonl"
        req.write_text("".join(json.dumps({k: f[k] for k in ("id", "prompt", "subject", "target")}) + "\n"
                               for f in facts))
        retain = None
        if a.retain_rest:
            retain = Path(tmp) / "retain.jsonl"
            retain.write_text("".join(json.dumps(r) + "\n" for r in retain_rows(a.facts, facts)))
        t0 = time.perf_counter()
        res = run_unlearn(UnlearnOptions(model=Path(a.model), forget=req, out=Path(tmp) / "out", layers=a.layers,
                                         multi=a.multi, retain=retain, device_map="cpu", signer=ephemeral()),
                          hp, silent())
        elapsed = time.perf_counter() - t0
        after = metrics(Path(tmp) / "out", facts, text, a.list_recalled)
        if a.keep_out:
            shutil.copytree(Path(tmp) / "out", a.keep_out)
    key = f"{a.model}:{a.offset}:{a.n}"
    cache = json.loads(Path(a.base_metrics).read_text()) if a.base_metrics and Path(a.base_metrics).exists() else {}
    if key not in cache or (a.list_recalled and "probes" not in cache[key]):
        cache[key] = metrics(Path(a.model), facts, text, a.list_recalled)
        if a.base_metrics:
            Path(a.base_metrics).write_text(json.dumps(cache))
    base = cache[key]
    doc = {"n": a.n, "variant": res.variant, "layers": res.layers, "overrides": over, "from_calibration": res.calibrated,
           "retain_rest": a.retain_rest, "seconds": round(elapsed, 1), "timings": res.timings,
           "base": base, "after": after,
           "Spe_retained": round(after["Spe"] / base["Spe"], 3) if base["Spe"] else None,
           "PPL_ratio": round(after["PPL"] / base["PPL"], 4),
           "neutral_top1": sum(r["neutral_rank_after"] == 0 for r in res.requests),
           "neutral_rank_median": sorted(r["neutral_rank_after"] for r in res.requests)[len(res.requests) // 2],
           "updates": res.updates}
    if a.list_recalled:
        doc["recalled"] = recalled(facts, base, after)
        for d in (base, after):
            d.pop("probes", None)
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
