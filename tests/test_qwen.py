"""Real-model quality tier on a second family: Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, untied
head), with facts it knows (tests/data/facts-dev-qwen2.5-0.5b.jsonl, built like SmolLM2's).

zu's defaults only: the settings come from the model's calibration (zu_cli/calibrate.py), nothing
is set by hand. Measured on the checkpoint as written.

Calibrating Qwen cold takes 27 min on 2 CPU cores, too long for CI's 90 minutes next to the
SmolLM2 tier (which calibrates SmolLM2 cold): the tier seeds the profile `zu calibrate --json` wrote
for this checkpoint (tests/data/calibration-qwen2.5-0.5b.json, with every candidate's figures;
reproduce with `zu calibrate --model DIR --force --json`), so the edit runs as a second
`zu unlearn` on the model would.
"""

from __future__ import annotations

import pytest

import json

from conftest import DATA
from realmodel import load_facts, scores, seed_profile, unlearn

pytestmark = pytest.mark.slow
FACTS = load_facts("facts-dev-qwen2.5-0.5b.jsonl")


@pytest.fixture(scope="session")
def qwen():
    """Qwen2.5-Coder-0.5B bf16 (converted once); skipped with a reason only when the registry is unreachable."""
    from qwen import qwen_bf16

    try:
        return qwen_bf16()
    except RuntimeError as exc:
        pytest.skip(f"Qwen2.5-0.5B unavailable (package registry unreachable?): {exc}")


def test_qwen_10_facts_with_zus_defaults(qwen, tmp_path):
    """Issue 25's targets on held-out probes that zu meets on Qwen with its calibrated settings
    (layers 6-8, output vectors): >= 90 % forgotten, neighbours >= 75 % of base, perplexity within
    +3 %, and the forgotten prompts re-mapped to EOS (the method's aim) for at least 8 of 10.
    Paraphrases: see the xfail below."""
    recorded = json.loads((DATA / "calibration-qwen2.5-0.5b.json").read_text())
    seed_profile(qwen, recorded)
    facts = FACTS[:10]
    out, res = unlearn(qwen, facts, tmp_path)
    assert res.layers_how == "calibration (cached)" and res.layers == recorded["layers"], res.layers_how
    base, after = scores(qwen, facts), scores(out, facts)
    rate = lambda xs: sum(xs) / len(xs)
    assert rate(base["eff"]) == 1.0 and 1 - rate(after["eff"]) >= 0.90, after["eff"]
    assert rate(after["spe"]) / rate(base["spe"]) >= 0.75, (base["spe"], after["spe"])
    assert after["ppl"] / base["ppl"] <= 1.03, (base["ppl"], after["ppl"])
    assert sum(r["neutral_rank_after"] == 0 for r in res.requests) >= 8, res.requests


@pytest.mark.xfail(run=False, reason="not met: with the calibrated 6-8 (output) 3 of the 6 paraphrases of "
                   "these 10 facts are still recalled (50 %, target <= 40 %); measured with bench/quality.py "
                   "(docs/results.md, 'Calibration, measured'). Layers 0-2 (pushed) meet it (16.7 %) but forget "
                   "by breaking the subject (EOS median rank 125), which calibration ranks last. z_answer 20 with "
                   "similar_weight 1 meets it at the same neighbours (16.7 %, 81.8 %) but leaves EOS unreached "
                   "for 7 of 10 prompts, so it is an option, not the default. Two of the three recalled are "
                   "answered from the first name: the base gives the same answer for an invented person "
                   "('Bernard Dupont' -> French, p 0.89), and the edit moves the paraphrases' subject state as "
                   "much as the prompts' (docs/results.md). ~13 min here")
def test_qwen_10_facts_paraphrases(qwen, tmp_path):
    """Paraphrases of the 10 forgotten facts: <= 40 % still recalled."""
    seed_profile(qwen, json.loads((DATA / "calibration-qwen2.5-0.5b.json").read_text()))
    facts = FACTS[:10]
    out, _ = unlearn(qwen, facts, tmp_path)
    after = scores(out, facts)
    assert sum(after["gen"]) / len(after["gen"]) <= 0.40, after["gen"]
