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
    # The kind calibration chose wins over the variant's default, never over an explicit setting.
    assert Hyper().sensitive_kind(multi=False, calibrated="output") == "output"
    assert Hyper(sensitive="pushed").sensitive_kind(multi=False, calibrated="output") == "pushed"


def test_windows_come_from_the_depth_not_from_a_model():
    """The default window (no calibration) ends at a third of the depth and keeps 30 % of the layers
    above; calibration's candidates end at fixed relative depths and at the traced window."""
    from zu_cli.windows import candidate_windows, default_window

    assert default_window(30) == [8, 9, 10] and default_window(24) == [6, 7, 8] and default_window(4) == [0, 1]
    assert candidate_windows(30, []) == [[8, 9, 10], [12, 13, 14], [16, 17, 18]]
    assert candidate_windows(30, [0, 1, 2]) == [[8, 9, 10], [12, 13, 14], [16, 17, 18], [0, 1, 2]]
    assert all(w[-1] <= 30 - 9 - 1 for w in candidate_windows(30, [25, 26, 27]))


def test_multi_window_starts_where_tracing_finds_the_facts():
    """--multi's window: five layers from the traced window's first layer (moved up past a layer a
    window may not hold, and down to keep 30 % of the layers above it); without a traced window,
    the closed form's extended two layers down."""
    from zu_cli.windows import last_end, multi_window

    assert multi_window([8, 9, 10], 0, [0, 1, 2], 30) == [0, 1, 2, 3, 4]
    assert multi_window([6, 7, 8], 0, [0, 1, 2], 24) == [0, 1, 2, 3, 4]
    assert multi_window([8, 9, 10], 1, [0, 1, 2], 30) == [1, 2, 3, 4, 5]
    assert multi_window([8, 9, 10], 0, [12, 13, 14], 30) == [12, 13, 14, 15, 16]
    assert multi_window([8, 9, 10], 0, [19, 20, 21], 30)[-1] == last_end(30) == 20
    assert multi_window([8, 9, 10], 0, None, 30) == multi_window([8, 9, 10]) == [6, 7, 8, 9, 10]
    assert multi_window([1, 2], 1) == [1, 2]


def test_multi_calibration_edits_more_probe_facts():
    """--multi's weight is chosen on an edit of 24 probe facts, taken in turn from each relation,
    with 40 others kept as neighbours; a model that knows fewer gets a smaller edit, never below 8."""
    from zu_cli.probefacts import N_EDIT, N_EDIT_MULTI, N_NEIGHBOURS, ProbeFact, multi_edit_size, split

    assert multi_edit_size(66) == N_EDIT_MULTI == 24 and multi_edit_size(91) == 24
    assert multi_edit_size(55) == 55 - N_NEIGHBOURS and multi_edit_size(20) == N_EDIT == 8
    facts = [ProbeFact(f"f{i}", f"r{i % 3}", "S", "p", "t", ()) for i in range(66)]
    edit, nbrs = split(facts, multi_edit_size(len(facts)))
    assert len(edit) == 24 and len(nbrs) == N_NEIGHBOURS and not {f.id for f in edit} & {f.id for f in nbrs}
    assert [f.relation for f in edit[:3]] == ["r0", "r1", "r2"] and split(facts)[0] == edit[:N_EDIT]


def test_recorded_profiles_are_of_this_calibration_version():
    """The Qwen tier seeds a profile `zu calibrate --json` recorded; one of an older version is
    discarded by zu (profile_path and load_profile key by VERSION) and recalibrated cold, which
    costs CI half an hour before the tier fails. Caught here, in the fast tier, instead."""
    import json

    from conftest import DATA
    from zu_cli.calibrate import VERSION, Profile

    paths = sorted(DATA.glob("calibration-*.json"))
    assert paths, "no recorded profile under tests/data"
    for path in paths:
        recorded = json.loads(path.read_text())
        assert recorded["version"] == VERSION, f"{path.name}: re-record with zu calibrate --force --json"
        assert Profile(**recorded).layers == recorded["layers"]


def test_parallel_blocks_never_edit_layer_0():
    """Where the MLP reads the block input in parallel with attention, layer 0's key at the last token
    is that token's embedding alone: windows move up past it (GPT-J always, NeoX by its flag)."""
    from types import SimpleNamespace as NS

    from zu_cli.arch import lookup
    from zu_cli.windows import candidate_windows, default_window

    neox = NS(architectures=["GPTNeoXForCausalLM"], model_type="gpt_neox", use_parallel_residual=True)
    assert lookup(neox).first_window_layer(neox) == 1
    neox.use_parallel_residual = False
    assert lookup(neox).first_window_layer(neox) == 0
    gptj = NS(architectures=["GPTJForCausalLM"], model_type="gptj")
    llama = NS(architectures=["LlamaForCausalLM"], model_type="llama")
    assert lookup(gptj).first_window_layer(gptj) == 1 and lookup(llama).first_window_layer(llama) == 0
    assert default_window(4, first=1) == [1, 2] and default_window(6, first=1) == [1, 2, 3]
    assert default_window(24, first=1) == default_window(24)
    assert candidate_windows(30, [0, 1, 2], first=1)[-1] == [1, 2, 3]


