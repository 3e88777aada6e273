"""The prefix KV cache of the delta optimisation (prefix.py) gives what the full recomputation gives,
on a tiny model of every supported family (rotary and absolute positions, sliding windows, Gemma's
scaled embeddings and post-norms, parallel blocks, Conv1D)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import FAMILIES
from zu_cli.checkpoint import open_checkpoint
from zu_cli.loading import load_model
from zu_cli.config import Hyper
from zu_cli.console import silent
from zu_cli.delta import optimize_deltas
from zu_cli.edit import build_rows, kl_rows
from zu_cli.requests import Request
from zu_cli import prefix
from zu_cli.prefix import length_groups
from zu_cli.text import encode_target

REQS = [Request(id="a", prompt="The quick brown fox jumps", subject="brown fox", target="over"),
        Request(id="b", prompt="Paris is the capital of France", subject="capital", target="France"),
        Request(id="c", prompt="Kalomi lives in Oslo", subject=None, target="and")]


@pytest.mark.parametrize("family", FAMILIES)
def test_prefix_cache_matches_full_recomputation(tiny_models, family):
    ckpt = open_checkpoint(tiny_models[family])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    spec = ckpt.spec
    templates = ["{}", "Because of the dog. {}"]
    rows = build_rows(tok, REQS, templates, [encode_target(tok, r.target) for r in REQS])
    kl = kl_rows(tok, REQS)
    got = {}
    for cached in (False, True):
        hp = dataclasses.replace(Hyper(optim_dtype="float32"), prefix_cache=cached)
        for mods, start in (([spec.layer_module(2)], 2), ([spec.down_proj_module(1), spec.down_proj_module(2)], 1)):
            torch.manual_seed(0)
            got[cached, start] = optimize_deltas(model, tok, spec, rows, kl, mods, start, len(REQS), hp, 4, 1.1,
                                                 silent(), "t")
    for start in (2, 1):
        (d0, b0, p0), (d1, b1, p1) = got[False, start], got[True, start]
        assert torch.allclose(b0, b1, rtol=1e-4, atol=1e-5), (family, (b0 - b1).abs().max())
        assert torch.allclose(p0, p1, rtol=1e-3, atol=1e-6), (family, p0, p1)
        assert torch.allclose(d0, d1, rtol=1e-3, atol=1e-4 * float(d0.abs().max())), (family, (d0 - d1).abs().max())
        assert float(d0.abs().max()) > 0  # the optimisation moved


def test_length_groups_pad_less_and_cover_every_row_once():
    lengths = [2] * 24 + [3] * 10 + [6] * 24 + [9] * 6 + [13] * 6  # SmolLM2's ten dev facts, suffix lengths
    padded = lambda groups: sum(len(g) * max(lengths[i] for i in g) for g in groups)
    for cost in (0, 32, 10**6):
        groups = length_groups(lengths, cost)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(max(lengths[i] for i in a) < min(lengths[i] for i in b) for a, b in zip(groups, groups[1:]))
        assert padded(groups) + cost * len(groups) <= padded([list(range(len(lengths)))]) + cost
    assert len(length_groups(lengths, 0)) == 5 and padded(length_groups(lengths, 0)) == sum(lengths)
    assert length_groups(lengths, 10**6) == [list(range(len(lengths)))]
    assert padded(length_groups(lengths, 32)) < 0.5 * len(lengths) * 13
    assert length_groups([], 32) == []


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_row_groups_do_not_change_the_deltas(tiny_models, family, monkeypatch):
    """One group per distinct row length gives what one padded batch gives."""
    ckpt = open_checkpoint(tiny_models[family])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    spec = ckpt.spec
    rows = build_rows(tok, REQS, ["{}", "Because of the dog. {}"], [encode_target(tok, r.target) for r in REQS])
    got = []
    for cost in (0, 10**6):
        monkeypatch.setitem(prefix.PASS_COST_TOKENS, "cpu", cost)
        parts = prefix.RowGroups(model, rows.seqs, rows.lookup, tok.pad_token_id, torch.device("cpu")).parts
        torch.manual_seed(0)
        got.append((len(parts), optimize_deltas(model, tok, spec, rows, kl_rows(tok, REQS), [spec.layer_module(2)], 2,
                                                len(REQS), Hyper(optim_dtype="float32"), 4, 1.1, silent(), "t")))
    (n_many, (d0, b0, p0)), (n_one, (d1, b1, p1)) = got
    assert n_many > 1 and n_one == 1
    assert torch.allclose(b0, b1, rtol=1e-4, atol=1e-5)
    assert torch.allclose(p0, p1, rtol=1e-3, atol=1e-6)
    assert torch.allclose(d0, d1, rtol=1e-3, atol=1e-4 * float(d0.abs().max())) and float(d0.abs().max()) > 0
