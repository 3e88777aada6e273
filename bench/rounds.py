"""Requests over time: R rounds of N dev facts, each round editing the previous round's output,
then Eff/Gen/Spe/PPL on every fact edited so far (against the base model) after chosen rounds.

    python bench/rounds.py --model DIR --facts tests/data/facts-dev.jsonl --rounds 16 --per-round 10 \
        [--protect | --rebase] [--probe-at 1,4,8,16] [--multi] [--once]

Requests are edited WITHOUT their paraphrases and neighbours, which are then probed (unseen).
``--protect`` passes every earlier round's request file as ``--previous`` (docs/method.md,
"Requests over time"). ``--rebase`` edits the base model each round with every request so far
(``zu unlearn --base``), extending the previous round's history. ``--once`` edits all R x N facts in one run instead (the side-by-side
column; use it with ``--multi``). Prints one JSON line per probed round, then a summary line.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import metrics  # noqa: E402  (bench/quality.py: Eff/Gen/Spe/PPL of a checkpoint on disk)


def _requests(path: Path, facts: list[dict]) -> Path:
    path.write_text("".join(json.dumps({k: f[k] for k in ("id", "prompt", "subject", "target")}) + "\n"
                            for f in facts))
    return path


def _edit(src: Path, req: Path, out: Path, previous: list[Path], multi: bool, layers: str | None,
          base: Path | None = None) -> dict:
    from zu_cli.config import load_config
    from zu_cli.console import silent
    from zu_cli.keys import ephemeral
    from zu_cli.pipeline import UnlearnOptions, run_unlearn

    t0 = time.perf_counter()
    res = run_unlearn(UnlearnOptions(model=src, forget=req, out=out, layers=layers, multi=multi, device_map="cpu",
                                     signer=ephemeral(), previous=previous, base=base), load_config(None), silent())
    return {"seconds": round(time.perf_counter() - t0, 1), "timings": res.timings, "layers": res.layers,
            "forgotten": res.counts["forgotten"], "max_rel_change": max(u["rel_change"] for u in res.updates)}


def _score(model: Path, base: Path, facts: list[dict], text: str, cache: dict) -> dict:
    key = f"{len(facts)}:{facts[0]['id']}:{facts[-1]['id']}"
    if key not in cache:
        cache[key] = metrics(base, facts, text)
    b, a = cache[key], metrics(model, facts, text)
    return {"facts": len(facts), "Eff": a["Eff"], "Gen": a["Gen"], "Spe": a["Spe"], "PPL": a["PPL"],
            "base": b, "forgotten_pct": round(100 - 100 * a["Eff"] / b["Eff"], 1) if b["Eff"] else None,
            "Spe_retained": round(a["Spe"] / b["Spe"], 3) if b["Spe"] else None,
            "PPL_ratio": round(a["PPL"] / b["PPL"], 4)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, type=Path)
    ap.add_argument("--facts", required=True)
    ap.add_argument("--text", default=str(Path(__file__).resolve().parents[1] / "tests/data/fluency-dev.txt"))
    ap.add_argument("--rounds", type=int, default=16)
    ap.add_argument("--per-round", type=int, default=10)
    ap.add_argument("--probe-at", default="1,4,8,16")
    ap.add_argument("--protect", action="store_true", help="--previous with every earlier round's requests")
    ap.add_argument("--rebase", action="store_true", help="edit the base with every request so far (--base)")
    ap.add_argument("--multi", action="store_true")
    ap.add_argument("--once", action="store_true", help="all facts in one edit (the side-by-side column)")
    ap.add_argument("--layers")
    a = ap.parse_args()

    facts = [json.loads(line) for line in open(a.facts) if line.strip()]
    text = Path(a.text).read_text()
    probe_at = {int(r) for r in a.probe_at.split(",")}
    cache: dict = {}
    with tempfile.TemporaryDirectory(prefix="zu-rounds-") as tmp:
        work = Path(tmp)
        if a.once:
            edited = facts[:a.rounds * a.per_round]
            info = _edit(a.model, _requests(work / "all.jsonl", edited), work / "out", [], a.multi, a.layers)
            doc = {"mode": "once", "multi": a.multi, **info, **_score(work / "out", a.model, edited, text, cache)}
            print(json.dumps(doc), flush=True)
            return 0
        src, earlier, seconds = a.model, [], []
        for r in range(1, a.rounds + 1):
            chunk = facts[(r - 1) * a.per_round:r * a.per_round]
            if not chunk:
                break
            req = _requests(work / f"round{r}.jsonl", chunk)
            out = work / f"r{r}"
            rebase = a.rebase and src != a.model
            info = _edit(src, req, out, list(earlier) if a.protect or a.rebase else [], a.multi, a.layers,
                         a.model if rebase else None)
            seconds.append(info["seconds"])
            if src != a.model:
                shutil.rmtree(src)  # one checkpoint on disk at a time
            src = out
            earlier.append(req)
            if r in probe_at or r == a.rounds:
                edited = facts[:r * a.per_round]
                row = {"round": r, "protect": a.protect, "rebase": a.rebase, "multi": a.multi, **info,
                       **_score(out, a.model, edited, text, cache)}
                print(json.dumps(row), flush=True)
        from zu_cli.lineage import chain

        links, problems = chain(src)
        print(json.dumps({"summary": True, "rounds": len(seconds), "protect": a.protect, "rebase": a.rebase, "round_seconds": seconds,
                          "links": len(links), "chain_problems": problems}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
