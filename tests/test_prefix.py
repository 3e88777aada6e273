"""The prefix KV cache of the delta optimisation (prefix.py) gives what the full recomputation gives,
on a tiny model of every supported family (rotary and absolute positions, sliding windows, Gemma's
scaled embeddings and post-norms, parallel blocks, Conv1D)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from conftest import FAMILIES
from zu_cli.checkpoint import load_model, open_checkpoint
from zu_cli.config import Hyper
from zu_cli.console import silent
from zu_cli.edit import build_rows, kl_rows, optimize_deltas
from zu_cli.requests import Request
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
