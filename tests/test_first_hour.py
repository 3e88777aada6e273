"""A new user's first hour (issue 24): what they hit first must just work, and never lose data or
give CI a wrong answer."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hubcache import COMMIT, hub_cache
from zu_cli.cli import app

runner = CliRunner()
FAST = "n_prefixes: 1\nprefix_len: 3\nz_steps: 3\nsens_steps: 3\nstats_samples: 8\nstats_len: 12\nmax_rel_change: 1000.0\n"
ROOT = Path(__file__).resolve().parent.parent


def _req(tmp_path, rows, name="forget.jsonl"):
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def _unlearn(model, tmp_path, out, *extra, rows=None):
    req = _req(tmp_path, rows or [{"id": "a", "prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}])
    (tmp_path / "fast.yaml").write_text(FAST)
    return runner.invoke(app, ["unlearn", "--model", str(model), "--forget", str(req), "--out", str(out), "--layers",
                               "1", "--config", str(tmp_path / "fast.yaml"), "--device-map", "cpu", *extra])


# --- data and CI correctness ------------------------------------------------------------------


def test_force_never_deletes_a_directory_zu_did_not_write(tiny_models, tmp_path):
    mine = tmp_path / "somedir"
    mine.mkdir()
    (mine / "file.txt").write_text("my thesis")
    res = _unlearn(tiny_models["llama"], tmp_path, mine, "--force")
    assert res.exit_code == 2, res.output
    assert "not a zu output" in res.output and "Traceback" not in res.output
    assert (mine / "file.txt").read_text() == "my thesis" and sorted(p.name for p in mine.iterdir()) == ["file.txt"]
    # A previous zu output is replaced; an empty directory is taken.
    assert _unlearn(tiny_models["llama"], tmp_path, tmp_path / "zu-out").exit_code == 0
    (tmp_path / "empty").mkdir()
    assert _unlearn(tiny_models["llama"], tmp_path, tmp_path / "empty", "--force").exit_code == 0
    res = _unlearn(tiny_models["llama"], tmp_path, tmp_path / "zu-out", "--force")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "zu-out" / "zu-manifest.json").is_file()
    (tmp_path / "afile").write_text("x")
    assert _unlearn(tiny_models["llama"], tmp_path, tmp_path / "afile", "--force").exit_code == 2
    assert (tmp_path / "afile").read_text() == "x"


@pytest.fixture(scope="module")
def edited_unknown(tiny_models, tmp_path_factory):
    """A tiny random model edited for a fact it never knew (its answer is not its top prediction)."""
    tmp = tmp_path_factory.mktemp("unknown")
    res = _unlearn(tiny_models["llama"], tmp, tmp / "out", "--json")
    assert res.exit_code == 0, res.output
    return tmp, json.loads(res.stdout)


def test_junit_folder_is_created_and_an_unwritable_report_is_exit_6(edited_unknown, tmp_path):
    tmp, _ = edited_unknown
    args = ["verify", "--model", str(tmp / "out"), "--forget", str(tmp / "forget.jsonl"), "--device-map", "cpu"]
    res = runner.invoke(app, args + ["--junit", str(tmp_path / "reports" / "deep" / "verify.xml")])
    assert res.exit_code == 0, res.output  # nothing fails: the one request was never recalled (skipped)
    assert (tmp_path / "reports" / "deep" / "verify.xml").is_file()
    (tmp_path / "blocker").write_text("a file where a folder should be")
    res = runner.invoke(app, args + ["--junit", str(tmp_path / "blocker" / "verify.xml")])
    assert res.exit_code == 6, res.output
    assert "--junit" in res.output and "Traceback" not in res.output


def test_an_unexpected_error_is_exit_70_never_a_verdict(edited_unknown, monkeypatch):
    import zu_cli.pipeline_verify as pv

    tmp, _ = edited_unknown
    monkeypatch.setattr(pv, "run_verify", lambda *a, **k: 1 / 0)
    res = runner.invoke(app, ["verify", "--model", str(tmp / "out")])
    assert res.exit_code == 70 and "internal error: ZeroDivisionError" in res.output and "Traceback" not in res.output


def test_a_fact_never_recalled_is_not_counted_forgotten(edited_unknown, tmp_path):
    tmp, doc = edited_unknown
    assert doc["requests"][0]["status"] == "not recalled before the edit"
    assert doc["counts"] == {"forgotten": 0, "still_recalled": 0, "not_recalled_before": 1, "total": 1}
    stmt = json.loads((tmp / "out" / "zu-manifest.json").read_text())
    assert stmt["predicate"]["probes"]["not_recalled_before_ids"] == ["a"]
    shown = runner.invoke(app, ["manifest", "show", str(tmp / "out")]).output
    assert "0/0 forgotten" in shown and "1 not recalled before the edit" in shown
    res = runner.invoke(app, ["verify", "--model", str(tmp / "out"), "--forget", str(tmp / "forget.jsonl"), "--json"])
    rep = json.loads(res.stdout)
    forget = rep["requests"][0]["probes"][0]
    assert rep["requests"][0]["status"] == "not recalled before the edit"
    assert forget["passed"] is None and forget["detail"] == "not recalled before the edit"


def test_unlearn_text_output_says_not_recalled(tiny_models, tmp_path):
    res = _unlearn(tiny_models["qwen2"], tmp_path, tmp_path / "o")
    assert res.exit_code == 0, res.output
    assert "not recalled before the edit" in res.output and "0/0 forgotten" in res.output


def test_locate_finds_no_effect_for_facts_the_model_never_knew(tiny_models, tmp_path):
    req = _req(tmp_path, [{"id": "a", "prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}])
    res = runner.invoke(app, ["locate", "--model", str(tiny_models["llama"]), "--forget", str(req),
                              "--device-map", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["found"] is False and doc["window"] == [] and "nothing to trace" in doc["reason"]
    res = runner.invoke(app, ["locate", "--model", str(tiny_models["llama"]), "--forget", str(req), "--device-map",
                              "cpu"])
    assert "no causal effect found" in res.output and "suggested window" not in res.output


def test_prove_accepts_the_same_request_with_other_probes(edited_unknown, tmp_path):
    tmp, _ = edited_unknown
    probes = _req(tmp_path, [{"id": "a", "prompt": "The quick brown fox", "subject": "fox", "target": "jumps",
                              "paraphrases": ["A quick brown fox"],
                              "neighbors": [{"prompt": "The lazy dog", "target": "sleeps"}]}], "probes.jsonl")
    res = runner.invoke(app, ["manifest", "prove", str(tmp / "out"), "--receipt", str(tmp / "out.zu-receipt.json"),
                              "--forget", str(probes)])
    assert res.exit_code == 0 and "part of this edit" in res.output, res.output
    other = _req(tmp_path, [{"id": "a", "prompt": "The quick brown fox", "subject": "fox", "target": "runs"}], "o.jsonl")
    res = runner.invoke(app, ["manifest", "prove", str(tmp / "out"), "--receipt", str(tmp / "out.zu-receipt.json"),
                              "--forget", str(other)])
    assert res.exit_code == 1 and "NOT part" in res.output


def test_manifests_before_the_identity_commitment_still_prove(tmp_path):
    """A v1 manifest (no ``requests.commitment``) committed to the whole request: prove recomputes it so."""
    from zu_cli.integrity import prove
    from zu_cli.manifest import COMMITMENT_V1, commitments
    from zu_cli.requests import load_requests

    full = _req(tmp_path, [{"id": "a", "prompt": "P is", "subject": "P", "target": "x", "paraphrases": ["Q is"]}])
    salt = bytes(32)
    old = commitments(load_requests(full), salt, COMMITMENT_V1)
    (tmp_path / "r.json").write_text(json.dumps({"salt": salt.hex(), "commitments": old}))
    stmt = {"predicate": {"requests": {"count": 1, "commitments": old}}}
    assert prove(stmt, tmp_path / "r.json", load_requests(full))[0]["in_manifest"]
    bare = _req(tmp_path, [{"id": "a", "prompt": "P is", "subject": "P", "target": "x"}], "bare.jsonl")
    assert not prove(stmt, tmp_path / "r.json", load_requests(bare))[0]["in_manifest"]


def _bash_blocks(markdown: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", markdown, re.S)


@pytest.mark.skipif(not (shutil.which("openssl") and shutil.which("jq")), reason="needs openssl and jq")
def test_openssl_recipe_in_docs_runs_as_pasted_and_leaves_the_checkpoint_intact(tiny_models, tmp_path):
    """docs/manifest.md's recipe for an Ed25519-signed output, verbatim, in a folder holding
    ./ckpt-clean, with the key where `zu keygen` puts it: the signature verifies, the files check,
    nothing lands in the checkpoint."""
    from zu_cli.integrity import check_integrity
    from zu_cli.manifest import dir_digests

    home = tmp_path / "home"
    assert runner.invoke(app, ["keygen", "--out", str(home / ".config" / "zu"), "--type", "ed25519"]).exit_code == 0
    res = _unlearn(tiny_models["llama"], tmp_path, tmp_path / "ckpt-clean", "--key",
                   str(home / ".config" / "zu" / "zu-signing.key"))
    assert res.exit_code == 0, res.output
    (home / ".config" / "zu" / "zu-signing.key").unlink()  # the recipe needs the public key only
    doc = (ROOT / "docs" / "manifest.md").read_text()
    recipe = next(b for b in _bash_blocks(doc) if "openssl pkeyutl" in b)
    before = dir_digests(tmp_path / "ckpt-clean")
    env = {k: v for k, v in os.environ.items() if k not in ("ZU_CONFIG_DIR", "XDG_CONFIG_HOME")}
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", recipe], cwd=tmp_path, env={**env, "HOME": str(home)},
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Signature Verified Successfully" in proc.stdout + proc.stderr
    assert dir_digests(tmp_path / "ckpt-clean") == before
    assert check_integrity(tmp_path / "ckpt-clean").ok


@pytest.mark.skipif(not shutil.which("model_signing"), reason="the model_signing CLI is not on PATH")
def test_model_signing_command_in_docs_runs_as_pasted(edited_unknown, tmp_path, signing_key):
    """docs/manifest.md's `model_signing verify key` line, verbatim, beside ./ckpt-clean and the public key."""
    tmp, _ = edited_unknown
    doc = (ROOT / "docs" / "manifest.md").read_text()
    command = next(b for b in _bash_blocks(doc) if "model_signing verify key" in b)
    shutil.copytree(tmp / "out", tmp_path / "ckpt-clean")
    shutil.copy(signing_key.with_name("zu-signing.pub"), tmp_path / "zu-signing.pub")
    proc = subprocess.run(["bash", "-euo", "pipefail", "-c", command], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0 and "Verification succeeded" in proc.stdout + proc.stderr, proc.stdout + proc.stderr


# --- the first five minutes ----------------------------------------------------------------


def test_every_readme_block_parses_and_its_jsonl_is_one_document_per_line():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    assert len(blocks) >= 3
    for block in blocks:
        proc = subprocess.run(["bash", "-n"], input=block, capture_output=True, text=True)
        assert proc.returncode == 0, block + proc.stderr
        for _, _, body in re.findall(r"> *(\S+\.jsonl) *<<'?(\w+)'?\n(.*?)\n\2\n", block, re.S):
            for line in body.splitlines():
                if line.strip():
                    json.loads(line)  # one request per line: the file zu reads


def test_options_are_checked_before_anything_is_loaded(tiny_models, tmp_path, monkeypatch):
    import zu_cli.loading as ck

    loads = []
    monkeypatch.setattr(ck, "load_model", lambda *a, **k: loads.append(1) or (_ for _ in ()).throw(AssertionError))
    base = ["unlearn", "--model", str(tiny_models["llama"]), "--forget", str(_req(tmp_path, [
        {"prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}])), "--out", str(tmp_path / "o")]
    for bad, says in ((["--dtype", "fp16"], "fp16"), (["--layers", "1-x"], "--layers"),
                      (["--layers", "1-9"], "outside the model"), (["--device-map", "gpu"], "no gpu accelerator"),
                      (["--device-map", "tpu9"], "unknown value"), (["--max-memory", "lots"], "--max-memory")):
        res = runner.invoke(app, base + bad)
        assert res.exit_code == 2 and says in res.output, (bad, res.output)
    for cmd in (["verify", "--model", str(tiny_models["llama"]), "--forget", str(tmp_path / "forget.jsonl")],
                ["locate", "--model", str(tiny_models["llama"]), "--forget", str(tmp_path / "forget.jsonl")]):
        res = runner.invoke(app, cmd + ["--device-map", "gpu"])
        assert res.exit_code == 2 and "no gpu accelerator" in res.output, res.output
    assert loads == [] and not (tmp_path / "o").exists()


def test_layer_ranges():
    from zu_cli.arch import parse_layers

    assert parse_layers("8-10") == [8, 9, 10] and parse_layers("6-8,10") == [6, 7, 8, 10]
    assert parse_layers("10,8,9") == [8, 9, 10] and parse_layers("auto") == "auto" and parse_layers("") is None


def test_unlearn_accepts_layer_ranges(tiny_models, tmp_path):
    req = _req(tmp_path, [{"id": "a", "prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}])
    (tmp_path / "fast.yaml").write_text(FAST)
    res = runner.invoke(app, ["unlearn", "--model", str(tiny_models["llama"]), "--forget", str(req), "--out",
                              str(tmp_path / "o2"), "--layers", "1-2", "--config", str(tmp_path / "fast.yaml"),
                              "--device-map", "cpu", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["layers"] == [1, 2]


def test_hub_model_ids_come_from_the_hf_cache_offline(tiny_models, tmp_path):
    hf_home = hub_cache(tmp_path / "hf", "zu-test/tiny-llama", tiny_models["llama"])  # tests/hubcache.py
    (tmp_path / "fast.yaml").write_text(FAST)
    req = _req(tmp_path, [{"id": "a", "prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}])
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    zu = [sys.executable, "-m", "zu_cli"]
    common = ["--forget", str(req), "--layers", "1", "--config", str(tmp_path / "fast.yaml"), "--device-map", "cpu"]
    proc = subprocess.run(zu + ["unlearn", "--model", "zu-test/tiny-llama", "--out", str(tmp_path / "o"), *common,
                                "--json"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    source = json.loads((tmp_path / "o" / "zu-manifest.json").read_text())["predicate"]["source"]
    assert source["hub"] == {"repo_id": "zu-test/tiny-llama", "revision": COMMIT}
    assert source["path_name"] == "zu-test/tiny-llama"
    snapshot = next((hf_home / "hub").glob("models--*/snapshots/*"))
    assert all(p.is_symlink() for p in snapshot.iterdir())  # the cache is untouched: zu writes elsewhere
    proc = subprocess.run(zu + ["unlearn", "--model", "zu-test/not-cached@v2", "--out", str(tmp_path / "o2"),
                                *common], env=env, capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert "not in the Hugging Face cache" in proc.stderr and "HF_HUB_OFFLINE" in proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("zu: error:")]
    assert "Traceback" not in proc.stderr and len(errors) == 1 and "hf download" in proc.stderr


def test_no_library_noise_and_no_blank_lines_off_a_terminal(tiny_models, tmp_path):
    (tmp_path / "fast.yaml").write_text(FAST)
    req = _req(tmp_path, [{"id": "a", "prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}])
    proc = subprocess.run([sys.executable, "-m", "zu_cli", "unlearn", "--model", str(tiny_models["llama"]), "--forget",
                           str(req), "--out", str(tmp_path / "o"), "--layers", "1", "--config",
                           str(tmp_path / "fast.yaml"), "--device-map", "cpu"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONWARNINGS": "default"})
    assert proc.returncode == 0, proc.stderr
    err = proc.stderr
    assert "Warning" not in err and "warnings.warn" not in err and "Writing model shards" not in err, err
    assert "\n\n" not in err.strip() and "\r" not in err, err
    for stage in ("loading the model", "statistics", "writing the checkpoint"):  # every stage says it ran
        assert f"{stage}" in err, err


def test_help_reads_like_a_real_cli():
    res = runner.invoke(app, ["--help"], terminal_width=120)
    assert res.exit_code == 0
    assert "..." not in res.output.split("Commands:")[1].split("Exit codes")[0]  # summaries are whole
    assert "--install-completion" in res.output and "Examples" in res.output and "-h, --help" in res.output
    verify = runner.invoke(app, ["verify", "--help"], terminal_width=120).output
    assert "<auto|float32|bfloat16|float16>" in verify and "Examples" in verify and "<str>" not in verify
    show = runner.invoke(app, ["manifest", "show", "--help"], terminal_width=120).output
    assert "{" not in show.splitlines()[0] and "DIR" in show.splitlines()[0]
    keygen = runner.invoke(app, ["keygen", "--help"], terminal_width=120).output
    assert "<ecdsa-p256|ed25519>" in keygen


def test_verify_says_each_verdict_once_integrity_first(edited_unknown, tmp_path):
    tmp, _ = edited_unknown
    shutil.copytree(tmp / "out", tmp_path / "out")
    data = bytearray((tmp_path / "out" / "config.json").read_bytes())
    (tmp_path / "out" / "config.json").write_bytes(bytes(data) + b" ")
    res = runner.invoke(app, ["verify", "--model", str(tmp_path / "out"), "--forget", str(tmp / "forget.jsonl")])
    assert res.exit_code == 4, res.output
    assert res.output.count("config.json: sha256 differs") == 1, res.output
    assert "probing" not in res.output
    res = runner.invoke(app, ["verify", "--model", str(tmp / "out"), "--forget", str(tmp / "forget.jsonl")])
    out = res.output
    assert out.index("integrity: intact") < out.index("probing") < out.index("verify: ok"), out


def test_docs_stand_on_their_own():
    for doc in (ROOT / "docs").glob("*.md"):
        assert "../shared" not in doc.read_text(), doc
    assert "../shared" not in (ROOT / "README.md").read_text()
