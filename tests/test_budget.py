"""Memory bounds of the targets stage: request batches by budget, and batching leaves results alone."""

from __future__ import annotations

import pytest
import torch

from zu_cli.budget import bytes_per_token, casts_by_reference, model_bytes, optim_autocast, plan_batches
from zu_cli.checkpoint import open_checkpoint
from zu_cli.loading import load_model
from zu_cli.config import Hyper, load_config
from zu_cli.console import silent
from zu_cli.edit import context_templates, edit_targets, plan
from zu_cli.errors import InputFileError
from zu_cli.requests import Request
from zu_cli.text import neutral_ids


def test_batches_fit_the_budget_cover_every_request_in_order():
    sizes = [(7, 20), (7, 30), (7, 10), (14, 25), (7, 12)]
    per_token = 1000
    budget = 7 * 30 * 2 * per_token  # two requests of the longest kind
    got = plan_batches(sizes, per_token, budget)
    assert [i for s in got for i in range(s.start, s.stop)] == list(range(len(sizes)))
    for s in got:
        rows = sum(sizes[i][0] for i in range(s.start, s.stop))
        longest = max(sizes[i][1] for i in range(s.start, s.stop))
        assert s.stop - s.start == 1 or rows * longest * per_token <= budget  # padded to the longest row
    assert len(got) > 1 and any(s.stop - s.start > 1 for s in got)
    assert plan_batches(sizes, per_token, 1) == [slice(i, i + 1) for i in range(5)]  # too big: alone
    assert plan_batches(sizes, per_token, 10**12) == [slice(0, 5)]
    assert plan_batches(sizes, per_token, 1, fixed=2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert plan_batches([], per_token, budget) == []


@pytest.fixture(scope="module")
def llama(tiny_models):
    ckpt = open_checkpoint(tiny_models["llama"])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    reqs = [Request(id=str(i), prompt=p, target=t, subject=s) for i, (p, s, t) in enumerate([
        ("The quick brown fox jumps over", "brown fox", "dogs"), ("Paris is the capital of", "Paris", "France"),
        ("My phone number is", None, "555"), ("The river Thames flows through", "Thames", "London")])]
    return ckpt, model, tok, reqs


def test_auto_batches_follow_the_activation_budget(llama):
    ckpt, model, tok, reqs = llama
    layers = [1, 2]
    tpl = context_templates(model, tok, Hyper(n_prefixes=2, prefix_len=4))
    neutral = neutral_ids(tok, reqs, "eos")
    plans = {b: plan(model, tok, ckpt.spec, reqs, layers, tpl, neutral, Hyper(activation_budget=b), "pushed")
             for b in (1e-9, 1e9)}
    assert plans[1e-9] == [slice(i, i + 1) for i in range(4)] and plans[1e9] == [slice(0, 4)]
    assert plan(model, tok, ckpt.spec, reqs, layers, tpl, neutral, Hyper(batch_requests=3), "pushed") == \
        [slice(0, 3), slice(3, 4)]
    assert model_bytes(model) == sum(p.numel() * 4 for p in model.parameters())
    # More layers to back-propagate through, or float32 activations, keep more per token.
    down = ckpt.spec.down_proj_module(0)
    assert bytes_per_token(model, down, 2, "bfloat16") * 2 == bytes_per_token(model, down, 4, "bfloat16") \
        == bytes_per_token(model, down, 2, "float32")


def test_batching_does_not_change_the_targets(llama):
    ckpt, model, tok, reqs = llama
    layers = [1, 2]
    tpl = context_templates(model, tok, Hyper(n_prefixes=2, prefix_len=4))
    neutral = neutral_ids(tok, reqs, "eos")
    res = {}
    for b in (1, 4):
        hp = Hyper(batch_requests=b, optim_dtype="float32", z_steps=5, sens_steps=5)
        res[b] = edit_targets(model, tok, ckpt.spec, reqs, layers, tpl, neutral, hp, "pushed", silent())
    z1, p1, s1 = res[1]
    z4, p4, s4 = res[4]
    assert not torch.equal(z1, torch.zeros_like(z1))
    torch.testing.assert_close(z1, z4, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(p1, p4, rtol=1e-3, atol=1e-5)
    for l in layers:
        torch.testing.assert_close(s1[l], s4[l], rtol=1e-3, atol=1e-4)


def test_an_unmoved_target_asks_for_no_change(llama):
    """z is the bare prompt's own state plus the delta, the state ``edit_layers`` measures the residual
    z - h on: with no optimisation step the residual is zero and every layer's target is W k as it
    is (a template-averaged base once put the bare prompt's offset from the average into every target)."""
    from zu_cli.update import edit_layers

    ckpt, model, tok, reqs = llama
    layers = [1, 2]
    tpl = context_templates(model, tok, Hyper(n_prefixes=2, prefix_len=4))
    hp = Hyper(z_steps=0, optim_dtype="float32")
    z, _, sens = edit_targets(model, tok, ckpt.spec, reqs, layers, tpl, neutral_ids(tok, reqs, "eos"), hp,
                              "output", silent())
    weights = {l: ckpt.read_tensor(ckpt.spec.down_proj_weight(l)).float() for l in layers}
    weights = {l: (w.T if ckpt.spec.transposed else w) for l, w in weights.items()}
    seen = []

    def keep(layer, w, k, t, m):  # a solver that records its targets and changes nothing
        seen.append((w @ k.T, t))
        return w, {}

    edit_layers(model, tok, ckpt.spec, reqs, layers, weights, {l: None for l in layers}, z, sens, tpl, hp, keep,
                silent())
    assert len(seen) == 2
    for wk, t in seen:
        torch.testing.assert_close(t, wk, rtol=0, atol=1e-4 * float(wk.abs().max()))


def test_weight_casts_are_kept_by_reference_with_identical_gradients(llama):
    """Under bfloat16 autocast the backward pass needs each weight's cast copy; kept as a reference
    to the parameter and cast again, the gradient is bit for bit the same and no weight copy is held."""
    _, model, tok, _ = llama
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog")["input_ids"]] * 3)
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    shapes |= {s[::-1] for s in shapes}
    grads, kept = {}, {}
    for by_ref in (False, True):
        hooks = casts_by_reference(model, torch.bfloat16)
        pack = hooks.pack_hook if by_ref else (lambda t: t)
        unpack = hooks.unpack_hook if by_ref else (lambda t: t)
        held = []

        def counted(t, pack=pack, held=held):  # what autograd keeps, after the pack hook
            x = pack(t)
            held.append(tuple(x.shape) if isinstance(x, torch.Tensor) else "reference")
            return x

        emb = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(counted, unpack):
            loss = model(inputs_embeds=emb).logits.float().logsumexp(-1).sum()
        loss.backward()
        grads[by_ref], kept[by_ref] = emb.grad, held
    assert torch.equal(grads[False], grads[True]) and grads[True].abs().sum() > 0
    n_linear = sum(s in shapes for s in kept[False])
    assert n_linear >= len(model.model.layers) * 7  # q, k, v, o, gate, up, down: each weight's copy is kept
    assert kept[True].count("reference") == n_linear and not any(s in shapes for s in kept[True])
    # optim_autocast puts the two together when given the model, and is plain autocast without it.
    assert isinstance(optim_autocast(torch.device("cpu"), "bfloat16"), torch.autocast)
    assert not isinstance(optim_autocast(torch.device("cpu"), "bfloat16", model), torch.autocast)


def test_targets_of_an_offloaded_model_under_autocast_match(llama, tmp_path):
    """Offloaded weights are meta placeholders until a hook brings them in: their casts are kept
    as they are, and the targets are those of the model held in memory."""
    ckpt, model, tok, reqs = llama
    off, _ = load_model(ckpt, device_map="auto", max_memory="cpu=120KB", offload_dir=str(tmp_path / "off"),
                        dtype="float32")
    assert "disk" in set(off.hf_device_map.values())
    tpl = context_templates(model, tok, Hyper(n_prefixes=2, prefix_len=4))
    hp = Hyper(optim_dtype="bfloat16", z_steps=4)
    got = [edit_targets(m, tok, ckpt.spec, reqs[:2], [1, 2], tpl, neutral_ids(tok, reqs[:2], "eos"), hp, "output",
                        silent()) for m in (model, off)]
    assert got[0][0].abs().sum() > 0
    torch.testing.assert_close(got[0][0], got[1][0], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("key,val", [("batch_requests", -1), ("activation_budget", 0.0)])
def test_budget_settings_out_of_range_are_refused(tmp_path, key, val):
    cfg = tmp_path / "zu.yaml"
    cfg.write_text(f"{key}: {val}\n")
    with pytest.raises(InputFileError, match=key):
        load_config(cfg)


@pytest.mark.parametrize("native, onednn, want", [(True, True, "bfloat16"), (False, True, "float32"),
                                                   (True, False, "float32"), (False, False, "float32")])
def test_auto_takes_bfloat16_only_where_the_cpu_computes_it_natively(monkeypatch, native, onednn, want):
    """oneDNN says yes on AVX-512 CPUs that emulate bfloat16 (5x slower): auto must not take it there."""
    import torch

    from zu_cli.budget import optim_dtype

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    assert optim_dtype(torch.device("cpu"), "auto") == want
    assert optim_dtype(torch.device("cpu"), "bfloat16") == "bfloat16"  # asked for: given


def test_batches_are_sized_by_the_tokens_a_step_runs(llama):
    """With the prefix cached a step runs each row from its lookup token on, so more requests fit a budget."""
    ckpt, model, tok, reqs = llama
    tpl = context_templates(model, tok, Hyper(n_prefixes=2, prefix_len=4))
    neutral = neutral_ids(tok, reqs, "eos")
    counts = {}
    for cached in (True, False):
        for budget in [10 ** (k / 4) for k in range(-16, 9)]:
            hp = Hyper(activation_budget=budget, prefix_cache=cached)
            counts[cached, budget] = len(plan(model, tok, ckpt.spec, reqs, [1, 2], tpl, neutral, hp, "output"))
    budgets = {b for _, b in counts}
    assert all(counts[True, b] <= counts[False, b] for b in budgets)
    assert any(counts[True, b] < counts[False, b] for b in budgets), counts
