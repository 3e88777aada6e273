"""Shared by the real-model tiers: unlearn dev facts with zu's defaults and score the written checkpoint.

Requests are edited WITHOUT their paraphrases and neighbours, which are then probed: both are unseen.
"""

from __future__ import annotations

import json

from conftest import DATA
from zu_cli.checkpoint import open_checkpoint
from zu_cli.loading import load_model
from zu_cli.config import Hyper
from zu_cli.console import silent
from zu_cli.pipeline import UnlearnOptions, run_unlearn
from zu_cli.probes import perplexity, probe

TEXT = (DATA / "fluency-dev.txt").read_text()


def load_facts(name: str) -> list[dict]:
    """A dev fact file of tests/data."""
    return [json.loads(l) for l in (DATA / name).read_text().splitlines() if l.strip()]


def scores(model_dir, facts) -> dict:
    """Eff / Gen / Spe (% still top-1) and perplexity of a checkpoint on ``facts``."""
    model, tok = load_model(open_checkpoint(model_dir), device_map="cpu", dtype="float32")
    top1 = lambda qs: [p.top1 for p in probe(model, tok, qs)]
    return {"eff": top1([(f["prompt"], f["target"]) for f in facts]),
            "gen": top1([(p, f["target"]) for f in facts for p in f["paraphrases"]]),
            "spe": top1([(nb["prompt"], nb["target"]) for f in facts for nb in f["neighbors"]]),
            "ppl": perplexity(model, tok, TEXT)}


def fingerprint(model_dir) -> str:
    """The weights' fingerprint zu keys a model's calibration by (as the pipeline computes it)."""
    from zu_cli import manifest

    return manifest.sha256_file_list(manifest.dir_digests(open_checkpoint(model_dir).path))


def seed_profile(model_dir, recorded: dict) -> None:
    """Store ``recorded`` (a profile zu calibrate wrote, as a dict) as this checkpoint's calibration,
    so that a tier does not pay a cold calibration twice for one model (CI's time limit).

    Raises:
        AssertionError: the recording is of another calibration version, which zu would discard
            and recalibrate cold (~30 min for Qwen in CI) before failing the tier.
    """
    from zu_cli.calibrate import VERSION, Profile, store_profile

    assert recorded.get("version") == VERSION, (
        f"recorded profile is calibration v{recorded.get('version')}, zu is v{VERSION}: "
        "re-record it with `zu calibrate --model DIR --force --json`")
    store_profile(Profile(**{**recorded, "fingerprint": fingerprint(model_dir)}))


def unlearn(model_dir, facts, tmp_path, multi=False):
    return unlearn_with(model_dir, facts, tmp_path, Hyper(), multi)


def unlearn_with(model_dir, facts, tmp_path, hp, multi=False):
    """``zu unlearn`` of ``facts`` (without paraphrases or neighbours) with ``hp``: (output dir, result)."""
    req = tmp_path / "forget.jsonl"
    req.write_text("".join(json.dumps({k: f[k] for k in ("id", "prompt", "subject", "target")}) + "\n"
                           for f in facts))
    res = run_unlearn(UnlearnOptions(model=model_dir, forget=req, out=tmp_path / "out", device_map="cpu",
                                     multi=multi), hp, silent())
    return tmp_path / "out", res


def check_quality(base, after, n):
    """Design targets (§7): >= 90 % forgotten, paraphrases <= 40 %, neighbours >= 75 % of base, PPL <= +3 %.

    The authors' code on SmolLM2 with 10 facts: 80 %, 50 %, 50 %, +3 %. What zu measures is in
    docs/results.md.
    """
    rate = lambda xs: sum(xs) / len(xs)
    report = {"recalled": rate(after["eff"]), "para": rate(after["gen"]),
              "nbr_kept": rate(after["spe"]) / rate(base["spe"]), "ppl_ratio": after["ppl"] / base["ppl"]}
    assert rate(base["eff"]) == 1.0  # the base model knows every one of these facts
    assert 1 - report["recalled"] >= 0.90, report
    assert report["para"] <= 0.40, report
    assert report["nbr_kept"] >= 0.75, report
    assert report["ppl_ratio"] <= 1.03, report
    return report
