"""Real-model quality tier: SmolLM2-135M with facts it really knows (tests/data/facts-dev.jsonl).

Requests are edited WITHOUT their paraphrases and neighbours, which are then probed: both are unseen.
Everything is measured on the checkpoint as written, reloaded from disk.
"""

from __future__ import annotations

import json

import pytest

from conftest import DATA
from zu_cli.checkpoint import load_model, open_checkpoint
from zu_cli.config import Hyper
from zu_cli.console import silent
from zu_cli.pipeline import UnlearnOptions, run_unlearn
from zu_cli.verify import perplexity, probe

pytestmark = pytest.mark.slow
FACTS = [json.loads(l) for l in (DATA / "facts-dev.jsonl").read_text().splitlines() if l.strip()]
TEXT = (DATA / "fluency-dev.txt").read_text()


def scores(model_dir, facts) -> dict:
    """Eff / Gen / Spe (% still top-1) and perplexity of a checkpoint on ``facts``."""
    model, tok = load_model(open_checkpoint(model_dir), device_map="cpu", dtype="float32")
    top1 = lambda qs: [p.top1 for p in probe(model, tok, qs)]
    return {"eff": top1([(f["prompt"], f["target"]) for f in facts]),
            "gen": top1([(p, f["target"]) for f in facts for p in f["paraphrases"]]),
            "spe": top1([(nb["prompt"], nb["target"]) for f in facts for nb in f["neighbors"]]),
            "ppl": perplexity(model, tok, TEXT)}


def unlearn(model_dir, facts, tmp_path):
    req = tmp_path / "forget.jsonl"
    req.write_text("".join(json.dumps({k: f[k] for k in ("id", "prompt", "subject", "target")}) + "\n"
                           for f in facts))
    res = run_unlearn(UnlearnOptions(model=model_dir, forget=req, out=tmp_path / "out", device_map="cpu"),
                      Hyper(), silent())
    return tmp_path / "out", res


def check_quality(base, after, n):
    rate = lambda xs: sum(xs) / len(xs)
    report = {"recalled": rate(after["eff"]), "para": rate(after["gen"]),
              "nbr_kept": rate(after["spe"]) / rate(base["spe"]), "ppl_ratio": after["ppl"] / base["ppl"]}
    assert rate(base["eff"]) == 1.0  # the base model knows every one of these facts
    assert 1 - report["recalled"] >= 0.90, report
    assert report["para"] <= 0.40, report
    assert report["nbr_kept"] >= 0.75, report
    assert report["ppl_ratio"] <= 1.03, report
    return report


@pytest.mark.parametrize("n", [10, 50])
def test_smollm2_fp32_quality(smollm2, tmp_path, n):
    facts = FACTS[:n]
    out, res = unlearn(smollm2, facts, tmp_path)
    check_quality(scores(smollm2, facts), scores(out, facts), n)
    assert sum(r["neutral_rank_after"] == 0 for r in res.requests) >= n // 2  # the neutral target really rose


def test_smollm2_bf16_sharded_quality(smollm2_bf16, tmp_path):
    facts = FACTS[:10]
    out, _ = unlearn(smollm2_bf16, facts, tmp_path)
    src, dst = open_checkpoint(smollm2_bf16), open_checkpoint(out)
    assert dst.disk_dtypes == src.disk_dtypes and dst.shards() == src.shards()
    check_quality(scores(smollm2_bf16, facts), scores(out, facts), 10)
