"""``quant_keys``: forget keys taken on GGUF round trips of the weights below the edit join the solve,
so that the edit still reaches its targets on a quantised copy of the edited checkpoint (issue 26)."""

from __future__ import annotations

import pytest
import torch

import zu_cli.hooks as hooks
from zu_cli.checkpoint import open_checkpoint
from zu_cli.config import Hyper, load_config
from zu_cli.console import silent
from zu_cli.edit import build_rows, outputs_at
from zu_cli.errors import InputFileError
from zu_cli.loading import load_model
from zu_cli.quantise import Quantised, roundtrip
from zu_cli.requests import Request
from zu_cli.update import applied, edit_layers, multi_solver, quantised_below

REQUESTS = [("The mother tongue of Danielle Darrieux is", "Danielle Darrieux", "French"),
            ("Kalomi lives in", "Kalomi", "Oslo"),
            ("The quick brown fox jumps over the lazy", "brown fox", "dog")]
TEMPLATES = ["{}", "Once upon a time. {}"]
LAYERS = [1, 2]


def _setup(tiny_models, family="llama"):
    ckpt = open_checkpoint(tiny_models[family])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    reqs = [Request(id=str(i), prompt=p, subject=s, target=t) for i, (p, s, t) in enumerate(REQUESTS)]
    weights = {}
    for l in LAYERS:  # (d, f), output = W @ key
        w = hooks.get_module(model, ckpt.spec.down_proj_module(l)).weight.detach().float()
        weights[l] = w.T.contiguous() if ckpt.spec.transposed else w
    return model, tok, ckpt.spec, reqs, weights


def _edit(model, tok, spec, reqs, weights, z, solver, quant_keys: str, layers=LAYERS, templates=TEMPLATES):
    sens = {l: torch.zeros(len(reqs), z.shape[1]) for l in layers}
    hp = Hyper(rounding="nearest", quant_keys=quant_keys)
    return edit_layers(model, tok, spec, reqs, layers, weights, {l: None for l in layers}, z, sens, templates, hp,
                       solver, silent())


# torch Linear and GPT-2's Conv1D (weight (in, out)); a GGUF format and bitsandbytes' 4- and 8-bit
@pytest.mark.parametrize("family,fmt", [("llama", "Q4_0"), ("gpt2", "Q4_0"), ("llama", "bnb-nf4"), ("gpt2", "bnb-int8")])
def test_the_solver_gets_the_quantised_copys_keys_with_the_same_residual(tiny_models, family, fmt):
    model, tok, spec, reqs, weights = _setup(tiny_models, family)
    z = torch.randn(len(reqs), weights[1].shape[0], generator=torch.Generator().manual_seed(0))
    seen = []

    def scale(layer, w, k, t, m):
        seen.append((k, t, w))
        return w * 1.5, {}

    _edit(model, tok, spec, reqs, weights, z, scale, fmt)
    n = len(reqs)
    k, t, w = seen[0]  # layer 1: nothing edited below it yet
    assert k.shape[0] == t.shape[1] == 2 * n
    rows = build_rows(tok, reqs, TEMPLATES)
    mod = spec.down_proj_module(1)
    with quantised_below(model, spec, LAYERS[-1], fmt)[0].swapped():
        kq = outputs_at(model, tok, rows, [mod], n, inputs=True)[mod]
    kfp = outputs_at(model, tok, rows, [mod], n, inputs=True)[mod]
    torch.testing.assert_close(k[:n], kfp)
    torch.testing.assert_close(k[n:], kq)
    assert (k[n:] - k[:n]).norm() > 1e-3 * k[:n].norm()  # the round trip moved the keys
    # the quantised keys are asked for the residual the full-precision keys are asked for
    torch.testing.assert_close(t[:, n:] - w @ k[n:].T, t[:, :n] - w @ k[:n].T)
    # layer 2's quantised keys run through layer 1's edit, itself round-tripped
    k2 = seen[1][0]
    mod2 = spec.down_proj_module(2)
    edited = {1: roundtrip(weights[1].double() * 1.5, fmt).float()}
    with quantised_below(model, spec, LAYERS[-1], fmt)[0].swapped(), applied(model, spec, edited, {1: None}):
        kq2 = outputs_at(model, tok, rows, [mod2], n, inputs=True)[mod2]
    torch.testing.assert_close(k2[n:], kq2, rtol=1e-4, atol=1e-5)


