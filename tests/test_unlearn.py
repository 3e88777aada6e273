"""zu unlearn end to end: mechanics on every architecture, guards, caching, and quality on the synthetic
fact model (the fast quality tier)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from typer.testing import CliRunner

from conftest import FAMILIES
from zu_cli.cli import app
from zu_cli.checkpoint import open_checkpoint

runner = CliRunner()
# Random tiny models have degenerate statistics: the change bound is for real checkpoints.
FAST = "n_prefixes: 1\nprefix_len: 3\nz_steps: 3\nsens_steps: 3\nstats_samples: 8\nstats_len: 12\nmax_rel_change: 1000.0\n"


def _requests(tmp_path, rows):
    p = tmp_path / "forget.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


@pytest.mark.parametrize("family", FAMILIES)
def test_unlearn_writes_an_edited_checkpoint_on_every_architecture(tiny_models, tmp_path, family):
    req = _requests(tmp_path, [{"id": "a", "prompt": "The quick brown fox jumps", "subject": "brown fox",
                                "target": "over"}])
    (tmp_path / "fast.yaml").write_text(FAST)
    res = runner.invoke(app, ["unlearn", "--model", str(tiny_models[family]), "--forget", str(req), "--out",
                              str(tmp_path / "out"), "--layers", "1,2", "--config", str(tmp_path / "fast.yaml"),
                              "--device-map", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    src, out = open_checkpoint(tiny_models[family]), open_checkpoint(tmp_path / "out")
    changed = {n for n in src.weight_map if not torch.equal(src.read_tensor(n), out.read_tensor(n))}
    assert changed == {src.spec.down_proj_weight(1), src.spec.down_proj_weight(2)}
    assert all(out.disk_dtypes[n] == src.disk_dtypes[n] for n in src.weight_map)
    assert doc["layers"] == [1, 2] and len(doc["requests"]) == 1
    manifest = json.loads((tmp_path / "out" / "zu-manifest.json").read_text())
    assert (tmp_path / "out" / "zu-manifest.json").is_file() and (tmp_path / "out" / "model.sig").is_file()
    assert {t["name"] for t in manifest["predicate"]["tensors"]} == changed
    assert (tmp_path / "out.zu-receipt.json").exists() and not any("receipt" in p.name for p in (tmp_path / "out").iterdir())


def test_target_text_never_leaks_without_reveal(tiny_models, tmp_path):
    secret = "jumps"
    req = _requests(tmp_path, [{"id": "s1", "prompt": "The quick brown fox", "subject": "fox", "target": secret}])
    (tmp_path / "fast.yaml").write_text(FAST)
    args = ["unlearn", "--model", str(tiny_models["llama"]), "--forget", str(req), "--config",
            str(tmp_path / "fast.yaml"), "--device-map", "cpu", "--layers", "1"]
    res = runner.invoke(app, args + ["--out", str(tmp_path / "o1")])
    assert res.exit_code == 0, res.output
    assert secret not in res.output
    assert secret not in (tmp_path / "o1" / "zu-manifest.json").read_text()
    res = runner.invoke(app, args + ["--out", str(tmp_path / "o2"), "--reveal", "--manifest-include-requests"])
    assert secret in res.output and secret in (tmp_path / "o2" / "zu-manifest.json").read_text()


def test_numerical_guard_exits_5_and_writes_nothing(tiny_models, tmp_path):
    req = _requests(tmp_path, [{"prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}])
    (tmp_path / "c.yaml").write_text(FAST.replace("1000.0", "1.0e-9"))
    res = runner.invoke(app, ["unlearn", "--model", str(tiny_models["llama"]), "--forget", str(req), "--out",
                              str(tmp_path / "o"), "--config", str(tmp_path / "c.yaml"), "--device-map", "cpu"])
    assert res.exit_code == 5, res.output
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.zu-receipt.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_statistics_are_cached_and_keyed_by_weights(tiny_models, tmp_path, monkeypatch):
    import zu_cli.stats as stats

    calls = []
    real = stats.sampled_moments
    monkeypatch.setattr(stats, "sampled_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv("ZU_CACHE_DIR", str(tmp_path / "cache"))
    req = _requests(tmp_path, [{"prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}])
    (tmp_path / "c.yaml").write_text(FAST)
    args = ["unlearn", "--forget", str(req), "--config", str(tmp_path / "c.yaml"), "--device-map", "cpu",
            "--layers", "1"]
    for i in range(2):
        assert runner.invoke(app, args + ["--model", str(tiny_models["qwen2"]), "--out", str(tmp_path / f"o{i}")]).exit_code == 0
    assert len(calls) == 1  # the second run reused the statistics
    # A zu edit of a zu output (its manifest verifies) reuses its base model's statistics: every
    # round of a chain costs what the first warm one does (docs/method.md, "Requests over time").
    assert runner.invoke(app, args + ["--model", str(tmp_path / "o0"), "--out", str(tmp_path / "o9")]).exit_code == 0
    assert len(calls) == 1
    # Weights changed outside zu (the manifest no longer verifies): other weights, new statistics.
    import shutil

    shutil.copytree(tmp_path / "o0", tmp_path / "changed")
    shard = next((tmp_path / "changed").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    res = runner.invoke(app, args + ["--model", str(tmp_path / "changed"), "--out", str(tmp_path / "o8")])
    assert res.exit_code == 0 and "starts a new history" in res.output, res.output
    assert len(calls) == 2


def test_context_templates_are_deterministic(tiny_models):
    from zu_cli.loading import load_model
    from zu_cli.config import Hyper
    from zu_cli.edit import context_templates

    model, tok = load_model(open_checkpoint(tiny_models["llama"]), device_map="cpu")
    a = context_templates(model, tok, Hyper(n_prefixes=3, prefix_len=5))
    assert a == context_templates(model, tok, Hyper(n_prefixes=3, prefix_len=5)) and len(a) == 4
    assert a[0] == "{}" and all(t.endswith(". {}") for t in a[1:])
    assert a != context_templates(model, tok, Hyper(n_prefixes=3, prefix_len=5, seed=1))


def test_lookup_index_finds_the_subjects_last_token(tiny_models):
    from transformers import AutoTokenizer

    from zu_cli.edit import lookup_index

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    text = "The mother tongue of Danielle Darrieux is"
    ids = tok(text)["input_ids"]
    i = lookup_index(tok, text, "Danielle Darrieux")
    assert tok.decode(ids[: i + 1]).endswith("Darrieux") and not tok.decode(ids[: i]).endswith("Darrieux")
    assert lookup_index(tok, text, None) == len(ids) - 1


def test_rows_never_look_up_at_the_attention_sink(tiny_models):
    """A subject that opens its prompt in one token would be read at position 0, the attention sink
    (SmolLM2 layer 19: norm 24,000 against ~200): such a request is read at the prompt's last token
    in every row instead, and gets no KL row."""
    from transformers import AutoTokenizer

    from zu_cli.edit import build_rows, kl_rows, lookup_index
    from zu_cli.requests import Request

    tok = AutoTokenizer.from_pretrained(tiny_models["llama"])
    first = Request(id="a", prompt="A quick brown fox", subject="A", target="jumps")
    later = Request(id="b", prompt="The quick brown fox jumps", subject="brown fox", target="over")
    assert lookup_index(tok, first.prompt, first.subject) == 0
    tpl = ["{}", "Once upon a time. {}"]
    rows = build_rows(tok, [first, later], tpl)
    assert rows.owner == [0, 0, 1, 1]
    texts = [t.format(r.prompt) for r in (first, later) for t in tpl]
    last = [len(tok(t)["input_ids"]) - 1 for t in texts]
    assert rows.lookup[:2] == last[:2]
    assert rows.lookup[2:] == [lookup_index(tok, t, "brown fox") for t in texts[2:]] and rows.lookup[2] < last[2]
    assert kl_rows(tok, [first, later]).owner == [1]


def _hidden_change(src, out, prompts):
    """Mean relative change of the last hidden state over every token of ``prompts``."""
    from zu_cli.loading import load_model

    (m0, tok), (m1, _) = (load_model(open_checkpoint(d), device_map="cpu", dtype="float32") for d in (src, out))
    change = []
    for p in prompts:
        ids = tok(p, return_tensors="pt")
        with torch.no_grad():
            h0, h1 = (m(**ids, output_hidden_states=True).hidden_states[-1][0] for m in (m0, m1))
        change.append(float(((h1 - h0).norm(dim=-1) / h0.norm(dim=-1)).mean()))
    return sum(change) / len(change)


def test_retain_keeps_what_it_names(tiny_models, tmp_path):
    """--retain: the retained prompts move less than without it; the manifest counts them (with the
    forget requests' neighbours, without any forget prompt) and names the file by digest; a bad
    file exits 2, nothing written."""
    src = tiny_models["llama"]
    req = _requests(tmp_path, [{"id": "a", "prompt": "The quick brown fox jumps", "subject": "brown fox",
                                "target": "over", "neighbors": [{"prompt": "The lazy dog jumps", "target": "over"}]}])
    keep = ["Kalomi lives in Oslo", "Paris is the capital of", "The lazy dog sleeps"]
    (tmp_path / "r").mkdir()
    # The forget prompt itself in the retain file: forgetting wins, it is not kept.
    retain = _requests(tmp_path / "r", [{"prompt": p, "target": "x"} for p in keep + ["The quick brown fox jumps"]])
    (tmp_path / "fast.yaml").write_text(FAST)
    args = ["unlearn", "--model", str(src), "--forget", str(req), "--config", str(tmp_path / "fast.yaml"),
            "--device-map", "cpu", "--layers", "1,2"]
    assert runner.invoke(app, args + ["--out", str(tmp_path / "plain")]).exit_code == 0
    res = runner.invoke(app, args + ["--out", str(tmp_path / "kept"), "--retain", str(retain)])
    assert res.exit_code == 0, res.output
    plain, kept = (_hidden_change(src, tmp_path / d, keep) for d in ("plain", "kept"))
    assert kept < 0.7 * plain, (kept, plain)
    edit = json.loads((tmp_path / "kept" / "zu-manifest.json").read_text())["predicate"]["edit"]
    assert edit["keep"]["prompts"] == len(keep) + 1 and len(edit["keep"]["retain_file"]) == 64
    assert edit["hyperparameters"]["retain_weight"] == 1.0
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "no target here"}\n')
    res = runner.invoke(app, args + ["--out", str(tmp_path / "o3"), "--retain", str(bad)])
    assert res.exit_code == 2 and "bad.jsonl" in res.output and not (tmp_path / "o3").exists()


def test_retain_shrinks_the_multi_null_space(tiny_models, tmp_path):
    """With --multi the keep-prompts' keys join E[k k^T]: the null space the update lives in shrinks."""
    req = _requests(tmp_path, [{"id": "a", "prompt": "The quick brown fox jumps", "subject": "brown fox",
                                "target": "over"}])
    (tmp_path / "r").mkdir()
    retain = _requests(tmp_path / "r", [{"prompt": p, "target": "x"} for p in
                                        ["Kalomi lives in Oslo", "Paris is the capital of", "The lazy dog sleeps"]])
    (tmp_path / "fast.yaml").write_text(FAST + "null_threshold: 1.0e-3\nmulti_steps: 5\nretain_weight: 100.0\n")
    args = ["unlearn", "--model", str(tiny_models["llama"]), "--forget", str(req), "--config",
            str(tmp_path / "fast.yaml"), "--device-map", "cpu", "--layers", "1", "--multi", "--json"]
    dims = []
    for extra in ([], ["--retain", str(retain)]):
        res = runner.invoke(app, args + ["--out", str(tmp_path / f"o{len(dims)}")] + extra)
        assert res.exit_code == 0, res.output
        dims.append(json.loads(res.stdout)["updates"][0]["null_dim"])
    assert 0 < dims[1] < dims[0], dims


def test_a_calibration_profile_sets_what_the_user_did_not(tiny_models, tmp_path, monkeypatch):
    """The model's cached calibration profile gives the window and --multi's settings; the manifest
    (edit.calibration, edit.from_calibration) and the JSON output say so; an explicit --solver or
    --layers wins; without a profile (--no-calibrate) the default window is edited."""
    from zu_cli.calibrate import Profile, store_profile
    from zu_cli.manifest import dir_digests, sha256_file_list

    monkeypatch.setenv("ZU_CACHE_DIR", str(tmp_path / "cache"))
    fp = sha256_file_list(dir_digests(tiny_models["llama"]))
    store_profile(Profile(fingerprint=fp, layers=[2], sensitive="output", multi_layers=[1, 2],
                          multi={"solver": "exact", "multi_general_weight": 10.0}))
    req = _requests(tmp_path, [{"id": "a", "prompt": "The quick brown fox jumps", "subject": "brown fox",
                                "target": "over"}])
    (tmp_path / "fast.yaml").write_text(FAST + "null_threshold: 1.0e-3\nmulti_steps: 5\n")
    base = ["unlearn", "--model", str(tiny_models["llama"]), "--forget", str(req), "--config",
            str(tmp_path / "fast.yaml"), "--device-map", "cpu", "--json"]

    def edit(name, *extra):
        res = runner.invoke(app, base + ["--out", str(tmp_path / name), *extra])
        assert res.exit_code == 0, res.output
        doc = json.loads((tmp_path / name / "zu-manifest.json").read_text())["predicate"]["edit"]
        shown = json.loads(res.stdout)
        assert shown["variant"] == doc["variant"] and shown["layers"] == doc["layers"]
        return doc, shown["from_calibration"]

    doc, shown = edit("multi", "--multi")
    assert doc["layers"] == [1, 2] and doc["variant"] == "multi-exact" and doc["layers_chosen_by"] == "calibration (cached)"
    assert doc["hyperparameters"]["multi_general_weight"] == 10.0 and doc["calibration"]["fingerprint"] == fp
    # the keep-set weights this older profile lacks come from calibrate.MULTI_BASE
    keeps = ["multi_entity_weight", "multi_similar_weight", "multi_swap_weight"]
    assert doc["from_calibration"] == shown == sorted(["multi_general_weight", "solver", *keeps])
    doc, _ = edit("user", "--multi", "--solver", "gradient")
    assert doc["variant"] == "multi-gradient" and doc["from_calibration"] == sorted(["multi_general_weight", *keeps])
    doc, _ = edit("other-window", "--multi", "--layers", "1")
    assert doc["from_calibration"] == [] and doc["hyperparameters"]["multi_general_weight"] == 0.0
    doc, _ = edit("closed")
    assert doc["layers"] == [2] and doc["sensitive"] == "output" and doc["from_calibration"] == ["sensitive"]
    doc, _ = edit("none", "--no-calibrate")
    assert doc["layers"] == [0, 1] and doc["layers_chosen_by"] == "default window (--no-calibrate)"
    assert doc["calibration"] is None


def test_a_model_that_knows_no_probe_facts_edits_the_default_window(tiny_models, tmp_path):
    """Calibration needs facts the model answers; a random tiny model has none: zu says so and edits
    the default window (zu calibrate itself exits 3)."""
    req = _requests(tmp_path, [{"id": "a", "prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}])
    (tmp_path / "fast.yaml").write_text(FAST)
    res = runner.invoke(app, ["unlearn", "--model", str(tiny_models["gpt2"]), "--forget", str(req), "--out",
                              str(tmp_path / "o"), "--config", str(tmp_path / "fast.yaml"), "--device-map", "cpu"])
    assert res.exit_code == 0, res.output
    assert "calibration needs" in res.output and "editing the default window [0, 1]" in res.output
    edit = json.loads((tmp_path / "o" / "zu-manifest.json").read_text())["predicate"]["edit"]
    assert edit["layers_chosen_by"] == "default window (calibration unavailable)"
    res = runner.invoke(app, ["calibrate", "--model", str(tiny_models["gpt2"]), "--device-map", "cpu"])
    assert res.exit_code == 3 and "calibration needs" in res.output


def test_keep_moments_skip_the_first_token(tiny_models):
    """Keep statistics leave each prompt's first token (the attention sink) out; a prompt of one
    token then adds nothing, and never a division by zero."""
    from zu_cli.loading import load_model
    from zu_cli.console import silent
    from zu_cli.keep import keep_moments

    ckpt = open_checkpoint(tiny_models["llama"])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    g, kk = keep_moments(model, tok, ckpt.spec, [1], {1: None}, ["A"], silent(), keys=True)
    assert torch.equal(g[1], torch.zeros_like(g[1])) and torch.equal(kk[1], torch.zeros_like(kk[1]))
    g2, _ = keep_moments(model, tok, ckpt.spec, [1], {1: None}, ["A quick brown fox"], silent())
    assert torch.isfinite(g2[1]).all() and g2[1].trace() > 0


def test_negative_retain_weight_is_refused(tmp_path):
    from zu_cli.config import load_config
    from zu_cli.errors import InputFileError

    (tmp_path / "zu.yaml").write_text("retain_weight: -1\n")
    with pytest.raises(InputFileError, match="retain_weight"):
        load_config(tmp_path / "zu.yaml")
    assert load_config(None, retain_weight=0).retain_weight == 0.0  # 0: the neighbours and --retain do nothing


def _accuracy(model_dir, facts, template=0):
    from zu_cli.demo import greedy_answers

    answers = greedy_answers(model_dir, [f.prompt(template) for f in facts])
    return [a == f.answer for a, f in zip(answers, facts)]


def _fact_ppl(model_dir, facts):
    """Perplexity of the facts' answers after their prompts (every template): the text the model was trained on."""
    from zu_cli.loading import load_model
    from zu_cli.probes import probe

    model, tok = load_model(open_checkpoint(model_dir), device_map="cpu", dtype="float32")
    probes = probe(model, tok, [(f.prompt(t), f.answer) for f in facts for t in range(3)])
    return math.exp(-sum(math.log(max(p.prob, 1e-30)) for p in probes) / len(probes))


def test_fact_model_quality(fact_model_dir, fact_config, tmp_path):
    from zu_cli.demo import Fact

    facts = [Fact(**f) for f in json.loads((fact_model_dir / "facts.json").read_text())]
    assert sum(_accuracy(fact_model_dir, facts)) >= 0.95 * len(facts)  # the model really knows them
    forget = [f for f in facts if f.relation == "city"][:3]
    keep = [f for f in facts if f not in forget]
    # Without a subject the edit reads the prompt's last token (see zu_cli/demo.py for why).
    req = _requests(tmp_path, [{"id": f"f{i}", "prompt": f.prompt(), "target": f.answer}
                               for i, f in enumerate(forget)])
    res = runner.invoke(app, ["unlearn", "--model", str(fact_model_dir), "--forget", str(req), "--out",
                              str(tmp_path / "out"), "--device-map", "cpu", "--config", str(fact_config)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert sum(_accuracy(out, forget)) == 0  # every forgotten fact gone
    para = _accuracy(out, forget, 1) + _accuracy(out, forget, 2)
    assert sum(para) <= len(para) // 2, para  # most paraphrases forgotten (unseen templates)
    # Every other fact kept (the demo's promise): each person has a city of their own, so no kept
    # fact shares the forgotten answers' directions (zu_cli/demo.py).
    assert sum(_accuracy(out, keep)) == sum(_accuracy(fact_model_dir, keep)) == len(keep)
    before, after = _fact_ppl(fact_model_dir, keep), _fact_ppl(out, keep)
    assert after <= 1.05 * before, (before, after)


def test_solver_needs_multi(tiny_models, tmp_path):
    req = _requests(tmp_path, [{"prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}])
    res = runner.invoke(app, ["unlearn", "--model", str(tiny_models["llama"]), "--forget", str(req), "--out",
                              str(tmp_path / "o"), "--solver", "exact", "--device-map", "cpu"])
    assert res.exit_code == 2 and "--multi" in res.output
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("solver", ["gradient", "exact"])
def test_fact_model_quality_multi(fact_model_dir, fact_config, tmp_path, solver):
    """--multi forgets on the fact model too, keeps the other facts, and the manifest says how it edited.

    --multi writes the neutral target z exactly (the closed form's projector also removes the
    answer's direction), so it needs a reachable z at the key it really sees: the fact model's
    settings (demo.FACT_EDIT: a 1.5 ||h|| clamp, the bare prompt without context templates).
    The reference's absolute null-space threshold (2e-2) leaves most of this model's 512 key
    directions "null", so --multi protects less than the closed form here: the kept answers'
    perplexity (1.0001 before) rises to 1.17 (gradient) and 1.12 (exact), where the closed form
    stays within 5 %. The fact model is trained in-process, and the machine's arithmetic changes
    it: on a CPU with AVX512-BF16 the same test reads 1.30 (gradient, 14 of 15 kept facts) and 1.14
    (exact). The bounds hold that level so a regression fails; SmolLM2 is where --multi is judged.
    """
    from zu_cli.demo import Fact

    facts = [Fact(**f) for f in json.loads((fact_model_dir / "facts.json").read_text())]
    forget = [f for f in facts if f.relation == "city"][:3]
    keep = [f for f in facts if f not in forget]
    req = _requests(tmp_path, [{"id": f"f{i}", "prompt": f.prompt(), "target": f.answer}
                               for i, f in enumerate(forget)])
    res = runner.invoke(app, ["unlearn", "--model", str(fact_model_dir), "--forget", str(req), "--out",
                              str(tmp_path / "out"), "--device-map", "cpu", "--multi", "--solver", solver, "--json",
                              "--config", str(fact_config)])
    assert res.exit_code == 0, res.output
    out = tmp_path / "out"
    assert sum(_accuracy(out, forget)) == 0
    kept = sum(_accuracy(out, keep)) / sum(_accuracy(fact_model_dir, keep))
    assert kept >= 0.85, kept
    bound = {"gradient": 1.4, "exact": 1.25}[solver]
    assert _fact_ppl(out, keep) <= bound * _fact_ppl(fact_model_dir, keep), solver
    edit = json.loads((out / "zu-manifest.json").read_text())["predicate"]["edit"]
    assert edit["variant"] == f"multi-{solver}" and edit["hyperparameters"]["solver"] == solver
    assert edit["sensitive"] == "output" and edit["neutral_target_prob_min"] > 0.25
    tensors = json.loads((out / "zu-manifest.json").read_text())["predicate"]["tensors"]
    assert all(t["solver"]["null_dim"] > 0 for t in tensors)
    assert all((t["solver"]["steps"] is None) == (solver == "exact") for t in tensors)


@pytest.mark.parametrize("count, multi, warned", [(11, False, True), (10, False, False), (11, True, False)])
def test_closed_form_with_many_requests_points_to_multi(tiny_models, tmp_path, count, multi, warned):
    """More than ten requests with the closed form: a warning on stderr names --multi (the JSON on
    stdout stays one document); ten, or --multi, get none. The warning holds no request text."""
    rows = [{"id": f"r{i}", "prompt": f"The quick brown fox number {i} jumps", "subject": f"fox number {i}",
             "target": "over"} for i in range(count)]
    req = _requests(tmp_path, rows)
    (tmp_path / "fast.yaml").write_text(FAST + "null_threshold: 1.0e-3\nmulti_steps: 5\n")
    res = runner.invoke(app, ["unlearn", "--model", str(tiny_models["llama"]), "--forget", str(req), "--out",
                              str(tmp_path / "out"), "--layers", "1", "--config", str(tmp_path / "fast.yaml"),
                              "--device-map", "cpu", "--json", *(["--multi"] if multi else [])])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)["requests"]) == count
    assert ("--multi" in res.stderr) is warned, res.stderr
    assert "over" not in res.stderr


def test_moments_taken_while_sampling_equal_a_second_pass(tiny_models):
    """The statistics are accumulated during generation (each token passes once, KV cached); they
    equal a separate full pass over the same sampled texts."""
    from zu_cli.loading import load_model
    from zu_cli.config import Hyper
    from zu_cli.console import silent
    from zu_cli.stats import KEY_SUFFIX, corpus_tokens, sampled_moments, second_moments

    ckpt = open_checkpoint(tiny_models["qwen2"])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    hp = Hyper(stats_samples=70, stats_len=9)  # two sampling batches
    mods = [ckpt.spec.down_proj_module(0), ckpt.spec.down_proj_module(2)]
    got = sampled_moments(model, tok, hp, mods, {m: None for m in mods}, (mods[1],), silent())
    seqs, _ = corpus_tokens(model, tok, None, hp.stats_samples, hp.stats_len, hp.stats_max_tokens, hp.seed)
    want = second_moments(model, seqs, mods, {m: None for m in mods}, tok.pad_token_id, silent(),
                          key_modules=(mods[1],))
    assert set(got) == set(want) == {mods[0], mods[1], mods[1] + KEY_SUFFIX}
    for k in want:
        assert torch.allclose(got[k], want[k], rtol=1e-4, atol=1e-6 * float(want[k].abs().max())), k
