"""Causal tracing (issue 4) on the synthetic fact model: endpoints, the suggested window, caching, CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from zu_cli.cli import app
from zu_cli.demo import Fact
from zu_cli.locate import TraceSettings, best_window, embed_std, locate, restore_sets, trace_request

runner = CliRunner()


@pytest.fixture(scope="module")
def facts(fact_model_dir):
    return [Fact(**f) for f in json.loads((fact_model_dir / "facts.json").read_text())][:6]


@pytest.fixture(scope="module")
def loaded(fact_model_dir):
    from zu_cli.checkpoint import open_checkpoint
    from zu_cli.loading import load_model

    ckpt = open_checkpoint(fact_model_dir)
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    return model, tok, ckpt.spec


def _requests(facts):
    from zu_cli.requests import Request

    return [Request(id=f"f{i}", prompt=f.prompt(), subject=f.subject, target=f.answer) for i, f in enumerate(facts)]


def _req_file(tmp_path, facts, subject=True):
    p = tmp_path / "forget.jsonl"
    p.write_text("".join(json.dumps({"id": f"f{i}", "prompt": f.prompt(), "target": f.answer,
                                     **({"subject": f.subject} if subject else {})}) + "\n"
                         for i, f in enumerate(facts)))
    return p


def test_restoring_everything_gives_clean_and_nothing_gives_corrupted(loaded, facts):
    model, tok, spec = loaded
    reqs = _requests(facts)
    std = 3 * embed_std(model, tok, spec, reqs)
    drops = []
    for r in reqs:
        st = TraceSettings(samples=4, kind="hidden")
        t = trace_request(model, tok, spec, 4, r, std, st, restore=[[], [0, 1, 2, 3]])
        assert t["p_clean"] > 0.5 and t["p_corrupt"] < t["p_clean"], t
        drops.append(t["p_clean"] - t["p_corrupt"])
        assert t["p_restored"][0] == pytest.approx(t["p_corrupt"], abs=1e-6)  # nothing restored
        assert t["p_restored"][1] == pytest.approx(t["p_clean"], abs=1e-4)  # every layer restored
        m = trace_request(model, tok, spec, 4, r, std, TraceSettings(samples=4), restore=[[]])
        assert m["p_restored"][0] == pytest.approx(m["p_corrupt"], abs=1e-6) == pytest.approx(t["p_corrupt"])
    assert sum(drops) / len(drops) > 0.2  # the noise really corrupts the recall


# The fact model looks its answers up at the prompt's last token (attention brings the name there,
# zu_cli/demo.py): restoring one MLP at the subject's token brings back under 5 % of the answer,
# so the window is found on the residual stream at the subject tokens (``--kind hidden``).
HIDDEN = TraceSettings(kind="hidden")


def test_suggested_window_is_where_the_effect_peaks(loaded, facts, tmp_path, monkeypatch):
    from zu_cli.console import silent

    monkeypatch.setenv("ZU_CACHE_DIR", str(tmp_path))
    model, tok, spec = loaded
    scores, cached = locate(model, tok, spec, 4, _requests(facts), HIDDEN, 2, "fact-model", silent())
    assert scores.found and all(q["recalled"] for q in scores.requests)
    assert not cached and len(scores.effect) == 4 and len(scores.requests) == len(facts)
    peak = max(range(4), key=lambda l: scores.effect[l])
    assert peak in scores.window and scores.window == best_window(scores.effect, 2)
    outside = [e for l, e in enumerate(scores.effect) if l not in scores.window]
    assert scores.effect[peak] > 0 and scores.effect[peak] > 2 * max(outside)
    again, cached = locate(model, tok, spec, 4, _requests(facts), HIDDEN, 2, "fact-model", silent())
    assert cached and again.effect == scores.effect  # deterministic, and cached per checkpoint + requests
    other, cached = locate(model, tok, spec, 4, _requests(facts), TraceSettings(kind="hidden", seed=1), 2,
                           "fact-model", silent())
    assert not cached and other.effect != scores.effect


def test_window_helpers():
    assert best_window([0.1, 0.5, 0.4, 0.0], 2) == [1, 2]
    assert best_window([0.1, 0.5, 0.4, 0.0], 9) == [0, 1, 2, 3]
    assert restore_sets(4, 3) == [[0, 1], [0, 1, 2], [1, 2, 3], [2, 3]]
    assert restore_sets(3, 1) == [[0], [1], [2]]


def test_zu_locate_cli_json_plot_and_redaction(fact_model_dir, facts, tmp_path):
    req = _req_file(tmp_path, facts)
    res = runner.invoke(app, ["locate", "--model", str(fact_model_dir), "--forget", str(req), "--num-layers", "2",
                              "--json", "--plot", str(tmp_path / "trace.png"), "--device-map", "cpu", "--kind", "hidden"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert len(doc["effect"]) == 4 and len(doc["window"]) == 2 and len(doc["requests"]) == len(facts)
    assert all({"p_clean", "p_corrupt", "recalled", "effect", "tag"} <= set(q) for q in doc["requests"])
    assert (tmp_path / "trace.png").read_bytes()[:4] == b"\x89PNG"
    for f in facts:
        assert f" {f.answer}" not in res.output and f.answer not in json.dumps(doc["requests"])
    res = runner.invoke(app, ["locate", "--model", str(fact_model_dir), "--forget", str(req), "--device-map", "cpu",
                              "--kind", "hidden"])
    assert res.exit_code == 0 and "suggested window" in res.output


def test_plot_without_matplotlib_and_requests_without_subject_exit_2(fact_model_dir, facts, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    res = runner.invoke(app, ["locate", "--model", str(fact_model_dir), "--forget", str(_req_file(tmp_path, facts)),
                              "--plot", str(tmp_path / "x.png")])
    assert res.exit_code == 2 and "zu-cli[plot]" in res.output and not (tmp_path / "x.png").exists()
    monkeypatch.setattr(importlib.util, "find_spec", real)
    res = runner.invoke(app, ["locate", "--model", str(fact_model_dir), "--forget",
                              str(_req_file(tmp_path, facts, subject=False)), "--device-map", "cpu"])
    assert res.exit_code == 2 and "subject" in res.output


def test_unlearn_layers_auto_records_the_tracing(fact_model_dir, fact_config, facts, tmp_path):
    """--layers auto traces the MLPs at the subject; on the fact model (which looks answers up at the
    last token) no MLP there has an effect, and zu says so and edits the default window instead of
    picking layers from noise. The tracing is in the manifest either way."""
    req = _req_file(tmp_path, facts[:2])
    res = runner.invoke(app, ["unlearn", "--model", str(fact_model_dir), "--forget", str(req), "--out",
                              str(tmp_path / "out"), "--layers", "auto", "--device-map", "cpu", "--json", "--config",
                              str(fact_config)])
    assert res.exit_code == 0, res.output
    assert "causal tracing found no causal effect" in res.output
    edit = json.loads((tmp_path / "out" / "zu-manifest.json").read_text())["predicate"]["edit"]
    assert edit["layers_chosen_by"] == "default (causal tracing found no effect)"
    assert edit["locate"]["found"] is False and edit["locate"]["window"] == [] and len(edit["locate"]["effect"]) == 4
    assert json.loads(res.stdout)["layers"] == edit["layers"] == [0, 1]
