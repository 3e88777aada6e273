"""``update.edit_layers`` replays the layers below the one edited last (``hooks.LayerReplay``):
the keys and targets every layer's solve sees are those of passes run from the embeddings."""

from __future__ import annotations

import pytest
import torch

import zu_cli.hooks as hooks
from conftest import FAMILIES
from zu_cli.checkpoint import open_checkpoint
from zu_cli.config import Hyper
from zu_cli.console import silent
from zu_cli.loading import load_model
from zu_cli.requests import Request
from zu_cli.update import edit_layers

REQUESTS = [("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "French"),
            ("Kalomi lives in", "Kalomi", "Oslo"),
            ("The quick brown fox jumps over the lazy", "brown fox", "dog")]


def _solves(model, tok, spec, replay: bool) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(k, t) each layer's solver received; the solver scales W so later layers see a real edit."""
    reqs = [Request(id=str(i), prompt=p, subject=s, target=t) for i, (p, s, t) in enumerate(REQUESTS)]
    layers = [1, 2]
    weights = {}
    for l in layers:  # (d, f) float32, output = W @ key
        mod = hooks.get_module(model, spec.down_proj_module(l))
        w = mod.weight.detach().float()
        weights[l] = w.T.contiguous() if spec.transposed else w
    d = weights[1].shape[0]
    z = torch.randn(len(reqs), d, generator=torch.Generator().manual_seed(0))
    sens = {l: torch.zeros(len(reqs), d) for l in layers}
    seen = []

    def scale(layer, w, k, t, m):
        seen.append((k, t))
        return w * 1.5, {}

    edit_layers(model, tok, spec, reqs, layers, weights, {l: None for l in layers}, z, sens,
                ["{}", "Once upon a time. {}"], Hyper(rounding="nearest"), scale, silent(), replay=replay)
    return seen


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_passes_give_the_keys_and_targets_of_full_passes(tiny_models, family, monkeypatch):
    ckpt = open_checkpoint(tiny_models[family])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    full = _solves(model, tok, ckpt.spec, replay=False)
    replays = []
    real = hooks.replay_below
    monkeypatch.setattr(hooks, "replay_below", lambda *a: replays.append(a[2]) or real(*a))
    fast = _solves(model, tok, ckpt.spec, replay=True)
    assert len(full) == len(fast) == 2
    for (k0, t0), (k1, t1) in zip(full, fast):
        torch.testing.assert_close(k1, k0, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(full[1][0], _solves_unedited_keys(model, tok, ckpt.spec))  # layer 1's edit moved them
    if hooks.layers_return_tensors(model, ckpt.spec.layers, torch.device("cpu")):
        assert replays and set(replays) == {1}  # the second layer's passes started at layer 1
    assert family != "llama" or replays  # replay is in use on the common architectures


def _solves_unedited_keys(model, tok, spec) -> torch.Tensor:
    """Layer 2's keys without layer 1's edit, to show the edit changes what layer 2 sees."""
    from zu_cli.edit import build_rows, outputs_at

    reqs = [Request(id=str(i), prompt=p, subject=s, target=t) for i, (p, s, t) in enumerate(REQUESTS)]
    rows = build_rows(tok, reqs, ["{}", "Once upon a time. {}"])
    mod = spec.down_proj_module(2)
    return outputs_at(model, tok, rows, [mod], len(reqs), inputs=True)[mod]


@pytest.mark.parametrize("family", FAMILIES)
def test_rows_cut_at_the_lookup_token_read_what_the_whole_row_reads(tiny_models, family):
    """``edit.outputs_at`` runs each row only up to its lookup token: on every family the key and
    the output read there equal those of a pass over the whole row (the words after the subject
    cannot change them in a causal model), and the cut is real (the rows are longer)."""
    from zu_cli.edit import build_rows, outputs_at
    from zu_cli.text import as_tokens, left_pad

    ckpt = open_checkpoint(tiny_models[family])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    reqs = [Request(id=str(i), prompt=p, subject=s, target=t) for i, (p, s, t) in enumerate(REQUESTS)]
    rows = build_rows(tok, reqs, ["{}", "Once upon a time. {}"])
    assert any(at < len(s) - 1 for s, at in zip(rows.seqs, rows.lookup))
    mod = ckpt.spec.down_proj_module(1)
    cut = {inputs: outputs_at(model, tok, rows, [mod], len(reqs), inputs=inputs)[mod] for inputs in (True, False)}
    for inputs in (True, False):
        picked = []
        for seq, at in zip(rows.seqs, rows.lookup):  # one whole row per pass, no padding
            batch = left_pad([seq], tok.pad_token_id, torch.device("cpu"))
            with hooks.TraceDict(model, [mod], retain_input=inputs, retain_output=not inputs) as td:
                model(**batch.kwargs())
            x = td[mod].input if inputs else td[mod].output
            picked.append(as_tokens(x, 1, len(seq))[0, at].double())
        whole = torch.stack(picked).view(len(reqs), 2, -1).mean(1)  # rows are request-major
        torch.testing.assert_close(cut[inputs], whole, rtol=1e-4, atol=1e-5)
