"""zu verify as a CI gate (issue 6) on the synthetic fact model: probes, exit codes, JSON, JUnit, redaction."""

from __future__ import annotations

import json
import shutil
import xml.etree.ElementTree as ET

import pytest
from typer.testing import CliRunner

from zu_cli.cli import app
from zu_cli.demo import Fact

runner = CliRunner()


@pytest.fixture(scope="module")
def setup(fact_model_dir, fact_config, tmp_path_factory):
    """Three facts of the fact model forgotten (edited without probes), and the request file with probes."""
    tmp = tmp_path_factory.mktemp("verify")
    facts = [Fact(**f) for f in json.loads((fact_model_dir / "facts.json").read_text())]
    forget = [f for f in facts if f.relation == "city"][:3]
    keep = [f for f in facts if f not in forget]
    rows = [{"id": f"f{i}", "prompt": f.prompt(), "target": f.answer} for i, f in enumerate(forget)]
    (tmp / "edit.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    probes = [{**r, "paraphrases": [f.prompt(1), f.prompt(2)],
               "neighbors": [{"prompt": k.prompt(), "target": k.answer} for k in keep[3 * i:3 * i + 3]]}
              for i, (r, f) in enumerate(zip(rows, forget))]
    (tmp / "probe.jsonl").write_text("".join(json.dumps(r) + "\n" for r in probes))
    (tmp / "retain.jsonl").write_text("".join(json.dumps({"id": f"k{i}", "prompt": k.prompt(), "target": k.answer})
                                              + "\n" for i, k in enumerate(keep[9:15])))
    res = runner.invoke(app, ["unlearn", "--model", str(fact_model_dir), "--forget", str(tmp / "edit.jsonl"),
                              "--out", str(tmp / "out"), "--device-map", "cpu", "--config", str(fact_config)])
    assert res.exit_code == 0, res.output
    return tmp, forget


def _secrets(forget):
    return [f.answer for f in forget] + [f.prompt() for f in forget] + [f.subject for f in forget]


def test_unedited_model_fails_with_every_fact_recalled(fact_model_dir, setup):
    tmp, forget = setup
    res = runner.invoke(app, ["verify", "--model", str(fact_model_dir), "--forget", str(tmp / "probe.jsonl"),
                              "--json"])
    assert res.exit_code == 1, res.output
    doc = json.loads(res.stdout)
    assert doc["integrity"] is None and any("no zu manifest" in w for w in doc["warnings"])
    assert len(doc["requests"]) == 3
    for r in doc["requests"]:
        forget_probe = next(p for p in r["probes"] if p["kind"] == "forget")
        assert forget_probe["passed"] is False and forget_probe["rank"] == 0
        assert not r["passed"]


def test_edited_model_exit_code_matches_the_probes(fact_model_dir, setup, tmp_path):
    tmp, forget = setup
    junit = tmp_path / "junit.xml"
    res = runner.invoke(app, ["verify", "--model", str(tmp / "out"), "--forget", str(tmp / "probe.jsonl"),
                              "--baseline", str(fact_model_dir), "--retain", str(tmp / "retain.jsonl"),
                              "--json", "--junit", str(junit)])
    doc = json.loads(res.stdout)
    probes = [p for r in doc["requests"] for p in r["probes"]] + doc["retain"] + doc["gates"]
    failed = [p for p in probes if p["passed"] is False]
    assert res.exit_code == (1 if failed else 0) == doc["exit_code"], res.output
    assert doc["integrity"]["problems"] == [] and doc["integrity"]["tensors"] == 2
    assert len(doc["requests"]) == 3 and all(len(r["probes"]) == 1 + 1 + 2 + 3 for r in doc["requests"])
    assert all(p["passed"] for r in doc["requests"] for p in r["probes"] if p["kind"] in ("forget", "greedy"))
    assert doc["metrics"]["before"]["Eff"] == 100.0 and doc["metrics"]["after"]["Eff"] == 0.0
    assert doc["metrics"]["ppl_ratio"] is not None and [g["name"] for g in doc["gates"]] == ["perplexity"]
    cases = ET.parse(junit).getroot().findall("testcase")
    assert len(cases) == len(probes) + 1  # one per probe, plus the manifest's integrity
    assert len(ET.parse(junit).getroot().findall("testcase/failure")) == len(failed)


def test_nothing_sensitive_without_reveal(fact_model_dir, setup, tmp_path):
    tmp, forget = setup
    args = ["verify", "--model", str(tmp / "out"), "--forget", str(tmp / "probe.jsonl"), "--baseline",
            str(fact_model_dir), "--deep"]
    for mode in ([], ["--json"]):
        junit = tmp_path / f"j{len(mode)}.xml"
        res = runner.invoke(app, args + mode + ["--junit", str(junit)])
        assert res.exit_code in (0, 1), res.output
        text = res.output + junit.read_text()
        for s in _secrets(forget):
            assert s not in text, s
    res = runner.invoke(app, args + ["--json", "--reveal", "--junit", str(tmp_path / "r.xml")])
    assert all(f.answer in res.stdout for f in forget) and forget[0].prompt() in (tmp_path / "r.xml").read_text()
    first = json.loads(res.stdout)["requests"][0]["probes"]
    para = next(p for p in first if p["name"].endswith("/paraphrase-1"))
    assert para["text"] == f"{forget[0].prompt(1)} -> {forget[0].answer}"  # each probe shows its own prompt


def test_deep_probe_reports_every_layer(fact_model_dir, setup):
    tmp, _ = setup
    res = runner.invoke(app, ["verify", "--model", str(tmp / "out"), "--forget", str(tmp / "probe.jsonl"),
                              "--baseline", str(fact_model_dir), "--deep", "--json"])
    deep = json.loads(res.stdout)["deep"]
    assert len(deep["decodable_after"]) == len(deep["decodable_before"]) == 4  # the fact model's layers
    assert deep["decodable_before"][-1] == 3  # the base model answers all three at its last layer
    assert all(len(r) == 4 for r in deep["ranks"].values())


def test_criteria_are_configurable(setup):
    tmp, _ = setup
    # With every rank counting as "recalled", no forgotten fact can pass.
    res = runner.invoke(app, ["verify", "--model", str(tmp / "out"), "--forget", str(tmp / "probe.jsonl"),
                              "--max-rank", "1000000", "--json"])
    assert res.exit_code == 1
    doc = json.loads(res.stdout)
    assert all(p["passed"] is False for r in doc["requests"] for p in r["probes"] if p["kind"] == "forget")


def test_integrity_runs_first_and_exits_4(setup, tmp_path):
    tmp, _ = setup
    shutil.copytree(tmp / "out", tmp_path / "out")
    (tmp_path / "out" / "config.json").write_text((tmp_path / "out" / "config.json").read_text() + " ")
    res = runner.invoke(app, ["verify", "--model", str(tmp_path / "out"), "--forget", str(tmp / "probe.jsonl"),
                              "--json"])
    assert res.exit_code == 4 and "config.json" in res.output
    assert json.loads(res.stdout)["requests"] == []  # no probe ran on a checkpoint that failed integrity
