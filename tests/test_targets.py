"""The neutral-target optimisation's unlikelihood term (``z_answer``): it acts on the answer's token
where the target starts."""

from __future__ import annotations

import dataclasses
import json

import torch

from zu_cli.checkpoint import open_checkpoint

from zu_cli.loading import load_model
from zu_cli.config import Hyper
from zu_cli.console import silent
from zu_cli.delta import optimize_deltas
from zu_cli.edit import build_rows, kl_rows
from zu_cli.requests import Request
from zu_cli.text import encode_target


def _optimise(model, tok, spec, reqs, weight: float, avoid_same: bool):
    """Deltas at layer 1 of the fact model that make each row emit its request's own answer, while
    (``avoid_same``) that answer's first token is also the one to push down with ``weight``."""
    targets = [encode_target(tok, r.target) for r in reqs]
    rows = build_rows(tok, reqs, ["{}"], targets)
    avoid = [targets[i][0] for i in rows.owner] if avoid_same else None
    hp = dataclasses.replace(Hyper(optim_dtype="float32", z_clamp=1.5), z_answer=weight)
    torch.manual_seed(0)
    # 20 steps: the push toward the answer and away from it balance for the first ~10 (at 10 one
    # row still read 0.94 on an AMD EPYC CPU, 0.004 at 15); by 20 every row is well settled.
    return optimize_deltas(model, tok, spec, rows, kl_rows(tok, reqs), [spec.layer_module(1)], 1, len(reqs), hp,
                           20, 1.1, silent(), "t", avoid=avoid)


def test_the_answer_term_pushes_the_answer_down_and_is_off_at_zero(fact_model_dir):
    """On a model that knows its facts, the optimisation toward the answer keeps it likely; with
    the same token to avoid at weight 20 it ends far less likely; weight 0 (the default) or no token
    to avoid is the plain optimisation exactly."""
    from zu_cli.demo import Fact

    facts = [Fact(**f) for f in json.loads((fact_model_dir / "facts.json").read_text())][:3]
    reqs = [Request(id=f"f{i}", prompt=f.prompt(), subject=None, target=f.answer) for i, f in enumerate(facts)]
    ckpt = open_checkpoint(fact_model_dir)
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    assert Hyper().z_answer == 0.0
    plain = _optimise(model, tok, ckpt.spec, reqs, 0.0, avoid_same=False)
    off = _optimise(model, tok, ckpt.spec, reqs, 0.0, avoid_same=True)
    on = _optimise(model, tok, ckpt.spec, reqs, 20.0, avoid_same=True)
    torch.testing.assert_close(plain[0], off[0])
    assert float(plain[2].min()) > 0.5, plain[2]  # the model knows them, and the push keeps them
    assert bool((on[2] < 0.75 * plain[2]).all()), (plain[2], on[2])
