"""Stage times and peak memory of `zu unlearn` on SmolLM2-135M for 1, 10 and 50 requests.

    python bench/unlearn.py [--sizes 1,10,50] [--model DIR] [--cold] [--layers 8,9,10] [--set k=v ...]

Each size runs in its own process (peak RSS is per process). Statistics are warmed by a first
run unless --cold. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def one(model: str, n: int, tmp: Path, extra: list[str]) -> dict:
    """Run one size in a fresh process so its peak RSS is its own (``extra``: --layers/--set passed on)."""
    proc = subprocess.run([sys.executable, __file__, "--one", str(n), "--model", model, "--tmp", str(tmp), *extra],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"n={n} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout)


def inner(model: str, n: int, tmp: Path, layers: str | None, sets: list[str]) -> dict:
    """One `zu unlearn` in this process: stage times, result counts, peak RSS."""
    sys.path.insert(0, str(ROOT))
    from zu_cli.config import load_config
    from zu_cli.console import silent
    from zu_cli.keys import ephemeral
    from zu_cli.pipeline import UnlearnOptions, run_unlearn
    from transformers import AutoConfig

    from quality import overrides  # bench/quality.py, beside this script

    from zu_cli import checkpoint, edit, manifest, probes, stats, update  # noqa: F401

    facts = [json.loads(l) for l in open(ROOT / "tests/data/facts-dev.jsonl")][:n]
    req = tmp / f"req{n}.jsonl"
    req.write_text("".join(json.dumps({k: f[k] for k in ("id", "prompt", "subject", "target")}) + "\n"
                           for f in facts))
    # zu's own memory is measured from here: the interpreter, torch and transformers are loaded,
    # the weights are not. Reading a config makes transformers import ~1,100 more modules
    # (~100 MiB); with them, ~340 MiB of libraries that do not grow with the model.
    AutoConfig.from_pretrained(model)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    hp = load_config(None, **overrides(sets))
    res = run_unlearn(UnlearnOptions(model=Path(model), forget=req, out=tmp / f"out{n}", device_map="cpu",
                                     layers=layers, force=True, signer=ephemeral()), hp, silent())
    return {"requests": n, "wall_s": round(time.perf_counter() - t0, 1), "stages_s": res.timings,
            "forgotten": sum(not r["recalled_after"] for r in res.requests),
            "neutral_top1": sum(r["neutral_rank_after"] == 0 for r in res.requests),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "baseline_rss_mib": round(baseline)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,10,50")
    ap.add_argument("--model")
    ap.add_argument("--cold", action="store_true", help="do not warm the statistics first")
    ap.add_argument("--layers", help="edited layers (default: the architecture's window)")
    ap.add_argument("--set", action="append", default=[], help="hyperparameter override k=v (v as JSON)")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(inner(a.model, a.one, Path(a.tmp), a.layers, a.set)))
        return 0
    if a.model is None:
        from smollm2 import smollm2_fp32

        a.model = str(smollm2_fp32())
    ckpt_mib = sum(p.stat().st_size for p in Path(a.model).glob("*.safetensors")) / 2**20
    extra = ([f"--layers={a.layers}"] if a.layers else []) + [f"--set={kv}" for kv in a.set]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        if not a.cold:
            one(a.model, 1, Path(tmp), extra)  # warms the statistics cache
        for n in [int(x) for x in a.sizes.split(",")]:
            run = one(a.model, n, Path(tmp), extra)
            # Design §7's bound is 2x the checkpoint; both readings, with and without the libraries.
            run["peak_over_checkpoint"] = round(run["peak_rss_mib"] / ckpt_mib, 2)
            run["zu_peak_over_checkpoint"] = round((run["peak_rss_mib"] - run["baseline_rss_mib"]) / ckpt_mib, 2)
            runs.append(run)
    print(json.dumps({"model": a.model, "layers": a.layers, "overrides": a.set, "checkpoint_mib": round(ckpt_mib),
                      "device": "cpu", "threads": os.cpu_count(), "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
