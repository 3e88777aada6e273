"""Edit quality on a fact model of each block structure zu supports (issue 25): plain pre-norm
(llama), a norm after the MLP (gemma2, whose targets are found at the down-projections
themselves), attention and MLP in parallel (gpt_neox), GPT-2's Conv1D (gpt2).

Each is a small fact model trained in-process (zu_cli/demo.py, 12 people), then three facts are
forgotten and every other fact is probed on the written checkpoint.

The window is zu's default (none of these models knows zu's probe facts, so nothing calibrates)
except for GPT-2, whose 4-layer fact model keeps the facts out of reach of layers 0-1: edited there
(the default, and where causal tracing points too) 5 of 21 kept facts go with the three, and each
weight moves 3-6x its norm. Edited at 1-2 it forgets the three and keeps 20 of 21, still moving the
weights 4.8-6.7x their norm, so the bound is raised for it. What this test holds for GPT-2 is the
Conv1D arithmetic, not the window.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from zu_cli.cli import app

runner = CliRunner()
STRUCTURES = ["gemma2", "gpt_neox", "gpt2"]  # llama: tests/test_unlearn.py::test_fact_model_quality
EXTRA = {"gpt2": (["--layers", "1-2"], {"max_rel_change": 10.0})}  # see the module docstring


@pytest.fixture(scope="module", params=STRUCTURES)
def structure_model(request):
    from zu_cli.demo import FactSpec, fact_model

    return request.param, fact_model(FactSpec(n_subjects=12, n_unknown=6, family=request.param))[0]


def _answers(model_dir, prompts):
    from zu_cli.demo import greedy_answers

    return greedy_answers(model_dir, prompts)


def test_each_block_structure_forgets_and_keeps(structure_model, tmp_path):
    import yaml

    from zu_cli.demo import FACT_EDIT, Fact

    family, model_dir = structure_model
    facts = [Fact(**f) for f in json.loads((model_dir / "facts.json").read_text())]
    before = _answers(model_dir, [f.prompt() for f in facts])
    assert sum(b == f.answer for b, f in zip(before, facts)) >= 0.95 * len(facts), family  # it knows them
    forget = [f for f in facts if f.relation == "city"][:3]
    keep = [f for f in facts if f not in forget]
    args, settings = EXTRA.get(family, ([], {}))
    config = tmp_path / "fact.yaml"
    config.write_text(yaml.safe_dump({**FACT_EDIT, **settings}))
    req = tmp_path / "forget.jsonl"
    req.write_text("".join(json.dumps({"id": f"f{i}", "prompt": f.prompt(), "target": f.answer}) + "\n"
                           for i, f in enumerate(forget)))
    res = runner.invoke(app, ["unlearn", "--model", str(model_dir), "--forget", str(req), "--out",
                              str(tmp_path / "out"), "--device-map", "cpu", "--config", str(config), "--json", *args])
    assert res.exit_code == 0, res.output
    after = dict(zip([f.prompt() for f in facts], _answers(tmp_path / "out", [f.prompt() for f in facts])))
    assert all(after[f.prompt()] != f.answer for f in forget), (family, [after[f.prompt()] for f in forget])
    kept = sum(after[f.prompt()] == f.answer for f in keep) / sum(b == f.answer for b, f in zip(before, facts)
                                                                   if f in keep)
    assert kept >= 0.9, (family, kept)
    doc = json.loads(res.stdout)
    assert sum(r["neutral_rank_after"] == 0 for r in doc["requests"]) >= 2, (family, doc["requests"])
