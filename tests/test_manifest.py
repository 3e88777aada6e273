"""Signed manifest (issue 5): keygen, DSSE signing, integrity verification, receipts."""

from __future__ import annotations

import base64
import json
import os
import shutil
import stat
import subprocess

import pytest
from typer.testing import CliRunner

from zu_cli.cli import app
from zu_cli.manifest import ENVELOPE, MANIFEST, SIGNATURE

runner = CliRunner()
FAST = "n_prefixes: 1\nprefix_len: 3\nz_steps: 3\nsens_steps: 3\nstats_samples: 8\nstats_len: 12\nmax_rel_change: 1000.0\n"
SECRET = "jumps"


def _unlearn(model, tmp_path, out, *extra, env=None):
    req = tmp_path / "forget.jsonl"
    req.write_text(json.dumps({"id": "s1", "prompt": "The quick brown fox", "subject": "fox", "target": SECRET}) + "\n"
                   + json.dumps({"id": "s2", "prompt": "Paris is the capital of", "target": "France"}) + "\n")
    (tmp_path / "fast.yaml").write_text(FAST)
    return runner.invoke(app, ["unlearn", "--model", str(model), "--forget", str(req), "--out", str(out), "--layers",
                               "1", "--config", str(tmp_path / "fast.yaml"), "--device-map", "cpu", *extra], env=env)


@pytest.fixture(scope="module")
def edited(tiny_models, tmp_path_factory):
    """One signed edit of the tiny llama (sharded bf16), made with the session's default key."""
    tmp = tmp_path_factory.mktemp("signed")
    res = _unlearn(tiny_models["llama"], tmp, tmp / "out")
    assert res.exit_code == 0, res.output
    return tmp


@pytest.fixture(scope="module")
def edited_ed25519(tiny_models, tmp_path_factory):
    """The same edit signed with an Ed25519 key: zu's own DSSE envelope (model-signing takes EC keys only)."""
    tmp = tmp_path_factory.mktemp("signed-ed25519")
    assert runner.invoke(app, ["keygen", "--out", str(tmp / "k"), "--type", "ed25519"]).exit_code == 0
    res = _unlearn(tiny_models["llama"], tmp, tmp / "out", "--key", str(tmp / "k" / "zu-signing.key"))
    assert res.exit_code == 0, res.output
    return tmp


@pytest.fixture
def out(edited, tmp_path):
    """A private copy of the signed checkpoint to tamper with."""
    shutil.copytree(edited / "out", tmp_path / "out")
    return tmp_path / "out"


@pytest.fixture
def out_ed25519(edited_ed25519, tmp_path):
    """A private copy of the Ed25519-signed checkpoint to tamper with."""
    shutil.copytree(edited_ed25519 / "out", tmp_path / "out-ed25519")
    return tmp_path / "out-ed25519"


def _verify(out, *extra):
    return runner.invoke(app, ["verify", "--model", str(out), *extra])


def _edited_shard(out):
    wmap = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    return wmap["model.layers.1.mlp.down_proj.weight"], sorted(set(wmap.values()) - {wmap["model.layers.1.mlp.down_proj.weight"]})


def _flip_last_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def test_genuine_output_verifies_pinned_and_unpinned(out, signing_key):
    pub = signing_key.with_name("zu-signing.pub")
    res = _verify(out, "--public-key", str(pub), "--require-key", "--json")
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["integrity"]["pinned"] and doc["integrity"]["tensors"] == 1 and doc["integrity"]["problems"] == []
    res = _verify(out)
    assert res.exit_code == 0 and "not pinned" in res.output
    assert (out / SIGNATURE).is_file() and not (out / ENVELOPE).exists()  # the default key is EC
    stmt = json.loads((out / MANIFEST).read_text())
    assert stmt["predicate"]["signer"]["format"] == "model-signing"
    names = {s["name"] for s in stmt["subject"]}
    assert names == {p.name for p in out.iterdir()} - {MANIFEST, SIGNATURE}
    assert SECRET not in (out / MANIFEST).read_text()


