"""The per-request targets cache: a rerun optimises only the requests it has not seen on these
weights with these settings, and writes the same checkpoint."""

from __future__ import annotations

import dataclasses
import json

import torch

from zu_cli import edit
from zu_cli.checkpoint import open_checkpoint
from zu_cli.config import Hyper
from zu_cli.console import silent
from zu_cli.keys import ephemeral
from zu_cli.pipeline import UnlearnOptions, run_unlearn

# Random tiny models have degenerate statistics: the change bound is for real checkpoints.
FAST = Hyper(n_prefixes=1, prefix_len=3, z_steps=3, sens_steps=3, stats_samples=8, stats_len=12,
             max_rel_change=1000.0)
ROWS = [{"id": "a", "prompt": "Every quick brown fox leaps", "subject": "brown fox", "target": "over"},
        {"id": "b", "prompt": "A lazy dog sleeps under", "subject": "lazy dog", "target": "the"}]


def _unlearn(model, tmp_path, name: str, rows: list[dict], hp: Hyper, monkeypatch) -> tuple[list, object]:
    """Edit ``rows`` into ``tmp_path/name``; returns (prompts each edit_targets call optimised, result)."""
    seen = []
    real = edit.edit_targets

    def spy(model_, tok, spec, requests, *args, **kwargs):
        seen.append([r.prompt for r in requests])
        return real(model_, tok, spec, requests, *args, **kwargs)

    monkeypatch.setattr(edit, "edit_targets", spy)
    req = tmp_path / f"{name}.jsonl"
    req.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = run_unlearn(UnlearnOptions(model=model, forget=req, out=tmp_path / name, layers="1,2", device_map="cpu",
                                     signer=ephemeral()), hp, silent())
    return seen, res


def _weights(path, names):
    ckpt = open_checkpoint(path)
    return {n: ckpt.read_tensor(n) for n in names}


def test_a_rerun_optimises_only_new_requests_and_writes_the_same_edit(tiny_models, tmp_path, monkeypatch):
    model = tiny_models["llama"]
    seen, res = _unlearn(model, tmp_path, "first", ROWS[:1], FAST, monkeypatch)
    assert seen == [[ROWS[0]["prompt"]]]
    names = [u["name"] for u in res.updates]
    seen, _ = _unlearn(model, tmp_path, "again", ROWS[:1], FAST, monkeypatch)
    assert seen == []  # every request cached: no optimisation at all
    first, again = _weights(tmp_path / "first", names), _weights(tmp_path / "again", names)
    assert all(torch.equal(first[n], again[n]) for n in names)
    seen, _ = _unlearn(model, tmp_path, "more", ROWS, FAST, monkeypatch)
    assert seen == [[ROWS[1]["prompt"]]]  # only the request not seen before


def test_other_settings_or_weights_or_the_switch_recompute(tiny_models, tmp_path, monkeypatch):
    model = tiny_models["llama"]
    _unlearn(model, tmp_path, "first", ROWS[:1], FAST, monkeypatch)
    seen, _ = _unlearn(model, tmp_path, "steps", ROWS[:1], dataclasses.replace(FAST, z_steps=4), monkeypatch)
    assert seen == [[ROWS[0]["prompt"]]]  # a targets setting is part of the key
    seen, _ = _unlearn(model, tmp_path, "quant", ROWS[:1], dataclasses.replace(FAST, z_quant="bnb-int8"), monkeypatch)
    assert seen == [[ROWS[0]["prompt"]]]  # so is z_quant once set (left at "" it is not in the key)
    seen, _ = _unlearn(model, tmp_path, "solver", ROWS[:1], dataclasses.replace(FAST, lambda_g=1000.0), monkeypatch)
    assert seen == []  # a solver setting is not
    seen, _ = _unlearn(tmp_path / "first", tmp_path, "edited", ROWS[:1], FAST, monkeypatch)
    assert seen == [[ROWS[0]["prompt"]]]  # other weights (an edited checkpoint): another key
    seen, _ = _unlearn(model, tmp_path, "off", ROWS[:1], dataclasses.replace(FAST, cache_targets=False), monkeypatch)
    assert seen == [[ROWS[0]["prompt"]]]


def test_a_damaged_entry_is_recomputed(tiny_models, tmp_path, monkeypatch):
    from zu_cli.stats import cache_dir

    model = tiny_models["llama"]
    before = set((cache_dir() / "targets").glob("*.safetensors")) if (cache_dir() / "targets").is_dir() else set()
    _unlearn(model, tmp_path, "first", [ROWS[0] | {"prompt": "The brown fox runs"}], FAST, monkeypatch)
    new = set((cache_dir() / "targets").glob("*.safetensors")) - before
    assert len(new) == 1
    new.pop().write_bytes(b"not a safetensors file")
    seen, _ = _unlearn(model, tmp_path, "again", [ROWS[0] | {"prompt": "The brown fox runs"}], FAST, monkeypatch)
    assert seen == [["The brown fox runs"]]