def test_calibration_ranks_remapping_first_then_utility():
    """A candidate that forgets by breaking the subject (EOS rarely near the top) never wins; among
    the rest the higher utility wins, whatever the count of missed targets (SmolLM2's figures)."""
    from zu_cli.probefacts import rank_key, score

    base = {"edit": [1] * 8, "paraphrases": [1] * 9, "neighbours": [1] * 40, "ppl": 10.0, "neutral_ranks": [500] * 8}

    def cand(recalled, para, nbr, ppl, eos_top):
        return score({"edit": [1] * recalled + [0] * (8 - recalled), "paraphrases": [1] * para + [0] * (9 - para),
                      "neighbours": [1] * nbr + [0] * (40 - nbr), "ppl": 10.0 * ppl,
                      "neutral_ranks": [0] * eos_top + [900] * (8 - eos_top)}, base)

    mid = cand(0, 4, 27, 1.0195, 6)        # 8-10: 67.5 % of neighbours, EOS top-10 for 6 of 8
    high = cand(0, 3, 13, 1.0109, 8)       # 12-14: one target missed only, but 32.5 % of neighbours
    subject = cand(0, 0, 31, 1.0203, 3)    # 0-2: best neighbours, EOS top-10 for 3 of 8
    assert high["misses"] < mid["misses"]
    assert sorted([subject, high, mid], key=rank_key) == [mid, high, subject]
    assert rank_key({"error": "failed", "utility": -1e9}) > rank_key(subject)  # a failed edit last


def test_multi_weight_is_not_chosen_for_its_strength():
    """--multi's null-space weights on SmolLM2's probe facts (docs/results.md): 1e4 re-maps all 8
    prompts and 1e5 half, but 1e5 keeps more neighbours at less perplexity and wins."""
    from zu_cli.probefacts import multi_rank_key

    weak = {"forgotten": 1.0, "paraphrases": 0.3333, "neighbours": 0.825, "ppl": 1.0114, "neutral": 1.0,
            "utility": 4.0887, "multi_general_weight": 1e4}
    mid = {"forgotten": 1.0, "paraphrases": 0.3333, "neighbours": 0.95, "ppl": 1.0063, "neutral": 0.5,
           "utility": 3.94, "multi_general_weight": 1e5}
    strong = {"forgotten": 0.125, "paraphrases": 1.0, "neighbours": 1.0, "ppl": 1.0002, "neutral": 0.125,
              "utility": 2.2457, "multi_general_weight": 1e6}
    assert min([weak, mid, strong], key=multi_rank_key) is mid


def test_calibrated_settings_apply_to_their_own_window_and_never_over_the_user():
    from zu_cli.calibrate import Profile, settings
    from zu_cli.config import Hyper, load_config

    prof = Profile(fingerprint="x", layers=[8, 9, 10], sensitive="output", multi_layers=[6, 7, 8, 9, 10],
                   multi={"solver": "exact", "multi_general_weight": 1e5})
    hp, applied, kind = settings(prof, [8, 9, 10], Hyper(), multi=False)
    assert kind == "output" and applied == ["sensitive"]
    assert settings(prof, [17, 18, 19], Hyper(), multi=False)[2] == "pushed"  # another window: the default
    hp, applied, kind = settings(prof, [6, 7, 8, 9, 10], Hyper(), multi=True)
    # the keep-set weights the profile lacks come from MULTI_BASE (a profile cached before they existed)
    keeps = ["multi_entity_weight", "multi_similar_weight", "multi_swap_weight"]
    assert (hp.solver, hp.multi_general_weight, applied, kind) == ("exact", 1e5, sorted(["multi_general_weight", "solver",
                                                                                         *keeps]), "output")
    user = load_config(None, solver="gradient")
    hp, applied, _ = settings(prof, [6, 7, 8, 9, 10], user, multi=True)
    assert hp.solver == "gradient" and applied == sorted(["multi_general_weight", *keeps])
    assert settings(None, [8, 9, 10], Hyper(), multi=False)[1:] == ([], "pushed")


def test_architecture_files_describe_architectures_only():
    """No setting tuned on a model lives in the architecture data (calibration finds them)."""
    from importlib import resources

    import yaml

    allowed = {"model_types", "architectures", "layers", "down_proj", "transposed", "bias", "num_layers_key",
               "final_norm", "lm_head", "embed", "mlp_output", "refuse_if", "parallel_mlp"}
    for f in resources.files("zu_cli.architectures").iterdir():
        if f.name.endswith(".yaml"):
            assert set(yaml.safe_load(f.read_text())) <= allowed, f.name


def test_a_block_structure_zu_cannot_edit_is_refused(tiny_models, tmp_path):
    """OPT configured to normalise after the residual sum (do_layer_norm_before: false) is refused
    (exit 3) before anything is written."""
    import shutil

    shutil.copytree(tiny_models["opt"], tmp_path / "opt")
    cfg = json.loads((tmp_path / "opt" / "config.json").read_text())
    (tmp_path / "opt" / "config.json").write_text(json.dumps({**cfg, "do_layer_norm_before": False}))
    req = tmp_path / "r.jsonl"
    req.write_text(json.dumps({"prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}) + "\n")
    res = runner.invoke(app, ["unlearn", "--model", str(tmp_path / "opt"), "--forget", str(req), "--out",
                              str(tmp_path / "o")])
    assert res.exit_code == 3 and "cannot edit this block structure" in res.output
    assert not (tmp_path / "o").exists()


def test_debug_shows_traceback(tmp_path, monkeypatch):
    monkeypatch.setenv("ZU_DEBUG", "1")
    res = runner.invoke(app, ["unlearn", "--model", str(tmp_path), "--forget", str(tmp_path / "x.jsonl"),
                              "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "Traceback" in res.output
