"""Closed form vs --multi (gradient and exact) on the same requests, side by side.

    python bench/variants.py --model DIR [--sizes 10,50,159] [--set k=v ...] [--out FILE] [--oracle-keep W]

Each variant runs as ``zu unlearn`` would run it on this model: the window and settings of the
model's calibration profile (run ``zu calibrate [--multi]`` first; without one, the default
windows), ``--solver`` staying the variant's. For each size the neutral targets and sensitive
vectors are computed once, over the union of the windows (they must end at the same layer; the
targets do not depend on the solver), and each variant then takes its statistics and edits its
layers; quality (Eff/Gen/Spe/PPL on the requests' unseen paraphrases and neighbours) is measured
on the edited weights in memory, which for an fp32 checkpoint are bit for bit what ``zu unlearn``
writes. Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))

from quality import overrides, quality  # noqa: E402  (bench/quality.py: the same Eff/Gen/Spe/PPL definitions)

VARIANTS = ("closed-form", "multi-gradient", "multi-exact")


def run_size(model_dir: Path, facts: list[dict], text: str, hp, variants: list[str], cache: Path | None = None,
             oracle_keep: float = 0.0) -> dict:
    """Shared stages once (or from ``cache``), then every variant's solve and quality.

    ``oracle_keep`` > 0 adds the probed neighbour prompts themselves to the solve's statistics
    with that weight (as ``--retain`` would): a keep-set no user has, for diagnosis only — it
    bounds what any stand-in keep-set can do for the neighbours.
    """
    import dataclasses

    from zu_cli import edit, update
    from zu_cli.arch import num_layers
    from zu_cli.calibrate import load_profile, settings
    from zu_cli.windows import default_window, multi_window
    from zu_cli.checkpoint import open_checkpoint
    from zu_cli.loading import load_model
    from zu_cli.console import silent
    from zu_cli.errors import NumericalError
    from zu_cli.manifest import dir_digests, sha256_file_list
    from zu_cli.requests import load_requests
    from zu_cli.keep import keep_moments, solve_moments, with_keep
    from zu_cli.text import neutral_ids

    out = silent()
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model_dir)
    spec = ckpt.spec
    n_layers = num_layers(spec, ckpt.config)
    # Each variant gets what `zu unlearn` (with or without --multi) would give it: the model's
    # calibrated window and settings (`zu calibrate` first), else the default window.
    prof = load_profile(sha256_file_list(dir_digests(ckpt.path)))
    plan = {}
    for v in variants:
        multi = v != "closed-form"
        if prof is not None:
            lay = prof.multi_layers if multi else prof.layers
        else:
            lay = default_window(n_layers)
            lay = multi_window(lay) if multi else lay
        vhp = hp
        if multi:  # as `zu unlearn --multi --solver ...`: the solver is the user's, the rest may be calibrated
            vhp = dataclasses.replace(hp, solver=v.split("-")[1], explicit=hp.explicit | {"solver"})
        plan[v] = (lay, *settings(prof, lay, vhp, multi))
    if len({lay[-1] for lay, *_ in plan.values()}) != 1:
        raise SystemExit("variants whose windows end at different layers need separate targets; run them apart")
    layers = sorted({l for lay, *_ in plan.values() for l in lay})  # targets for the union of the windows
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        req = Path(tmp) / "req.jsonl"
        req.write_text("".join(json.dumps({k: f[k] for k in ("id", "prompt", "subject", "target")}) + "\n"
                               for f in facts))
        requests = load_requests(req)
    weights = {l: ckpt.read_tensor(spec.down_proj_weight(l)) for l in layers}
    weights = {l: (w.T if spec.transposed else w) for l, w in weights.items()}
    biases = {l: None for l in layers}
    base = quality(model, tok, facts, text)
    shared = {"load_and_base_probes": time.perf_counter() - t0}
    t0 = time.perf_counter()
    templates = edit.context_templates(model, tok, hp)
    kinds = {v: p[3] for v, p in plan.items()}
    cached = None
    if cache is not None:  # the targets do not depend on the solver: reuse them across runs
        import hashlib

        import torch

        # Only what the targets stage reads: solver settings can change without recomputing them.
        stage = {k: v for k, v in hp.to_dict().items()
                 if k.startswith(("z_", "sens", "n_prefixes", "prefix_len", "optim_dtype", "seed"))}
        key = hashlib.sha256(json.dumps([str(model_dir), [f["id"] for f in facts], layers, stage,
                                         sorted(set(kinds.values()))],
                                        sort_keys=True, default=str).encode()).hexdigest()[:16]
        path = cache / f"targets-{key}.pt"
        cached = torch.load(path) if path.exists() else None
    if cached is not None:
        z, z_prob, sens = cached[:3]
        shared["targets_cached_from_s"] = cached[3] if len(cached) > 3 else None
    else:
        # The closed form's default sensitive vectors may need the push; "output" ones come free.
        first = next((k for k in kinds.values() if k != "output"), "output")
        z, z_prob, sens0 = edit.edit_targets(model, tok, spec, requests, layers, templates,
                                             neutral_ids(tok, requests, "eos"), hp, first, out)
        sens = {first: sens0}
        if "output" in kinds.values() and first != "output":
            sens["output"] = edit.sensitive_outputs(model, tok, spec, requests, layers, templates)
        if cache is not None:
            cache.mkdir(parents=True, exist_ok=True)
            torch.save((z, z_prob, sens, round(time.perf_counter() - t0, 1)), path)
    shared["targets"] = time.perf_counter() - t0
    source = sha256_file_list(dir_digests(ckpt.path))
    rows, moments = {}, {}
    probed = list(dict.fromkeys(nb["prompt"] for f in facts for nb in f.get("neighbors", [])))
    for v, (lay, vhp, pins, kind) in plan.items():
        t0 = time.perf_counter()
        multi = v != "closed-form"
        # gradient and exact share window and settings but the solver: their statistics once
        mkey = (tuple(lay), multi,
                json.dumps(dataclasses.replace(vhp, solver="-").to_dict(), sort_keys=True, default=str))
        if mkey not in moments:
            g, kk, _ = solve_moments(model, tok, spec, lay, biases, vhp, None, source, [], out, keys=multi,
                                     closed=not multi, requests=requests)
            if oracle_keep:  # the probed prompts' forward passes, like the statistics, once per mkey
                g_o, kk_o = keep_moments(model, tok, spec, lay, biases, probed, out, keys=multi)
                g, kk = with_keep(g, g_o, oracle_keep), with_keep(kk, kk_o, oracle_keep)
            moments[mkey] = g, kk
        g, kk = moments[mkey]
        stats_s = time.perf_counter() - t0
        solver = update.multi_solver(kk, vhp) if multi else update.closed_form_solver(g, vhp)
        t0 = time.perf_counter()
        try:
            ups = update.edit_layers(model, tok, spec, requests, lay, {l: weights[l] for l in lay}, biases, z,
                                     sens[kind], templates, vhp, solver, out)
        except NumericalError as exc:  # a variant that cannot take this many requests: record it (exit 5 in zu)
            rows[v] = {"layers": lay, "from_calibration": pins, "error": exc.message,
                       "solve_s": round(time.perf_counter() - t0, 1)}
            continue
        solve_s = time.perf_counter() - t0
        with update.applied(model, spec, {u.layer: u.new for u in ups}, biases):
            after = quality(model, tok, facts, text)
        rows[v] = {**after, "layers": lay, "from_calibration": pins, "sensitive": kind,
                   "Spe_retained": round(after["Spe"] / base["Spe"], 3) if base["Spe"] else None,
                   "PPL_ratio": round(after["PPL"] / base["PPL"], 4), "statistics_s": round(stats_s, 1),
                   "solve_s": round(solve_s, 1), "total_s": round(solve_s + shared["targets"] + stats_s, 1),
                   "rel_change": [round(u.rel_change, 4) for u in ups],
                   "solver": [{k: (round(x, 4) if isinstance(x, float) else x) for k, x in u.info.items()}
                              for u in ups]}
    return {"n": len(facts), "target_layers": layers, "base": base, "neutral_prob_min": round(float(z_prob.min()), 3),
            "shared_s": {k: x if x is None else round(x, 1) for k, x in shared.items()}, "variants": rows,
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="checkpoint (default: the cached SmolLM2 fp32 conversion)")
    ap.add_argument("--facts", default=str(ROOT / "tests/data/facts-dev.jsonl"))
    ap.add_argument("--text", default=str(ROOT / "tests/data/fluency-dev.txt"))
    ap.add_argument("--sizes", default="10,50,159")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--set", action="append", default=[], help="hyperparameter override k=v (v is JSON)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--targets-cache", help="folder keeping the computed targets, reused by a rerun")
    ap.add_argument("--oracle-keep", type=float, default=0.0,
                    help="diagnosis only: the probed neighbour prompts join the statistics with this weight")
    a = ap.parse_args()

    from zu_cli.config import load_config

    model = Path(a.model) if a.model else __import__("smollm2").smollm2_fp32()
    facts = [json.loads(l) for l in open(a.facts) if l.strip()]
    text = Path(a.text).read_text()
    hp = load_config(None, **overrides(a.set))
    doc = {"model": str(model), "overrides": a.set, "oracle_keep": a.oracle_keep, "sizes": []}
    for n in (int(x) for x in a.sizes.split(",")):
        doc["sizes"].append(run_size(model, facts[:n], text, hp, a.variants.split(","),
                                      Path(a.targets_cache) if a.targets_cache else None, a.oracle_keep))
        if a.out:
            Path(a.out).write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
