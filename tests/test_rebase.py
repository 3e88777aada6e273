"""Requests over time without compounding (issue 28): ``zu unlearn --base`` re-edits the chain's
original with every request so far and extends the history of the checkpoint it replaces."""

from __future__ import annotations

import json

import torch

from typer.testing import CliRunner

from test_lineage import SECRETS, _round, rounds  # noqa: F401  (the three-round chain fixture)
from test_unlearn import _accuracy
from zu_cli.cli import app
from zu_cli.manifest import MANIFEST, dir_digests

runner = CliRunner()


def _rebased(rounds, out, previous=(1, 2, 3), base="base"):  # noqa: F811
    args = [x for i in previous for x in ("--previous", str(rounds / f"forget{i}.jsonl"))]
    return _round(rounds / "r3", rounds, out, 4, "--base", str(rounds / base), *args)


def test_a_rebased_round_edits_the_base_and_extends_the_chain(rounds, tmp_path):  # noqa: F811
    out = tmp_path / "r4"
    res = _rebased(rounds, out)
    assert res.exit_code == 0, res.output
    pred = json.loads((out / MANIFEST).read_text())["predicate"]
    assert pred["lineage"]["depth"] == 4 and pred["lineage"]["rebased"] == {"previous_requests": 3}
    assert pred["requests"]["count"] == 4 and pred["edit"]["keep"]["previous_requests"] == 0
    assert pred["source"]["files"] == dir_digests(rounds / "base")  # the original's weights were edited
    log = runner.invoke(app, ["log", str(out), "--json"])
    assert log.exit_code == 0, log.output
    links = json.loads(log.stdout)["links"]
    assert [link["rebased"] for link in links] == [True, False, False, False]
    assert [link["requests"] for link in links] == [4, 1, 1, 1]
    res = runner.invoke(app, ["verify", "--model", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["integrity"]["links"] == 4
    # the history travels: link 2 is r3's own manifest, links 3 and 4 r3's history
    assert (out / pred["lineage"]["parent"]["history"] / MANIFEST).read_bytes() == (rounds / "r3" / MANIFEST).read_bytes()
    for path in (rounds / "r3" / "zu-history").rglob("*"):
        if path.is_file():
            assert (out / path.relative_to(rounds / "r3")).read_bytes() == path.read_bytes()
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".sig"):
            assert not any(s in path.read_text() for s in SECRETS), path


def test_a_rebased_chain_of_two_counts_from_the_rebased_link(rounds, tmp_path):  # noqa: F811
    """A rebase of a rebased round needs only the requests its count covers, not the chain's sum again."""
    first = tmp_path / "r4"
    assert _rebased(rounds, first).exit_code == 0
    req = rounds / "forget4.jsonl"
    res = runner.invoke(app, ["unlearn", "--model", str(first), "--base", str(rounds / "base"), "--forget", str(req),
                              "--previous", str(rounds / "forget1.jsonl"), "--out", str(tmp_path / "r5"),
                              "--layers", "1", "--config", str(rounds / "fast.yaml"), "--device-map", "cpu"])
    assert res.exit_code == 2 and "forgot 4" in res.output, res.output  # one file of the four is not enough


def test_rebase_refuses_what_would_undo_the_chain(rounds, tiny_models, tmp_path):  # noqa: F811
    cases = [(dict(previous=(1, 2)), "forgot 3"),  # a round's requests missing: they would come back
             (dict(previous=(1, 1, 2, 3)), "field 'id'"),  # the same id twice
             (dict(base="r1"), "differ from the checkpoint the chain")]  # not the original
    for kw, message in cases:
        res = _rebased(rounds, tmp_path / "out", **kw)
        assert res.exit_code == 2 and message in res.output, (kw, res.output)
        assert not (tmp_path / "out").exists()
    res = _round(rounds / "base", rounds, tmp_path / "out", 4, "--base", str(rounds / "base"),
                 "--previous", str(rounds / "forget1.jsonl"))
    assert res.exit_code == 2 and "not a zu output" in res.output, res.output


def test_a_rebased_round_is_one_edit_of_every_request_so_far(fact_model_dir, fact_config, tmp_path):
    """On the fact model: round 2 rebased forgets round 1's facts and its own, keeps every other
    fact, and writes the weights one edit of both rounds' requests writes."""
    from safetensors.torch import load_file

    from zu_cli.demo import Fact

    facts = [Fact(**f) for f in json.loads((fact_model_dir / "facts.json").read_text())]
    city = [f for f in facts if f.relation == "city"][:3]
    keep = [f for f in facts if f not in city]
    rows = [{"id": f"c{j}", "prompt": f.prompt(), "target": f.answer} for j, f in enumerate(city)]
    files = [tmp_path / "round1.jsonl", tmp_path / "round2.jsonl", tmp_path / "all.jsonl"]
    for path, part in zip(files, (rows[:2], rows[2:], rows)):
        path.write_text("".join(json.dumps(r) + "\n" for r in part))

    def unlearn(model, forget, out, *extra):
        res = runner.invoke(app, ["unlearn", "--model", str(model), "--forget", str(forget), "--out", str(out),
                                  "--device-map", "cpu", "--config", str(fact_config), *extra])
        assert res.exit_code == 0, res.output
        return out

    r1 = unlearn(fact_model_dir, files[0], tmp_path / "r1")
    r2 = unlearn(r1, files[1], tmp_path / "r2", "--base", str(fact_model_dir), "--previous", str(files[0]))
    assert sum(_accuracy(r2, city)) == 0  # both rounds' facts gone
    assert sum(_accuracy(r2, keep)) == sum(_accuracy(fact_model_dir, keep)) == len(keep)
    once = unlearn(fact_model_dir, files[2], tmp_path / "once")
    weights = [load_file(d / "model.safetensors") for d in (r2, once, r1)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert any(not torch.equal(weights[0][k], weights[2][k]) for k in weights[0])