def test_ed25519_output_verifies_with_its_envelope(out_ed25519, edited_ed25519):
    res = _verify(out_ed25519, "--public-key", str(edited_ed25519 / "k" / "zu-signing.pub"), "--require-key")
    assert res.exit_code == 0, res.output
    env = json.loads((out_ed25519 / ENVELOPE).read_text())
    assert env["payloadType"] == "application/vnd.in-toto+json" and not (out_ed25519 / SIGNATURE).exists()
    assert base64.b64decode(env["payload"]) == (out_ed25519 / MANIFEST).read_bytes()
    names = {s["name"] for s in json.loads((out_ed25519 / MANIFEST).read_text())["subject"]}
    assert names == {p.name for p in out_ed25519.iterdir()} - {MANIFEST, ENVELOPE}


def _model_signing_verify(out, pub):
    """model_signing's own verification, as its documentation shows it (library)."""
    from model_signing import verifying

    try:
        verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(out, out / SIGNATURE)
    except Exception as exc:  # noqa: BLE001 - any refusal counts
        return str(exc)
    return None


def test_model_signing_library_and_cli_verify_a_zu_output(out, signing_key):
    """Issue 29: the standard tool checks what zu signed; a flipped byte fails both it and zu."""
    pub = signing_key.with_name("zu-signing.pub")
    assert _model_signing_verify(out, pub) is None
    cli = shutil.which("model_signing")
    args = [cli, "verify", "key", "--signature", str(out / SIGNATURE), "--public_key", str(pub), str(out)]
    if cli:
        proc = subprocess.run(args, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    shard, _ = _edited_shard(out)
    _flip_last_byte(out / shard)
    assert _model_signing_verify(out, pub) is not None
    if cli:
        assert subprocess.run(args, capture_output=True, text=True).returncode != 0
    res = _verify(out, "--public-key", str(pub))
    assert res.exit_code == 4 and shard in res.output


@pytest.mark.parametrize("which", ["edited", "untouched"])
def test_a_flipped_byte_in_a_shard_exits_4_naming_it(out, which):
    edited_shard, others = _edited_shard(out)
    shard = edited_shard if which == "edited" else others[0]
    _flip_last_byte(out / shard)
    res = _verify(out)
    assert res.exit_code == 4 and shard in res.output, res.output


def test_edited_manifest_exits_4(out):
    stmt = json.loads((out / MANIFEST).read_text())
    stmt["predicate"]["edit"]["layers"] = [2]
    (out / MANIFEST).write_text(json.dumps(stmt))
    res = _verify(out)
    assert res.exit_code == 4 and MANIFEST in res.output, res.output


def test_edited_payload_without_a_new_signature_exits_4(out, out_ed25519):
    env = json.loads((out_ed25519 / ENVELOPE).read_text())
    stmt = json.loads(base64.b64decode(env["payload"]))
    stmt["predicate"]["tensors"][0]["rel_change"] = 0.0
    env["payload"] = base64.b64encode(json.dumps(stmt).encode()).decode()
    (out_ed25519 / ENVELOPE).write_text(json.dumps(env))
    res = _verify(out_ed25519)
    assert res.exit_code == 4 and "signature does not verify" in res.output and ENVELOPE in res.output
    # model-signing: the bundle's payload edited without re-signing
    bundle = json.loads((out / SIGNATURE).read_text())
    payload = json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))
    payload["predicate"]["resources"][0]["digest"] = "00" * 32
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(json.dumps(payload).encode()).decode()
    (out / SIGNATURE).write_text(json.dumps(bundle))
    res = _verify(out)
    assert res.exit_code == 4 and "signature does not verify" in res.output and SIGNATURE in res.output, res.output


