"""Requests over time (issue 28): lineage, the history chain, its verification; and the model card
(issue 29) that every edit writes."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from zu_cli.cli import app
from zu_cli.manifest import MANIFEST, SIGNATURE

runner = CliRunner()
FAST = "n_prefixes: 1\nprefix_len: 3\nz_steps: 3\nsens_steps: 3\nstats_samples: 8\nstats_len: 12\nmax_rel_change: 1000.0\n"
SECRETS = ["Zanzibar-one", "Zanzibar-two", "Zanzibar-three", "Zanzibar-four"]
CARD = "---\nlicense: apache-2.0\ntags:\n- mine\n---\n# My model\n\nWritten by its authors.\n"


def _round(src, tmp, out, i, *extra):
    req = tmp / f"forget{i}.jsonl"
    req.write_text(json.dumps({"id": f"r{i}", "prompt": f"The quick brown fox number {i}", "target": SECRETS[i - 1],
                               "paraphrases": [f"A fox, number {i}, is"]}) + "\n")
    (tmp / "fast.yaml").write_text(FAST)
    return runner.invoke(app, ["unlearn", "--model", str(src), "--forget", str(req), "--out", str(out), "--layers",
                               "1", "--config", str(tmp / "fast.yaml"), "--device-map", "cpu", *extra])


@pytest.fixture(scope="module")
def rounds(tiny_models, tmp_path_factory):
    """Three rounds, each editing the previous round's output; round 2 signed by a second (Ed25519) key."""
    tmp = tmp_path_factory.mktemp("rounds")
    base = tmp / "base"
    shutil.copytree(tiny_models["llama"], base)
    (base / "README.md").write_text(CARD)
    assert runner.invoke(app, ["keygen", "--out", str(tmp / "k2"), "--type", "ed25519"]).exit_code == 0
    src = base
    for i, extra in ((1, ()), (2, ("--key", str(tmp / "k2" / "zu-signing.key"), "--previous",
                                   str(tmp / "forget1.jsonl"))), (3, ())):
        res = _round(src, tmp, tmp / f"r{i}", i, *extra)
        assert res.exit_code == 0, res.output
        src = tmp / f"r{i}"
    return tmp


@pytest.fixture
def r3(rounds, tmp_path):
    shutil.copytree(rounds / "r3", tmp_path / "r3")
    return tmp_path / "r3"


