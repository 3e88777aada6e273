"""The CLI shell: help, version, exit codes through Typer's CliRunner, no tracebacks for user errors."""

import json
import subprocess
import sys
import time

from typer.testing import CliRunner

from zu_cli.cli import app

runner = CliRunner()


def test_help_lists_only_working_commands_and_is_fast():
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0
    for command in ("unlearn", "demo", "verify", "keygen", "manifest", "locate"):
        assert command in res.output
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "zu_cli", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and time.perf_counter() - t0 < 1.5
    proc = subprocess.run([sys.executable, "-c", "import zu_cli.cli, sys; print('torch' in sys.modules)"],
                          capture_output=True, text=True)
    assert proc.stdout.strip() == "False"


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.startswith("zu ")


def test_missing_checkpoint_exits_3(tmp_path):
    req = tmp_path / "r.jsonl"
    req.write_text(json.dumps({"prompt": "Kalomi lives in", "subject": "Kalomi", "target": "Oslo"}) + "\n")
    res = runner.invoke(app, ["unlearn", "--model", str(tmp_path / "nope"), "--forget", str(req),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 3, res.output
    assert "nope" in res.output and "Traceback" not in res.output
    assert not (tmp_path / "o").exists()


def test_bad_request_file_exits_2(tiny_models, tmp_path):
    req = tmp_path / "r.jsonl"
    req.write_text('{"prompt": "Kalomi lives in", "target": ""}\n')
    res = runner.invoke(app, ["unlearn", "--model", str(tiny_models["llama"]), "--forget", str(req),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "r.jsonl:1: field 'target'" in res.output
    assert not (tmp_path / "o").exists()


def test_existing_out_and_bad_options_exit_2(tiny_models, tmp_path):
    req = tmp_path / "r.jsonl"
    req.write_text(json.dumps({"prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}) + "\n")
    (tmp_path / "o").mkdir()
    base = ["unlearn", "--model", str(tiny_models["llama"]), "--forget", str(req)]
    res = runner.invoke(app, base + ["--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "--force" in res.output
    res = runner.invoke(app, base + ["--out", str(tmp_path / "o2"), "--layers", "7"])
    assert res.exit_code == 2 and "outside the model" in res.output
    res = runner.invoke(app, base + ["--out", str(tmp_path / "o2"), "--device-map", "tpu9"])
    assert res.exit_code == 2
    (tmp_path / "c.yaml").write_text("lambda_q: 3\n")
    res = runner.invoke(app, base + ["--out", str(tmp_path / "o2"), "--config", str(tmp_path / "c.yaml")])
    assert res.exit_code == 2 and "lambda_q" in res.output
    res = runner.invoke(app, base + ["--out", str(tmp_path / "o2"), "--multi", "--solver", "newton"])
    assert res.exit_code == 2 and "solver" in res.output
    (tmp_path / "c.yaml").write_text("optim_dtype: float8\n")
    res = runner.invoke(app, base + ["--out", str(tmp_path / "o2"), "--config", str(tmp_path / "c.yaml")])
    assert res.exit_code == 2 and "optim_dtype" in res.output
    assert not (tmp_path / "o2").exists()


def test_sensitive_auto_resolves_per_variant():
    from zu_cli.config import Hyper

    assert Hyper().sensitive_kind(multi=False) == "pushed" and Hyper().sensitive_kind(multi=True) == "output"
    assert Hyper(sensitive="delta").sensitive_kind(multi=True) == "delta"
    # A known model's pinned kind wins over the variant's default, never over an explicit setting.
    assert Hyper().sensitive_kind(multi=False, pinned="output") == "output"
    assert Hyper(sensitive="pushed").sensitive_kind(multi=False, pinned="output") == "pushed"


def test_known_smollm2_pins_its_measured_window_and_sensitive_kind():
    """SmolLM2-135M (30 layers x 576) edits 8-10 with output sensitive vectors (docs/method.md,
    "Which layers"); the kind is pinned for that window only (at 17-19 ``output`` lost neighbours)."""
    from types import SimpleNamespace

    from zu_cli.arch import lookup

    llama = lookup(SimpleNamespace(architectures=["LlamaForCausalLM"]))
    assert llama.default_layers(30, 576) == [8, 9, 10]
    assert llama.pinned_sensitive(30, 576, [8, 9, 10]) == "output"
    assert llama.pinned_sensitive(30, 576, [17, 18, 19]) is None
    assert llama.default_layers(28, 3072) == [16, 17, 18] and llama.pinned_sensitive(28, 3072, [16, 17, 18]) is None
    assert llama.default_layers(30, 960) == [17, 18, 19]  # another width: the relative window


def test_known_smollm2_pins_its_measured_multi_settings():
    """--multi on SmolLM2-135M edits 6-10 with the soft null space and both keep-sets (docs/method.md,
    "--multi on SmolLM2-135M"); the settings hold for that window only, are valid config values,
    and never replace one the user set."""
    from types import SimpleNamespace

    from zu_cli.arch import lookup
    from zu_cli.config import Hyper, load_config

    llama = lookup(SimpleNamespace(architectures=["LlamaForCausalLM"]))
    assert llama.default_layers(30, 576, multi=True) == [6, 7, 8, 9, 10]
    assert llama.default_layers(30, 576) == [8, 9, 10] and llama.default_layers(28, 3072, multi=True) == [16, 17, 18]
    pins = llama.pinned_multi(30, 576, [6, 7, 8, 9, 10])
    assert pins == {"solver": "exact", "multi_general_weight": 1e5, "multi_entity_weight": 1.0,
                    "multi_swap_weight": 1.0}
    assert llama.pinned_multi(30, 576, [8, 9, 10]) == {} and llama.pinned_multi(28, 3072, [16, 17, 18]) == {}
    load_config(None, **pins)  # every pinned value passes the config's own checks
    hp, applied = Hyper().with_pins(pins)
    assert (hp.solver, hp.multi_general_weight, applied) == ("exact", 1e5, sorted(pins))
    user = load_config(None, solver="gradient", multi_general_weight=0.0)  # the user's values win
    hp, applied = user.with_pins(pins)
    assert (hp.solver, hp.multi_general_weight, hp.multi_swap_weight) == ("gradient", 0.0, 1.0)
    assert applied == ["multi_entity_weight", "multi_swap_weight"] and "explicit" not in hp.to_dict()


def test_debug_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("ZU_DEBUG", "1")
    res = runner.invoke(app, ["unlearn", "--model", str(tmp_path), "--forget", str(tmp_path / "x.jsonl"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Traceback" in res.output