def test_swapped_signature_exits_4(out, out_ed25519, tiny_models, tmp_path):
    other = _unlearn(tiny_models["qwen2"], tmp_path, tmp_path / "other")
    assert other.exit_code == 0
    shutil.copyfile(tmp_path / "other" / SIGNATURE, out / SIGNATURE)  # a genuine bundle of another edit
    res = _verify(out)
    assert res.exit_code == 4 and SIGNATURE in res.output, res.output
    env = json.loads((out_ed25519 / ENVELOPE).read_text())
    env["signatures"] = [{"keyid": env["signatures"][0]["keyid"], "sig": base64.b64encode(b"\0" * 64).decode()}]
    (out_ed25519 / ENVELOPE).write_text(json.dumps(env))
    res = _verify(out_ed25519)
    assert res.exit_code == 4 and ENVELOPE in res.output, res.output


def test_wrong_or_missing_pinned_key_exits_4(out, tmp_path):
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "k")]).exit_code == 0
    res = _verify(out, "--public-key", str(tmp_path / "k" / "zu-signing.pub"))
    assert res.exit_code == 4 and "not the pinned key" in res.output
    assert _verify(out, "--require-key").exit_code == 4


def test_resigned_by_another_key_passes_only_unpinned(out, tmp_path, signing_key):
    """An attacker who re-signs a tampered checkpoint with their own key is caught by pinning."""
    from zu_cli.keys import load_signing_key
    from zu_cli.manifest import write_manifest

    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "evil")]).exit_code == 0
    stmt = json.loads((out / MANIFEST).read_text())
    (out / "extra.txt").write_text("x")  # any change; the forged manifest lists it
    write_manifest(out, {k: v for k, v in stmt["predicate"].items() if k != "signer"},
                   load_signing_key(tmp_path / "evil" / "zu-signing.key"))
    assert _verify(out).exit_code == 0
    res = _verify(out, "--public-key", str(signing_key.with_name("zu-signing.pub")))
    assert res.exit_code == 4 and "not the pinned key" in res.output


def test_added_or_removed_files_exit_4(out):
    (out / "extra.safetensors").write_bytes(b"\0" * 16)
    res = _verify(out)
    assert res.exit_code == 4 and "extra.safetensors" in res.output
    (out / "extra.safetensors").unlink()
    (out / "NOTES.txt").write_text("harmless")  # not a weight file: a warning only
    res = _verify(out)
    assert res.exit_code == 0 and "NOTES.txt" in res.output
    (out / "tokenizer.json").unlink()
    res = _verify(out)
    assert res.exit_code == 4 and "tokenizer.json" in res.output and "missing" in res.output


def test_no_manifest_exits_4(tiny_models):
    res = _verify(tiny_models["llama"])
    assert res.exit_code == 4 and ENVELOPE in res.output


def test_env_key_and_ecdsa_keys_sign(tiny_models, tmp_path):
    res = runner.invoke(app, ["keygen", "--out", str(tmp_path / "ec"), "--type", "ecdsa-p256", "--json"])
    assert res.exit_code == 0
    fp = json.loads(res.stdout)["fingerprint"]
    pem = (tmp_path / "ec" / "zu-signing.key").read_text()
    res = _unlearn(tiny_models["llama"], tmp_path, tmp_path / "o1", env={"ZU_SIGNING_KEY": pem})
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "o1" / MANIFEST).read_text())["predicate"]["signer"]["keyid"] == fp
    assert _verify(tmp_path / "o1", "--public-key", str(tmp_path / "ec" / "zu-signing.pub")).exit_code == 0
    res = _unlearn(tiny_models["llama"], tmp_path, tmp_path / "o2", "--key", str(tmp_path / "ec" / "zu-signing.key"))
    assert res.exit_code == 0
    assert json.loads((tmp_path / "o2" / MANIFEST).read_text())["predicate"]["signer"]["keyid"] == fp


