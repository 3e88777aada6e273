"""The diagnosis benches' helpers (issue 26): the invented-subject control and the part swap."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

from priors import invented, probes_of  # noqa: E402
from quant_parts import part_of  # noqa: E402
from relearn_parts import mixed  # noqa: E402


def test_invented_subject_replaces_the_last_word_only():
    assert invented("Aleksandr Ptushko", "The mother tongue of Aleksandr Ptushko is") == \
        "The mother tongue of Aleksandr Zorbin is"
    assert invented("Paracelsus", "Paracelsus works in the area of") == "Zorbin works in the area of"
    assert invented("Paracelsus", "Michio Kaku works in the area of") is None  # a neighbour: not asked
    assert invented("Edward Teller", "Teller worked on") is None  # the text must hold the whole subject
    assert invented(None, "anything") is None
    assert invented("Edward Teller", "Edward Teller's field is", "Mertz") == "Edward Mertz's field is"
    kinds = probes_of([{"subject": "A B", "prompt": "A B is", "target": "x", "paraphrases": ["So A B is"],
                        "neighbors": [{"prompt": "C is", "target": "y"}]}])
    assert {k: len(v) for k, v in kinds.items()} == {"prompt": 1, "paraphrase": 1, "neighbour": 1}


def test_mixed_takes_one_part_from_the_tuned_copy_and_restores_it(tiny_models):
    from transformers import AutoModelForCausalLM

    from zu_cli.arch import lookup

    edited = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    tuned = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], dtype=torch.float32)
    with torch.no_grad():
        for p in tuned.parameters():
            p.add_(1.0)
    before = {n: p.clone() for n, p in edited.named_parameters()}
    spec = lookup(edited.config)
    with mixed(edited, tuned, part_of(spec, [1], "above")):
        moved = {n for n, p in edited.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all(n.startswith(f"{spec.layers}.") and int(n.split(".")[2]) > 1 for n in moved)
    assert len(moved) == sum(1 for n, _ in edited.named_parameters()
                             if n.startswith(f"{spec.layers}.") and int(n.split(".")[2]) > 1)
    assert all(torch.equal(p, before[n]) for n, p in edited.named_parameters())
