"""``z_quant``: each neutral target is optimised on the model and on quantised copies of it at once,
so that it still reaches EOS where the copy's rounding moves what the layers compute (issue 26)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch

from zu_cli.checkpoint import open_checkpoint
from zu_cli.config import Hyper, load_config
from zu_cli.console import silent
from zu_cli.delta import optimize_deltas
from zu_cli.demo import FACT_EDIT, Fact
from zu_cli.edit import build_rows, kl_rows, plan
from zu_cli.errors import InputFileError
from zu_cli.loading import load_model
from zu_cli.quantise import Quantised
from zu_cli.requests import Request
from zu_cli.text import neutral_ids

STOP = 0.5  # low, so the plain optimisation stops just past it on the model and a copy can fall short


class Perturbed:
    """A stand-in for a quantised copy: the linear weights of layers 2 and up, each entry scaled by
    1 + sigma * N(0, 1) (coarser than any 4-bit format on this model, whose targets survive those)."""

    def __init__(self, model, sigma: float):
        g = torch.Generator().manual_seed(1)
        self.modules = [m for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear) and ".layers." in n and int(n.split(".layers.")[1][0]) >= 2]
        self.weights = [m.weight.data * (1 + sigma * torch.randn(m.weight.shape, generator=g)) for m in self.modules]

    @contextlib.contextmanager
    def swapped(self):
        saved = [m.weight.data for m in self.modules]
        for m, w in zip(self.modules, self.weights):
            m.weight.data = w
        try:
            yield
        finally:
            for m, w in zip(self.modules, saved):
                m.weight.data = w


@pytest.fixture(scope="module")
def fact_setup(fact_model_dir):
    facts = [Fact(**f) for f in json.loads((fact_model_dir / "facts.json").read_text())][:3]
    reqs = [Request(id=f"f{i}", prompt=f.prompt(), subject=None, target=f.answer) for i, f in enumerate(facts)]
    ckpt = open_checkpoint(fact_model_dir)
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    rows = build_rows(tok, reqs, ["{}"], neutral_ids(tok, reqs, "eos"))
    return model, tok, ckpt.spec, reqs, rows


def _optimise(setup, copies=()):
    model, tok, spec, reqs, rows = setup
    torch.manual_seed(0)
    return optimize_deltas(model, tok, spec, rows, kl_rows(tok, reqs), [spec.layer_module(1)], 1, len(reqs),
                           Hyper(**FACT_EDIT), 40, STOP, silent(), "t", quantised=copies)


def _eos_prob(setup, delta: torch.Tensor, copy=None) -> torch.Tensor:
    """EOS probability of each (bare) prompt with its delta added at layer 1's output, run on its own."""
    model, _, spec, _, rows = setup
    probs = []
    for r, (seq, look) in enumerate(zip(rows.seqs, rows.lookup)):
        def add(_m, _i, out, r=r, look=look):
            h = (out[0] if isinstance(out, tuple) else out).clone()
            h[0, look] += delta[rows.owner[r], 0]
            return (h, *out[1:]) if isinstance(out, tuple) else h

        hook = model.get_submodule(spec.layer_module(1)).register_forward_hook(add)
        try:
            with copy.swapped() if copy else contextlib.nullcontext(), torch.no_grad():
                p = model(torch.tensor([seq])).logits[0, -1].softmax(-1)[rows.targets[r][0]]
        finally:
            hook.remove()
        probs.append(float(p))
    return torch.tensor(probs)


def test_targets_reach_eos_on_the_copy_too(fact_setup):
    """Optimised on the model alone, one target stops short of EOS on the perturbed copy; optimised
    on both, every target passes the stop on each, and what is reported is the lower of the two."""
    copy = Perturbed(fact_setup[0], 0.6)
    plain, _, _ = _optimise(fact_setup)
    assert float(_eos_prob(fact_setup, plain).min()) >= STOP
    assert float(_eos_prob(fact_setup, plain, copy).min()) < STOP  # the copy matters here
    aware, _, reported = _optimise(fact_setup, [copy])
    on_model, on_copy = _eos_prob(fact_setup, aware), _eos_prob(fact_setup, aware, copy)
    assert float(on_model.min()) >= STOP and float(on_copy.min()) >= STOP, (on_model, on_copy)
    torch.testing.assert_close(reported, torch.minimum(on_model, on_copy), rtol=1e-4, atol=1e-4)


def test_a_real_quantised_copy_is_run_with_its_own_weights(fact_setup):
    """With a Q4_0 copy the reported probability is the lower of the model's and the Q4_0 copy's,
    both measured independently, and the model's own weights are back afterwards."""
    model = fact_setup[0]
    before = [p.detach().clone() for p in model.parameters()]
    q4 = Quantised(model, "Q4_0")
    delta, _, reported = _optimise(fact_setup, [q4])
    torch.testing.assert_close(reported, torch.minimum(_eos_prob(fact_setup, delta), _eos_prob(fact_setup, delta, q4)),
                               rtol=1e-4, atol=1e-4)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the copy's weights swapped back


def test_z_quant_is_validated_and_sizes_the_batches(fact_setup, tmp_path):
    """An unknown format is refused naming the field; each copy's pass counts in the activation budget."""
    model, tok, spec, reqs, _ = fact_setup
    assert load_config(None, z_quant="bnb-fp4,Q4_0").z_quant == "bnb-fp4,Q4_0"
    cfg = tmp_path / "c.yaml"
    cfg.write_text('z_quant: "Q4_K"\n')
    with pytest.raises(InputFileError, match=r"c\.yaml: field 'z_quant' .*'Q4_K'"):
        load_config(cfg)
    neutral = neutral_ids(tok, reqs, "eos")
    batches = lambda budget, fmt="": plan(model, tok, spec, reqs, [1], ["{}"], neutral,
                                          Hyper(**FACT_EDIT, activation_budget=budget, z_quant=fmt), "output")
    budget = next(b for b in (1e-5 * 1.25 ** i for i in range(80)) if len(batches(b)) == 1)  # all three just fit
    assert len(batches(budget, "Q4_0")) > 1
    assert len(batches(4 * budget, "Q4_0")) == 1
