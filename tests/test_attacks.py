"""`zu verify --attack` (issue 26): each attack re-probes the forgotten facts of a real edit of the
synthetic fact model; verdicts in the table, --json and JUnit."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from zu_cli.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def edited_facts(fact_model_dir, fact_config, tmp_path_factory):
    """Three city facts forgotten (with a paraphrase and a kept neighbour each to probe)."""
    from zu_cli.demo import Fact

    tmp = tmp_path_factory.mktemp("attacks")
    facts = [Fact(**f) for f in json.loads((fact_model_dir / "facts.json").read_text())]
    cities = [f for f in facts if f.relation == "city"]
    forget, kept = cities[:3], [f for f in facts if f.relation != "city"][:3]
    rows = [{"id": f"f{i}", "prompt": f.prompt(), "target": f.answer, "paraphrases": [f.prompt(1)],
             "neighbors": [{"prompt": k.prompt(), "target": k.answer}]} for i, (f, k) in enumerate(zip(forget, kept))]
    (tmp / "probes.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp / "forget.jsonl").write_text("".join(json.dumps({k: r[k] for k in ("id", "prompt", "target")}) + "\n"
                                              for r in rows))
    res = runner.invoke(app, ["unlearn", "--model", str(fact_model_dir), "--forget", str(tmp / "forget.jsonl"),
                              "--out", str(tmp / "out"), "--device-map", "cpu", "--config", str(fact_config)])
    assert res.exit_code == 0, res.output
    return tmp


def test_attacks_report_per_probe_verdicts_json_and_junit(edited_facts, fact_model_dir):
    tmp = edited_facts
    junit = tmp / "reports" / "verify.xml"
    res = runner.invoke(app, ["verify", "--model", str(tmp / "out"), "--forget", str(tmp / "probes.jsonl"),
                              "--baseline", str(fact_model_dir), "--attack", "all", "--quant-formats", "Q8_0,Q4_0",
                              "--device-map", "cpu", "--json", "--junit", str(junit)])
    assert res.exit_code in (0, 1), res.output
    doc = json.loads(res.stdout)
    summary = {a["attack"]: a for a in doc["attacks"]["summary"]}
    assert set(summary) == {"quant-Q8_0", "quant-Q4_0", "prompt", "relearn-attack", "relearn-control", "lens"}
    # 8-bit rounding does not bring the edit back, while the base model quantised the same way still knows
    q8 = summary["quant-Q8_0"]
    assert q8["probed"] > 0 and q8["recalled"] == 0 and q8["base_recalled"] == q8["probed"], q8
    names = [p["name"] for p in doc["attacks"]["probes"]]
    assert "f0#" in names[0] and any("/prompt/truthfully" in n for n in names)
    assert any("/quant-Q4_0/paraphrase-1" in n for n in names) and not any("relearn-control" in n for n in names)
    assert "fine-tuned on 1 request (" in summary["relearn-attack"]["note"] and summary["relearn-control"]["judged"] is False
    failed = [p for p in doc["attacks"]["probes"] if p["passed"] is False]
    assert (res.exit_code == 1) == bool(failed or doc["summary"]["failed"])
    xml = junit.read_text()
    assert xml.count("<testcase") == doc["summary"]["probes"] + 1 and "/quant-Q8_0/prompt" in xml  # + integrity
    assert "Kalomi" not in res.stdout and forget_answers(tmp).isdisjoint(set(res.stdout.split()))


def forget_answers(tmp):
    return {json.loads(line)["target"] for line in (tmp / "forget.jsonl").read_text().splitlines()}


def test_attack_needs_forget_and_known_names(edited_facts):
    res = runner.invoke(app, ["verify", "--model", str(edited_facts / "out"), "--attack", "quant"])
    assert res.exit_code == 2 and "--forget" in res.output
    res = runner.invoke(app, ["verify", "--model", str(edited_facts / "out"), "--forget",
                              str(edited_facts / "probes.jsonl"), "--attack", "quant,bitflip"])
    assert res.exit_code == 2 and "bitflip" in res.output
    res = runner.invoke(app, ["verify", "--model", str(edited_facts / "out"), "--forget",
                              str(edited_facts / "probes.jsonl"), "--attack", "quant", "--quant-formats", "Q4_K",
                              "--device-map", "cpu"])
    assert res.exit_code == 2 and "Q4_K" in res.output


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # torch Linear; GPT-2's Conv1D, weight (in, out)
def test_quant_round_trip_restores_the_weights(tiny_models, family):
    import torch

    from zu_cli.attacks import quant
    from zu_cli.checkpoint import open_checkpoint
    from zu_cli.loading import load_model
    from zu_cli.quantise import Quantised
    from zu_cli.requests import Request

    model, tok = load_model(open_checkpoint(tiny_models[family]), device_map="cpu", dtype="float32")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    req = Request(id="a", prompt="The quick brown fox", subject=None, target="jumps")
    rows = quant(model, tok, [req], ("Q4_0",))
    assert len(rows["Q4_0"]) == 1 and rows["Q4_0"][0][0][0] == "prompt"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    q = Quantised(model, "Q4_0")
    decoder = [m for m in q.modules if m is not model.get_output_embeddings()]
    assert len(decoder) >= 3 * 4  # every attention and MLP matrix of the 3 layers, not the head alone
    with q.swapped():
        changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert any(".0." in k and "mlp" in k for k in changed)


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # torch Linear; GPT-2's Conv1D, weight (in, out)
def test_bnb_round_trip_is_what_transformers_loads(tiny_models, family):
    """Each bitsandbytes format quantises the modules transformers' BitsAndBytesConfig loader does,
    to the same values, bit for bit."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as bnbf
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from zu_cli.quantise import Quantised

    path = tiny_models[family]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    configs = {"bnb-nf4": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
               "bnb-fp4": BitsAndBytesConfig(load_in_4bit=True), "bnb-int8": BitsAndBytesConfig(load_in_8bit=True)}
    for fmt, cfg in configs.items():
        loaded = AutoModelForCausalLM.from_pretrained(path, quantization_config=cfg, device_map="cpu",
                                                      dtype=torch.float32)
        theirs = {n: m for n, m in loaded.named_modules() if isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt))}
        q = Quantised(model, fmt)
        ours = {n: w for (n, m) in model.named_modules() for mm, w in zip(q.modules, q.weights) if m is mm}
        assert set(ours) == set(theirs) and len(ours) >= 3 * 4, (fmt, set(ours) ^ set(theirs))
        for name, w in ours.items():
            m = theirs[name]
            back = (bnbf.dequantize_4bit(m.weight.data, m.weight.quant_state) if fmt != "bnb-int8"
                    else bnbf.int8_vectorwise_dequant(m.weight.data, m.weight.SCB))
            if family == "gpt2":  # transformers quantises the Conv1D weight as (out, in)
                back = back.T
            assert torch.equal(back.float(), w), (fmt, name)
        assert not torch.equal(q.weights[0], q.modules[0].weight.data)


