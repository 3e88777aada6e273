"""Trace / TraceDict: capture, edit, stop, and the hooks are always removed."""

import pytest
import torch

from zu_cli.hooks import Trace, TraceDict


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))


def test_trace_captures_and_removes():
    m, x = _model(), torch.randn(2, 4)
    with Trace(m, "0", retain_input=True) as t:
        y = m(x)
    assert torch.equal(t.input, x) and t.output.shape == (2, 8)
    assert not m[0]._forward_hooks
    assert torch.equal(m(x), y)


def test_edit_output_and_stop():
    m, x = _model(), torch.randn(2, 4)
    with Trace(m, "2", edit_output=lambda out, name, inp: out * 0) as t:
        assert torch.count_nonzero(m(x)) == 0
    with TraceDict(m, ["0", "1"], stop=True) as td:
        m(x)  # StopForward after module "1" is swallowed by the context manager
    assert td["1"].output.shape == (2, 8) and td["0"].output is not None
    assert all(not mod._forward_hooks for mod in m)


def test_hooks_removed_on_error():
    m = _model()
    with pytest.raises(RuntimeError):
        with TraceDict(m, ["0", "2"]):
            m(torch.randn(2, 5))  # wrong width
    assert all(not mod._forward_hooks for mod in m)


def test_contiguous_head_feeds_the_head_a_dense_input_without_changing_logits(tiny_models):
    """load_model installs it: a logits_to_keep slice reaches the head contiguous, logits unchanged."""
    from zu_cli.checkpoint import open_checkpoint
    from zu_cli.loading import load_model

    model, _ = load_model(open_checkpoint(tiny_models["llama"]), device_map="cpu", dtype="float32")
    head, seen = model.get_output_embeddings(), []
    ids = torch.randint(0, 50, (3, 9))
    with Trace(model, "lm_head", retain_input=True) as t:
        out = model(input_ids=ids, logits_to_keep=4).logits
    seen.append(t.input.is_contiguous())
    assert seen == [True]
    # the same projection computed without any hook: identical values
    with torch.no_grad():
        h = model.model(input_ids=ids).last_hidden_state[:, -4:]
        assert not h.is_contiguous()
        ref = torch.nn.functional.linear(h, head.weight, head.bias)
    assert torch.allclose(out, ref, atol=1e-6)
