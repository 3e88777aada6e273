"""Unlearn N dev facts on a checkpoint and measure Eff/Gen/Spe/PPL on the written output vs the base.

    python bench/quality.py --model DIR --facts tests/data/facts-dev.jsonl --n 10 [--set k=v ...]

Requests are edited WITHOUT their paraphrases and neighbours, which are then probed (unseen).
Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def quality(model, tok, facts: list[dict], text: str) -> dict:
    """Eff/Gen/Spe (% still top-1) and perplexity of the model as it runs now (hooks honoured)."""
    from zu_cli.probes import perplexity, probe

    main = probe(model, tok, [(f["prompt"], f["target"]) for f in facts])
    para = probe(model, tok, [(p, f["target"]) for f in facts for p in f.get("paraphrases", [])])
    nbr = probe(model, tok, [(nb["prompt"], nb["target"]) for f in facts for nb in f.get("neighbors", [])])
    pct = lambda xs: round(100.0 * sum(x.top1 for x in xs) / len(xs), 1) if xs else None
    return {"Eff": pct(main), "Gen": pct(para), "Spe": pct(nbr), "PPL": round(perplexity(model, tok, text), 3),
            "n": len(main), "n_para": len(para), "n_nbr": len(nbr)}


def metrics(model_dir: Path, facts: list[dict], text: str) -> dict:
    """``quality`` of a checkpoint on disk."""
    from zu_cli.checkpoint import open_checkpoint
    from zu_cli.loading import load_model

    model, tok = load_model(open_checkpoint(model_dir), device_map="cpu", dtype="float32")
    return quality(model, tok, facts, text)


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
        after = metrics(Path(tmp) / "out", facts, text)
    key = f"{a.model}:{a.offset}:{a.n}"
    cache = json.loads(Path(a.base_metrics).read_text()) if a.base_metrics and Path(a.base_metrics).exists() else {}
    if key not in cache:
        cache[key] = metrics(Path(a.model), facts, text)
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
    print(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
