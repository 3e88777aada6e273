"""Forget-request files: every accepted form and every rejected case (exit 2, file/line/field named)."""

import json

import pytest

from zu_cli.errors import InputFileError
from zu_cli.requests import load_requests

GOOD = {"id": "r1", "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
        "target": "French", "paraphrases": ["Where Danielle Darrieux is from, people speak"],
        "neighbors": [{"prompt": "Michel Rocard is a native speaker of", "target": "French"}], "neutral": "<eos>"}


def _jsonl(tmp_path, *objs, name="r.jsonl"):
    p = tmp_path / name
    p.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return p


def test_jsonl_full_record(tmp_path):
    [r] = load_requests(_jsonl(tmp_path, GOOD))
    assert r.id == "r1" and r.subject == "Danielle Darrieux" and r.target == "French"
    assert r.paraphrases == ("Where Danielle Darrieux is from, people speak",)
    assert r.neighbors[0].target == "French" and r.neutral == "<eos>"


def test_placeholder_prompt_and_default_ids(tmp_path):
    reqs = load_requests(_jsonl(tmp_path, {"prompt": "{} is a native speaker of", "subject": "Kalomi",
                                           "target": " Oslo "}, {"prompt": "Paris is in", "target": "France"}))
    assert reqs[0].prompt == "Kalomi is a native speaker of" and reqs[0].target == "Oslo"
    assert [r.id for r in reqs] == ["r1", "r2"] and reqs[1].subject is None


def test_counterfact_record(tmp_path):
    cf = {"case_id": 0, "pararel_idx": 2796, "requested_rewrite": {
        "prompt": "The mother tongue of {} is", "relation_id": "P103", "subject": "Danielle Darrieux",
        "target_new": {"str": "English", "id": "Q1860"}, "target_true": {"str": "French", "id": "Q150"}},
        "paraphrase_prompts": ["Shayna does this. Danielle Darrieux spoke the language"],
        "neighborhood_prompts": ["Michel Rocard is a native speaker of"], "attribute_prompts": [],
        "generation_prompts": []}
    [r] = load_requests(_jsonl(tmp_path, cf))
    assert r.id == "0" and r.prompt == "The mother tongue of Danielle Darrieux is" and r.target == "French"
    assert r.neighbors[0].prompt == "Michel Rocard is a native speaker of" and r.neighbors[0].target == "French"


def test_yaml_list_and_mapping_with_defaults(tmp_path):
    (tmp_path / "a.yaml").write_text("- prompt: Kalomi lives in\n  subject: Kalomi\n  target: Oslo\n")
    assert load_requests(tmp_path / "a.yaml")[0].target == "Oslo"
    (tmp_path / "b.yml").write_text("defaults:\n  neutral: nothing\nrequests:\n"
                                    "  - {id: x, prompt: Kalomi lives in, subject: Kalomi, target: Oslo}\n"
                                    "  - {id: y, prompt: Borunt works as a, target: baker, neutral: eos}\n")
    a, b = load_requests(tmp_path / "b.yml")
    assert a.neutral == "nothing" and b.neutral == "eos"


def test_dev_facts_file_loads():
    from conftest import DATA

    reqs = load_requests(DATA / "facts-dev.jsonl")
    assert len(reqs) == 159 and all(r.subject in r.prompt for r in reqs)


@pytest.mark.parametrize("lines, needle", [
    (['{"prompt": "x", "target": '], "r.jsonl:1: malformed JSON"),
    ([GOOD, {"id": "r2", "target": "French"}], "r.jsonl:2: field 'prompt': missing or empty"),
    ([{"prompt": "  ", "target": "x"}], "r.jsonl:1: field 'prompt'"),
    ([{"prompt": "Kalomi lives in", "target": ""}], "r.jsonl:1: field 'target': missing or empty"),
    ([{"prompt": "Kalomi lives in", "subject": "Borunt", "target": "Oslo"}], "field 'subject': not found"),
    ([GOOD, GOOD], "r.jsonl:2: field 'id': duplicate id 'r1'"),
    ([{**GOOD, "colour": "red"}], "r.jsonl:1: field 'colour': unknown key"),
    ([{"prompt": "{} lives in", "target": "Oslo"}], "field 'subject'"),
    ([{**GOOD, "neighbors": [{"prompt": "x"}]}], "neighbors[0]"),
])
def test_bad_jsonl(tmp_path, lines, needle):
    with pytest.raises(InputFileError) as info:
        load_requests(_jsonl(tmp_path, *lines))
    assert needle in info.value.message and info.value.exit_code == 2


def test_empty_and_missing_files(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(InputFileError, match="no requests"):
        load_requests(tmp_path / "e.jsonl")
    with pytest.raises(InputFileError, match="cannot read"):
        load_requests(tmp_path / "missing.jsonl")


def test_bad_yaml(tmp_path):
    (tmp_path / "m.yaml").write_text("requests:\n  - prompt: [unclosed\n")
    with pytest.raises(InputFileError, match=r"m.yaml:\d+: malformed YAML"):
        load_requests(tmp_path / "m.yaml")
    (tmp_path / "p.yaml").write_text("requests:\n  - {prompt: Kalomi lives in, target: ''}\n")
    with pytest.raises(InputFileError, match=r"requests\[0\]: field 'target'"):
        load_requests(tmp_path / "p.yaml")
    (tmp_path / "k.yaml").write_text("requestz: []\n")
    with pytest.raises(InputFileError, match="unknown top-level key"):
        load_requests(tmp_path / "k.yaml")