def _miss_on_quantised(model, tok, spec, reqs, updates, shift) -> float:
    """How far the edit's shift of the edited layer's output (bare prompts) on the Q4_0 copy of the
    model is from the shift it was solved for (the quantised copy's own output, unedited, is the
    reference: quantisation moves the residual stream by itself, which no edit undoes)."""
    last = spec.layer_module(updates[-1].layer)
    rows = build_rows(tok, reqs, ["{}"])
    edited = {u.layer: roundtrip(u.new, "Q4_0") for u in updates}
    with Quantised(model, "Q4_0").swapped():
        before = outputs_at(model, tok, rows, [last], len(reqs))[last]
        with applied(model, spec, edited, {l: None for l in edited}):
            after = outputs_at(model, tok, rows, [last], len(reqs))[last]
    return float(((after - before).float() - shift).norm() / shift.norm())


def test_an_edit_solved_with_quantised_keys_holds_better_on_the_quantised_model(tiny_models):
    # One edited layer, so that its output's shift is its down-projection's alone, and keys of the
    # bare prompts, the ones probed; the two layers below are what quantising moves its keys with.
    model, tok, spec, reqs, weights = _setup(tiny_models)
    last = spec.layer_module(2)
    h = outputs_at(model, tok, build_rows(tok, reqs, ["{}"]), [last], len(reqs))[last].float()
    z = h + 0.5 * h.norm(dim=-1, keepdim=True) * torch.nn.functional.normalize(
        torch.randn(h.shape, generator=torch.Generator().manual_seed(1)), dim=-1)
    f = weights[2].shape[1]
    # A full null space and a small norm weight: the solve meets every key it is given.
    solver = multi_solver({2: torch.eye(f, dtype=torch.float64) * 1e-4},
                          Hyper(solver="exact", multi_sensitive_weight=0.0, multi_norm_weight=1e-6))
    plain = _edit(model, tok, spec, reqs, weights, z, solver, "", [2], ["{}"])
    robust = _edit(model, tok, spec, reqs, weights, z, solver, "Q4_0", [2], ["{}"])
    miss_plain = _miss_on_quantised(model, tok, spec, reqs, plain, z - h)
    miss_robust = _miss_on_quantised(model, tok, spec, reqs, robust, z - h)
    assert miss_robust < 0.5 * miss_plain, (miss_robust, miss_plain)


def test_quant_keys_accepts_known_formats_only(tmp_path):
    assert load_config(None, quant_keys="Q4_0,Q8_0,bnb-nf4").quant_keys == "Q4_0,Q8_0,bnb-nf4"
    cfg = tmp_path / "c.yaml"
    cfg.write_text('quant_keys: "Q4_0,Q4_K"\n')
    with pytest.raises(InputFileError, match=r"c\.yaml: field 'quant_keys' .*'Q4_K'") as exc:
        load_config(cfg)
    assert exc.value.exit_code == 2


def test_a_model_with_nothing_to_quantise_is_refused():
    # Rows of 48 and 80 are not whole 32-wide GGUF blocks: a writer keeps such weights unquantised, so the
    # quantised copy would be the model itself and its keys the same keys.
    from transformers import LlamaConfig, LlamaForCausalLM

    from zu_cli.arch import lookup
    from zu_cli.errors import UsageError

    cfg = LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    with pytest.raises(UsageError, match="no weight in layers 0-1 can be quantised to Q4_0") as exc:
        quantised_below(model, lookup(cfg), 1, "Q4_0")
    assert exc.value.exit_code == 2