def test_bnb_formats_without_bitsandbytes(monkeypatch):
    """Where bitsandbytes is not installed the default formats leave its formats out and say so;
    a bnb format asked for by name is refused with exit 2."""
    from zu_cli import attacks, quantise
    from zu_cli.errors import UsageError

    monkeypatch.setattr(quantise, "bnb_available", lambda: False)
    monkeypatch.setattr(attacks, "bnb_available", lambda: False)
    formats, note = attacks.resolve_formats(None)
    assert formats == ("Q8_0", "Q5_0", "Q4_0") and "bnb-int8, bnb-nf4, bnb-fp4 not run" in note
    assert attacks.resolve_formats(("Q4_0", "bnb-nf4")) == (("Q4_0", "bnb-nf4"), "")
    with pytest.raises(UsageError, match="needs bitsandbytes") as err:
        quantise.check_format("bnb-nf4")
    assert err.value.exit_code == 2
    with pytest.raises(UsageError, match="no K-quant quantiser"):
        quantise.check_format("Q4_K")


def test_unlearn_audit_runs_the_attacks_on_what_it_wrote(fact_model_dir, fact_config, edited_facts, tmp_path):
    res = runner.invoke(app, ["unlearn", "--model", str(fact_model_dir), "--forget", str(edited_facts / "forget.jsonl"),
                              "--out", str(tmp_path / "out"), "--device-map", "cpu", "--config", str(fact_config),
                              "--audit", "quant,prompt", "--json"])
    doc = json.loads(res.stdout)
    assert doc["counts"]["forgotten"] == 3 and (tmp_path / "out" / "zu-manifest.json").is_file()
    attacks = {a["attack"]: a for a in doc["audit"]["attacks"]["summary"]}
    assert set(attacks) == {"quant-Q8_0", "quant-Q5_0", "quant-Q4_0", "quant-bnb-int8", "quant-bnb-nf4",
                            "quant-bnb-fp4", "prompt"}
    assert all(a["probed"] == 3 for k, a in attacks.items() if k.startswith("quant")), attacks
    assert res.exit_code == doc["audit"]["exit_code"]
    res = runner.invoke(app, ["unlearn", "--model", str(fact_model_dir), "--forget", str(edited_facts / "forget.jsonl"),
                              "--out", str(tmp_path / "o2"), "--audit", "quant,nope"])
    assert res.exit_code == 2 and not (tmp_path / "o2").exists()


def test_verify_names_the_remedy_for_what_came_back():
    from zu_cli.render_verify import attack_hints

    rows = [{"attack": "quant-Q8_0", "judged": True, "recalled": 0}, {"attack": "quant-Q5_0", "judged": True, "recalled": 1},
            {"attack": "quant-Q4_0", "judged": True, "recalled": 3}, {"attack": "relearn", "judged": True, "recalled": 0},
            {"attack": "relearn-control", "judged": False, "recalled": 2}]
    hints = attack_hints(rows)
    assert len(hints) == 1 and 'quant_keys: "Q5_0,Q4_0"' in hints[0]
    rows[3]["recalled"] = 1
    assert "z_answer: 20" in attack_hints(rows)[1]
    assert attack_hints([{**r, "recalled": 0} for r in rows]) == []