def test_unusable_or_missing_key_exits_2_and_writes_nothing(tiny_models, tmp_path, monkeypatch):
    bad = tmp_path / "bad.pem"
    bad.write_text("-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    res = _unlearn(tiny_models["llama"], tmp_path, tmp_path / "o", "--key", str(bad))
    assert res.exit_code == 2 and str(bad) in res.output and not (tmp_path / "o").exists()
    monkeypatch.setenv("ZU_CONFIG_DIR", str(tmp_path / "empty"))
    res = _unlearn(tiny_models["llama"], tmp_path, tmp_path / "o")
    assert res.exit_code == 2 and "zu keygen" in res.output and not (tmp_path / "o").exists()


def test_keygen_permissions_and_no_overwrite(tmp_path):
    res = runner.invoke(app, ["keygen", "--out", str(tmp_path)])
    assert res.exit_code == 0 and "fingerprint" in res.output
    assert stat.S_IMODE(os.stat(tmp_path / "zu-signing.key").st_mode) == 0o600
    before = (tmp_path / "zu-signing.key").read_bytes()
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path)]).exit_code == 2
    assert (tmp_path / "zu-signing.key").read_bytes() == before
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path), "--force"]).exit_code == 0
    assert (tmp_path / "zu-signing.key").read_bytes() != before


def test_receipt_proves_membership(edited, tmp_path):
    out, receipt = edited / "out", edited / "out.zu-receipt.json"
    assert stat.S_IMODE(os.stat(receipt).st_mode) == 0o600
    res = runner.invoke(app, ["manifest", "prove", str(out), "--receipt", str(receipt), "--forget",
                              str(edited / "forget.jsonl"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["all_included"] and SECRET not in res.stdout
    other = tmp_path / "other.jsonl"
    other.write_text(json.dumps({"id": "s1", "prompt": "The quick brown fox", "subject": "fox", "target": "runs"}) + "\n")
    res = runner.invoke(app, ["manifest", "prove", str(out), "--receipt", str(receipt), "--forget", str(other)])
    assert res.exit_code == 1 and "NOT part" in res.output
    fake = tmp_path / "fake-receipt.json"
    fake.write_text(json.dumps({"salt": "00" * 32, "commitments": {"s1": "ab"}}))
    res = runner.invoke(app, ["manifest", "prove", str(out), "--receipt", str(fake), "--forget", str(other)])
    assert res.exit_code == 4


def test_receipt_inside_out_is_refused(tiny_models, tmp_path):
    res = _unlearn(tiny_models["llama"], tmp_path, tmp_path / "o", "--receipt", str(tmp_path / "o" / "r.json"))
    assert res.exit_code == 2 and not (tmp_path / "o").exists()


def test_manifest_show_summarises_without_secrets(edited):
    res = runner.invoke(app, ["manifest", "show", str(edited / "out")])
    assert res.exit_code == 0, res.output
    assert "model.layers.1.mlp.down_proj.weight" in res.output and "ecdsa-p256" in res.output
    assert SECRET not in res.output


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command line tool")
def test_signature_verifies_with_openssl(edited_ed25519, tmp_path):
    """The recipe of docs/manifest.md: rebuild the DSSE PAE bytes and check them with openssl."""
    from zu_cli.manifest import PAYLOAD_TYPE, pae

    env = json.loads((edited_ed25519 / "out" / ENVELOPE).read_text())
    (tmp_path / "pae.bin").write_bytes(pae(PAYLOAD_TYPE, base64.b64decode(env["payload"])))
    (tmp_path / "sig.bin").write_bytes(base64.b64decode(env["signatures"][0]["sig"]))
    proc = subprocess.run(["openssl", "pkeyutl", "-verify", "-pubin", "-inkey", str(edited_ed25519 / "k" /
                                                                                   "zu-signing.pub"), "-rawin", "-in", str(tmp_path / "pae.bin"), "-sigfile", str(tmp_path / "sig.bin")],
        capture_output=True, text=True)
    assert proc.returncode == 0 and "Signature Verified Successfully" in proc.stdout, proc.stdout + proc.stderr
