"""Real-model quality tier: SmolLM2-135M with facts it really knows (tests/data/facts-dev.jsonl).

Requests are edited WITHOUT their paraphrases and neighbours, which are then probed: both are unseen.
Everything is measured on the checkpoint as written, reloaded from disk.
"""

from __future__ import annotations

import json

import pytest

from realmodel import check_quality, load_facts, scores, unlearn
from zu_cli.checkpoint import open_checkpoint
from zu_cli.loading import load_model
from zu_cli.probes import probe
from zu_cli.verdicts import Criteria

pytestmark = pytest.mark.slow
FACTS = load_facts("facts-dev.jsonl")


@pytest.fixture(scope="module")
def edit10(smollm2, tmp_path_factory):
    """The first 10 dev facts forgotten from fp32 SmolLM2 (shared by the quality and the verify tests)."""
    tmp = tmp_path_factory.mktemp("smollm2-10")
    out, res = unlearn(smollm2, FACTS[:10], tmp)
    return out, res


def test_smollm2_fp32_quality(smollm2, edit10):
    facts = FACTS[:10]
    out, res = edit10
    check_quality(scores(smollm2, facts), scores(out, facts), 10)
    ranks = sorted(r["neutral_rank_after"] for r in res.requests)
    assert ranks[len(ranks) // 2] <= 10, ranks  # the neutral target really rose (reference: median ~30k of 49k)


def test_zu_verify_on_smollm2(smollm2, edit10, tmp_path):
    """The CI gate on a real model: the unedited model fails with every fact recalled; after the edit
    the exit code is what the probes say; one JSON entry per request, one JUnit case per probe."""
    from typer.testing import CliRunner

    from zu_cli.cli import app

    runner = CliRunner()
    req = tmp_path / "probe.jsonl"
    req.write_text("".join(json.dumps({k: f[k] for k in ("id", "prompt", "subject", "target", "paraphrases",
                                                          "neighbors")}) + "\n" for f in FACTS[:10]))
    res = runner.invoke(app, ["verify", "--model", str(smollm2), "--forget", str(req), "--json"])
    assert res.exit_code == 1
    base = json.loads(res.stdout)
    assert all(next(p for p in r["probes"] if p["kind"] == "forget")["passed"] is False for r in base["requests"])
    assert len(base["requests"]) == 10
    junit = tmp_path / "junit.xml"
    res = runner.invoke(app, ["verify", "--model", str(edit10[0]), "--forget", str(req), "--baseline", str(smollm2),
                              "--json", "--junit", str(junit), "--deep"])
    doc = json.loads(res.stdout)
    probes = [p for r in doc["requests"] for p in r["probes"]] + doc["gates"]
    assert res.exit_code == (1 if any(p["passed"] is False for p in probes) else 0), res.output
    assert len(doc["requests"]) == 10 and doc["integrity"]["problems"] == []
    assert sum(p["passed"] is True for r in doc["requests"] for p in r["probes"] if p["kind"] == "forget") >= 9
    import xml.etree.ElementTree as ET

    assert len(ET.parse(junit).getroot().findall("testcase")) == len(probes) + 1
    assert len(doc["deep"]["decodable_after"]) == 30
    # Priors: the unedited model's answers for invented subjects ("Edward Zorbin", "Edward Quellan",
    # "Edward Mertz"), as direct probes of those texts give them; some of these facts follow from the
    # rest of the prompt, most do not
    model, tok = load_model(open_checkpoint(smollm2), device_map="cpu", dtype="float32")
    names = ("Zorbin", "Quellan", "Mertz")
    fake = [(f["prompt"].replace(f["subject"], " ".join(f["subject"].split()[:-1] + [n])), f["target"])
            for f in FACTS[:10] for n in names]
    rec = [Criteria().recalled(p) for p in probe(model, tok, fake)]
    expected = [all(rec[i:i + len(names)]) for i in range(0, len(rec), len(names))]
    got = [next(p for p in r["probes"] if p["kind"] == "forget")["prior"] for r in base["requests"]]
    assert got == expected and 0 < sum(got) < 10, got
    for f in FACTS[:10]:  # nothing sensitive in any output without --reveal
        assert f["target"] not in res.output + junit.read_text() and f["subject"] not in res.output


# GGUF; and bitsandbytes' 4-bit as transformers loads it (docs/results.md: the default edit loses
# one NF4 probe; FP4, keyed too, still loses 3 of 13 at 10 facts, so it is not asserted here).
@pytest.mark.parametrize("keys,formats", [("Q4_0,Q5_0", ("Q5_0", "Q4_0")),
                                          ("bnb-fp4,bnb-nf4", ("bnb-int8", "bnb-nf4"))])
def test_quant_keys_edit_survives_round_trips(smollm2, edit10, tmp_path, keys, formats):
    """Issue 26: solved with keys of the round trips as well, the edit of the same 10 facts keeps
    >= 95 % of what it forgot after each round trip (the default edit lost a probe to Q5_0, Q4_0
    and NF4 each, docs/results.md), and still forgets the prompts."""
    from typer.testing import CliRunner

    from realmodel import unlearn_with
    from zu_cli.cli import app
    from zu_cli.config import Hyper

    out, res = unlearn_with(smollm2, FACTS[:10], tmp_path, Hyper(quant_keys=keys))
    assert res.layers == edit10[1].layers and all(u.get("quant_keys") == 2 for u in res.updates)
    assert sum(not r["recalled_after"] for r in res.requests) >= 9
    req = tmp_path / "probe.jsonl"
    req.write_text("".join(json.dumps({k: f[k] for k in ("id", "prompt", "subject", "target", "paraphrases")}) + "\n"
                           for f in FACTS[:10]))
    run = CliRunner().invoke(app, ["verify", "--model", str(out), "--forget", str(req), "--baseline", str(smollm2),
                                   "--attack", "quant", "--quant-formats", ",".join(formats), "--json"])
    doc = json.loads(run.stdout)
    probes = [p for r in doc["requests"] for p in r["probes"]]
    forgotten = {p["name"].rsplit("/", 1)[0] + ("/prompt" if p["kind"] == "forget" else "/" + p["name"].rsplit("/", 1)[1])
                 for p in probes if p["kind"] in ("forget", "paraphrase") and p["passed"]}
    for fmt in formats:
        judged = [p for p in doc["attacks"]["probes"] if f"/quant-{fmt}/" in p["name"] and p["passed"] is not None
                  and p["name"].replace(f"/quant-{fmt}", "") in forgotten]
        assert judged, fmt
        assert sum(p["passed"] for p in judged) >= 0.95 * len(judged), (fmt, [p["name"] for p in judged if not p["passed"]])


def test_subject_that_is_the_prompts_first_token(smollm2, tmp_path):
    """"Italy's capital," puts its subject's token at position 0 of the bare prompt: SmolLM2's
    attention sink, whose hidden state reaches norm 24,000 at the edited layers (others ~200). Read
    there, it drove the closed form to a 635 % weight change (exit 5), and with only that row left
    out the fact stayed recalled; read at the prompt's last token, it is forgotten by a small edit."""
    fact = next(f for f in FACTS if f["subject"] == "Italy" and f["prompt"].startswith("Italy"))
    out, res = unlearn(smollm2, [fact], tmp_path)
    assert max(u["rel_change"] for u in res.updates) < 0.5, res.updates
    model, tok = load_model(open_checkpoint(out), device_map="cpu", dtype="float32")
    assert not probe(model, tok, [(fact["prompt"], fact["target"])])[0].top1


def test_smollm2_multi_50_facts_design_targets(smollm2, tmp_path):
    """Issue 3's 50-fact targets, met by ``zu unlearn --multi`` with the settings SmolLM2's
    calibration chooses (layers 0-4 from causal tracing, exact solve, null-space weight 1e5, the
    keep-sets; docs/results.md, "--multi at the traced layers"). Measured with bench/quality.py on
    the same facts: 100 % forgotten, 6 % of paraphrases, 83 % of neighbours, perplexity +2.3 %
    (at 6-10, the earlier rule's window: 96 %, 10 %, 90 %, +2.7 %); ~10 min here."""
    from zu_cli.calibrate import load_profile
    from realmodel import fingerprint

    facts = FACTS[:50]
    out, res = unlearn(smollm2, facts, tmp_path, multi=True)
    assert res.layers_how.startswith("calibration") and "multi_general_weight" in res.calibrated
    assert load_profile(fingerprint(smollm2)).multi["multi_general_weight"] == 1e5  # calibration reproduces it
    check_quality(scores(smollm2, facts), scores(out, facts), 50)


def test_smollm2_bf16_sharded_quality(smollm2, smollm2_bf16, tmp_path):
    """The bf16 sharded copy of the same model, edited with the fp32 copy's calibration (computed by
    the tests above; calibrated cold here when run alone): the dtype and sharding paths, not a
    second calibration of one model."""
    from dataclasses import asdict

    from realmodel import fingerprint, seed_profile
    from zu_cli.calibrate import load_profile

    fp32 = load_profile(fingerprint(smollm2))
    if fp32 is not None:
        seed_profile(smollm2_bf16, asdict(fp32))
    facts = FACTS[:10]
    out, res = unlearn(smollm2_bf16, facts, tmp_path)
    assert res.layers_how.startswith("calibration"), res.layers_how
    src, dst = open_checkpoint(smollm2_bf16), open_checkpoint(out)
    assert dst.disk_dtypes == src.disk_dtypes and dst.shards() == src.shards()
    check_quality(scores(smollm2_bf16, facts), scores(out, facts), 10)


@pytest.mark.xfail(run=False, reason="not met on this model (docs/method.md, 'The 159-fact ceiling'): "
                   "with the settings then pinned for SmolLM2 (now calibrated) 159 facts at once forget 91.2 %, 13.2 % of paraphrases, keep 54.7 % "
                   "of neighbours at perplexity +8.3 % (bench/variants.py); even with the probed neighbours "
                   "themselves as a keep-set no setting measured meets all four targets. ~28 min here")
def test_smollm2_multi_all_dev_facts(smollm2, tmp_path):
    """--multi (the model's calibrated settings) with all 159 dev facts at once, measured on the written
    checkpoint; issue targets: >= 90 % forgotten, paraphrases <= 40 %, neighbours >= 70 % of base,
    perplexity <= +5 %."""
    out, res = unlearn(smollm2, FACTS, tmp_path, multi=True)
    assert len(FACTS) == 159 and all(u["null_dim"] > 0 for u in res.updates)
    after, base = scores(out, FACTS), scores(smollm2, FACTS)
    rate = lambda xs: sum(xs) / len(xs)
    report = {"recalled": rate(after["eff"]), "para": rate(after["gen"]),
              "nbr_kept": rate(after["spe"]) / rate(base["spe"]), "ppl_ratio": after["ppl"] / base["ppl"]}
    assert 1 - report["recalled"] >= 0.90, report
    assert report["para"] <= 0.40, report
    assert report["nbr_kept"] >= 0.70, report
    assert report["ppl_ratio"] <= 1.05, report


def test_readme_quick_start_runs_as_pasted(smollm2, tmp_path):
    """README.md's quick start, verbatim, in an empty folder with a fresh HOME and SmolLM2 in a
    Hugging Face cache (the hub's layout, offline): every command exits 0, as for a new user."""
    import os
    import re
    import subprocess
    from pathlib import Path

    from hubcache import hub_cache

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    # The quick start, then every later block that works on its output (next week's requests), in order.
    blocks = [b for b in re.findall(r"```bash\n(.*?)```", readme, re.S) if "zu unlearn" in b or "smollm2-clean" in b]
    block = "\n".join(blocks)
    hf = hub_cache(tmp_path / "hf", "HuggingFaceTB/SmolLM2-135M-Instruct", smollm2)
    env = {k: v for k, v in os.environ.items()
           if k not in ("ZU_CONFIG_DIR", "ZU_SIGNING_KEY", "XDG_CONFIG_HOME", "HF_HUB_CACHE")}
    env.update(HOME=str(tmp_path / "home"), HF_HOME=str(hf), HF_HUB_OFFLINE="1")
    (tmp_path / "home").mkdir()
    (tmp_path / "work").mkdir()
    proc = subprocess.run(["bash", "-eo", "pipefail", "-c", block], cwd=tmp_path / "work", env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "work" / "reports" / "verify.xml").is_file()
    assert "verify: ok" in proc.stderr and "part of this edit" in proc.stderr
    assert "Verification succeeded" in proc.stdout + proc.stderr  # model_signing's own check
    assert "link 2" in proc.stderr and "history of 2 signed edits checked" in proc.stderr
    assert "link 3" in proc.stderr and "(rebased: one edit of the original)" in proc.stderr  # week 3, --base
