"""Priors in `zu verify`: each must-be-forgotten probe is asked again about an invented subject, so
a recall the rest of the prompt explains is named as such (docs/verify.md, "Priors"). The rule that
invents the subject is tested with the bench that shares it (test_bench_tools.py)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from zu_cli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def probes(fact_model_dir, tmp_path_factory):
    """Three city facts and three job facts of the fact model, with their subjects and a paraphrase."""
    from zu_cli.demo import Fact

    facts = [Fact(**f) for f in json.loads((fact_model_dir / "facts.json").read_text())]
    picked = [f for f in facts if f.relation == "city"][:3] + [f for f in facts if f.relation == "job"][:3]
    path = tmp_path_factory.mktemp("priors") / "probes.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f.prompt(), "subject": f.subject, "target": f.answer,
                                        "paraphrases": [f.prompt(1)]}) + "\n" for i, f in enumerate(picked)))
    return path, picked


NAMES = ("Zorbin", "Quellan", "Mertz")  # zu verify's invented names, written out


def _expected(model_dir, picked) -> list[bool]:
    """Per fact, prompt then paraphrase: recalled with the subject written as each invented name by
    hand, for every name."""
    from zu_cli.checkpoint import open_checkpoint
    from zu_cli.loading import load_model
    from zu_cli.probes import probe
    from zu_cli.verdicts import Criteria

    model, tok = load_model(open_checkpoint(model_dir), device_map="cpu", dtype="float32")
    qs = [(f.prompt(t).replace(f.subject, n), f.answer) for f in picked for t in (0, 1) for n in NAMES]
    rec = [Criteria().recalled(p) for p in probe(model, tok, qs)]
    return [all(rec[i:i + len(NAMES)]) for i in range(0, len(rec), len(NAMES))]


def test_verify_reports_each_recalled_probes_prior(fact_model_dir, probes):
    """The unedited model recalls every fact; each forget and paraphrase verdict carries whether the
    same model gives the target for an invented subject, as a direct probe of that text says, and a
    recall that is a prior still fails."""
    path, picked = probes
    res = runner.invoke(app, ["verify", "--model", str(fact_model_dir), "--forget", str(path), "--device-map", "cpu",
                              "--json"])
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    got = [p["prior"] for r in doc["requests"] for p in r["probes"] if p["kind"] in ("forget", "paraphrase")]
    assert got == _expected(fact_model_dir, picked)
    # Both outcomes occur: the model gives a job (one of eight, shared) for a name it never saw,
    # never a city (one per person)
    assert any(got) and not all(got), got
    for r in doc["requests"]:
        for p in r["probes"]:
            if p["kind"] in ("forget", "paraphrase"):
                assert p["passed"] is False and ("invented subjects" in p["detail"]) == p["prior"]
            else:
                assert p["prior"] is None


def test_attack_summary_counts_priors_among_recalled(edited_facts_with_subjects):
    """Under attack the invented-subject probe runs on the attacked model; the summary counts the
    recalled probes that are priors, and a probe without a subject in its text has none."""
    tmp, doc = edited_facts_with_subjects
    for a in doc["attacks"]["summary"]:
        probes = [p for p in doc["attacks"]["probes"] if f"/{a['attack']}/" in p["name"] and p["passed"] is False]
        assert a["recalled_prior"] == sum(p["prior"] is True for p in probes) <= a["recalled"], a
    judged = [p for p in doc["attacks"]["probes"] if p["kind"] in ("attack-quant", "attack-prompt")]
    assert judged and all(isinstance(p["prior"], bool) for p in judged)
    assert all(p["prior"] is None for p in doc["attacks"]["probes"] if p["kind"] == "attack-lens")


@pytest.fixture(scope="module")
def edited_facts_with_subjects(fact_model_dir, fact_config, probes, tmp_path_factory):
    """The probe facts' city requests forgotten, then verified under quant, prompt and lens attacks."""
    path, _ = probes
    tmp = tmp_path_factory.mktemp("priors-edit")
    rows = [json.loads(line) for line in path.read_text().splitlines()][:3]
    (tmp / "forget.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("id", "prompt", "subject", "target")})
                                              + "\n" for r in rows))
    (tmp / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = runner.invoke(app, ["unlearn", "--model", str(fact_model_dir), "--forget", str(tmp / "forget.jsonl"),
                              "--out", str(tmp / "out"), "--device-map", "cpu", "--config", str(fact_config)])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["verify", "--model", str(tmp / "out"), "--forget", str(tmp / "probes.jsonl"),
                              "--attack", "quant,prompt,lens", "--quant-formats", "Q4_0", "--device-map", "cpu",
                              "--json"])
    assert res.exit_code in (0, 1), res.output
    return tmp, json.loads(res.stdout)


def test_verdict_line_counts_failures_that_are_priors():
    from zu_cli.render_verify import verdict_line
    from zu_cli.verdicts import ProbeResult, VerifyReport

    report = VerifyReport(model="m", requests=[{"id": "a", "status": "still recalled", "passed": False, "probes": [
        ProbeResult("a/forget", "forget", False, "recalled", prior=True),
        ProbeResult("a/paraphrase-1", "paraphrase", False, "recalled", prior=False),
        ProbeResult("a/paraphrase-2", "paraphrase", True, "forgotten", prior=True)]}])
    line = verdict_line(report)
    assert "1 of the failures also answered for invented subjects" in line and "exit 1" in line