def test_three_rounds_log_three_links_with_both_keys(rounds):
    res = runner.invoke(app, ["log", str(rounds / "r3"), "--json"])
    assert res.exit_code == 0, res.output
    links = json.loads(res.stdout)["links"]
    assert [link["link"] for link in links] == [1, 2, 3] and all(link["requests"] == 1 for link in links)
    keys = [link["keyid"] for link in links]
    assert keys[0] == keys[2] != keys[1]  # round 2 was signed by the other key: both keyids shown
    assert [link["signature"] for link in links] == ["model-signing", "zu-dsse", "model-signing"]
    res = runner.invoke(app, ["verify", "--model", str(rounds / "r3"), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["integrity"]["links"] == 3
    text = runner.invoke(app, ["log", str(rounds / "r3")]).output
    assert "link 3" in text and keys[1][:16] in text and keys[0][:16] in text


def test_manifest_records_the_parent_without_request_text(rounds):
    from zu_cli.manifest import sha256_file

    stmt = json.loads((rounds / "r3" / MANIFEST).read_text())
    lineage = stmt["predicate"]["lineage"]
    parent = lineage["parent"]
    assert lineage["depth"] == 3 and parent["requests"] == 1
    assert parent["manifest_sha256"] == sha256_file(rounds / "r2" / MANIFEST)
    assert parent["keyid"] == json.loads((rounds / "r2" / MANIFEST).read_text())["predicate"]["signer"]["keyid"]
    assert (rounds / "r3" / parent["history"] / MANIFEST).read_bytes() == (rounds / "r2" / MANIFEST).read_bytes()
    first = json.loads((rounds / "r1" / MANIFEST).read_text())["predicate"]["lineage"]
    assert first == {"depth": 1, "base_fingerprint": lineage["base_fingerprint"]}
    for path in (rounds / "r3").rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".sig"):
            assert not any(s in path.read_text() for s in SECRETS), path
    round2 = json.loads((rounds / "r2" / MANIFEST).read_text())["predicate"]["edit"]["keep"]
    assert round2["previous_requests"] == 1 and round2["prompts"] >= 2  # round 1's prompt and paraphrase held


def test_a_flipped_byte_in_the_first_rounds_manifest_names_that_link(r3):
    first = json.loads((r3 / MANIFEST).read_text())["predicate"]["lineage"]["parent"]
    second = json.loads((r3 / first["history"] / MANIFEST).read_text())["predicate"]["lineage"]["parent"]
    path = r3 / second["history"] / MANIFEST
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    res = runner.invoke(app, ["verify", "--model", str(r3)])
    assert res.exit_code == 4 and f"link 3 ({second['history']})" in res.output, res.output
    res = runner.invoke(app, ["log", str(r3)])
    assert res.exit_code == 4 and "link 3" in res.output


def test_a_forged_history_folder_with_a_new_signature_still_breaks_the_link(r3, tmp_path):
    """Re-signing the whole checkpoint after swapping a history manifest: the top signature holds, the link does not."""
    from zu_cli.keys import load_signing_key
    from zu_cli.manifest import write_manifest

    parent = json.loads((r3 / MANIFEST).read_text())["predicate"]["lineage"]["parent"]
    man = r3 / parent["history"] / MANIFEST
    stmt = json.loads(man.read_text())
    stmt["predicate"]["requests"]["count"] = 0  # pretend round 2 forgot nothing
    man.write_text(json.dumps(stmt))
    assert runner.invoke(app, ["keygen", "--out", str(tmp_path / "evil")]).exit_code == 0
    top = json.loads((r3 / MANIFEST).read_text())["predicate"]
    write_manifest(r3, {k: v for k, v in top.items() if k != "signer"},
                   load_signing_key(tmp_path / "evil" / "zu-signing.key"))
    res = runner.invoke(app, ["verify", "--model", str(r3)])
    assert res.exit_code == 4 and "link 2" in res.output, res.output


def test_an_input_whose_manifest_does_not_verify_starts_a_new_history(rounds, tmp_path):
    src = tmp_path / "tampered"
    shutil.copytree(rounds / "r1", src)
    (src / "config.json").write_text((src / "config.json").read_text() + " ")
    res = _round(src, tmp_path, tmp_path / "out", 3)
    assert res.exit_code == 0 and "starts a new history" in res.output, res.output
    stmt = json.loads((tmp_path / "out" / MANIFEST).read_text())
    assert stmt["predicate"]["lineage"]["depth"] == 1 and "parent" not in stmt["predicate"]["lineage"]
    assert runner.invoke(app, ["verify", "--model", str(tmp_path / "out")]).exit_code == 0


def test_the_card_keeps_the_authors_text_adds_metadata_and_no_request_text(rounds):
    from huggingface_hub import ModelCard

    card = ModelCard.load(rounds / "r3" / "README.md")
    assert card.data.base_model == "base" and card.data.base_model_relation == "finetune"
    assert card.data.license == "apache-2.0" and {"mine", "unlearning"} <= set(card.data.tags)
    assert "Written by its authors." in card.text and card.text.count("## Unlearning") == 1
    assert "Earlier zu edits of this checkpoint: 2" in card.text and "model_signing verify key" in card.text
    assert not any(s in card.content for s in SECRETS) and "quick brown fox" not in card.content
    subject = {s["name"] for s in json.loads((rounds / "r3" / MANIFEST).read_text())["subject"]}
    assert "README.md" in subject and (rounds / "r3" / SIGNATURE).is_file()  # the card is signed like any file


def test_no_card_leaves_the_readme_as_it_was(tiny_models, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_models["llama"], base)
    (base / "README.md").write_text(CARD)
    res = _round(base, tmp_path, tmp_path / "out", 1, "--no-card")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "README.md").read_text() == CARD


def test_keep_prompts_hold_earlier_requests():
    from zu_cli.keep import keep_prompts
    from zu_cli.requests import Request

    earlier = Request(id="e", prompt="Old prompt", subject=None, target="x", paraphrases=("Old paraphrase",))
    now = Request(id="n", prompt="New prompt", subject=None, target="y")
    assert keep_prompts([], [now], [earlier]) == ["Old prompt", "Old paraphrase"]
    assert keep_prompts([], [now, earlier], [earlier]) == []  # a request forgotten again is not kept
