"""The similar-entity keep-set: parsing the list the model writes, the prompts built from it, the
sampling seed, and its wiring into the solve's statistics."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from typer.testing import CliRunner

from zu_cli.checkpoint import open_checkpoint
from zu_cli.cli import app
from zu_cli.config import Hyper
from zu_cli.console import silent
from zu_cli.loading import load_model
from zu_cli.requests import Request


def _req(id_, prompt, subject, paraphrases=()):
    return Request(id=id_, prompt=prompt, subject=subject, target="x", paraphrases=tuple(paraphrases))


def test_list_items_take_complete_lines_and_drop_numbers_and_prose():
    from zu_cli.similar import list_items

    text = " Isaac Newton\n3. Johannes Kepler\n4) **Bold**\nWhich one is right?\n5. Tycho Br"
    assert list_items(text) == ["Isaac Newton", "Johannes Kepler"]  # the cut-off last item is not used
    assert list_items(" Ada Lovelace") == []
    assert list_items(" Pinot Noir\n3. Pinot Noir\n\n") == ["Pinot Noir", "Pinot Noir"]


def test_similar_prompts_keep_other_entities_and_never_what_is_forgotten():
    from zu_cli.similar import similar_prompts

    reqs = [_req("a", "Bernard Giraudeau is a native speaker of", "Bernard Giraudeau"),
            _req("b", "Some prompt without a subject", None),
            _req("c", "Windows 95 is developed by", "Windows 95", paraphrases=["Windows 98 is developed by"]),
            _req("d", "Bill Gates, who is employed by", "Bill Gates")]
    items = [["Alain Delon", "Claude Giraudeau", "Bill Gates", "Alain Delon", "Jean Gabin", "Gérard Depardieu"],
             ["Windows 98", "macOS", "Gates"],
             ["Steve Jobs"]]
    got = similar_prompts(reqs, items, per_request=2)
    # "Claude Giraudeau" shares the subject's surname, "Bill Gates" is forgotten, "Gates" is held by a
    # forgotten subject, "Windows 98 is developed by" is a forget paraphrase; repeats count once.
    assert got == ["Alain Delon is a native speaker of", "Jean Gabin is a native speaker of",
                   "macOS is developed by", "Steve Jobs, who is employed by"]
    assert similar_prompts(reqs, [[], [], []], 2) == []


def test_similar_items_list_after_each_subject_with_the_seeded_sampler(tiny_models, monkeypatch):
    import zu_cli.similar as similar

    ckpt = open_checkpoint(tiny_models["llama"])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    calls = []

    def fake_sample(m, t, seeds, n, gens, **kw):
        calls.append((list(seeds), n, [g.initial_seed() for g in gens]))
        return [similar.encode(t, s) + t(" Ada\n3. Rome\n4. Par", add_special_tokens=False)["input_ids"]
                for s in seeds]

    monkeypatch.setattr(similar, "sample", fake_sample)
    reqs = [_req("a", "Zed is a", "Zed"), _req("b", "No subject", None), _req("c", "Yan is a", "Yan")]
    hp = Hyper(similar_samples=2, similar_len=7, seed=5)
    items = similar.similar_items(model, tok, reqs, hp, silent())
    seeds = [similar.row_seed(5, s, j) for s in ("Zed", "Yan") for j in (0, 1)]
    assert calls == [(["1. Zed\n2.", "1. Zed\n2.", "1. Yan\n2.", "1. Yan\n2."], 7, seeds)]
    assert len(set(seeds)) == 4 and similar.row_seed(6, "Zed", 0) not in seeds
    assert items == [["Ada", "Rome", "Ada", "Rome"]] * 2


def test_a_subjects_items_do_not_depend_on_the_requests_listed_with_it(tiny_models):
    """Each continuation draws from its own seeded generator: listing "Yan" alone, after another
    subject, or in batches of another size gives the same tokens (what lets the items be cached)."""
    from zu_cli.similar import LIST_SEED, row_seed
    from zu_cli.text import sample

    ckpt = open_checkpoint(tiny_models["llama"])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    gen = lambda s, j: torch.Generator().manual_seed(row_seed(5, s, j))
    alone = sample(model, tok, [LIST_SEED.format(subject="Yan")] * 2, 9, [gen("Yan", 0), gen("Yan", 1)])
    seeds = [LIST_SEED.format(subject=s) for s in ("Zed", "Zed", "Yan", "Yan")]
    for batch_size in (4, 3):  # fresh generators per run: sampling advances them
        gens = [gen(s, j) for s in ("Zed", "Yan") for j in (0, 1)]
        assert sample(model, tok, seeds, 9, gens, batch_size=batch_size)[2:] == alone
    assert alone[0] != alone[1]  # two continuations, two generators


def test_listed_items_are_cached_per_subject_encrypted(tiny_models, monkeypatch, tmp_path):
    """A second listing with the same weights reads its known subjects back and samples only the
    new one; the entries hold neither the subject nor the items as text; a damaged entry, other
    weights or ``cache_targets: false`` list again."""
    import zu_cli.similar as similar

    monkeypatch.setenv("ZU_CACHE_DIR", str(tmp_path))
    ckpt = open_checkpoint(tiny_models["llama"])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    sampled = []

    def fake_sample(m, t, seeds, n, gens, **kw):
        sampled.extend(seeds)
        return [similar.encode(t, s) + t(f" Ada{len(sampled)}\n3. Rome\n4.", add_special_tokens=False)["input_ids"]
                for s in seeds]

    monkeypatch.setattr(similar, "sample", fake_sample)
    hp = Hyper(similar_samples=1, similar_len=7, seed=5)
    zed, yan = _req("a", "Zedwick is a", "Zedwick"), _req("c", "Yanthor is a", "Yanthor")
    first = similar.similar_items(model, tok, [zed], hp, silent(), source="w1")
    again = similar.similar_items(model, tok, [zed, yan], hp, silent(), source="w1")
    assert sampled == ["1. Zedwick\n2.", "1. Yanthor\n2."] and again[0] == first[0] == ["Ada1", "Rome"]
    files = sorted((tmp_path / "similar").iterdir())
    assert len(files) == 2 and not any(b"Zedwick" in f.read_bytes() or b"Rome" in f.read_bytes() for f in files)
    similar.similar_items(model, tok, [zed], hp, silent(), source="w2")
    similar.similar_items(model, tok, [zed], dataclasses.replace(hp, cache_targets=False), silent(), source="w1")
    assert len(sampled) == 4 and len(list((tmp_path / "similar").iterdir())) == 3
    name, _ = similar.item_entry("w1", "Zedwick", hp)
    (tmp_path / "similar" / f"{name}.safetensors").write_bytes(b"damaged")
    assert similar.similar_items(model, tok, [zed], hp, silent(), source="w1") == [["Ada5", "Rome"]]


def test_solve_moments_adds_the_similar_set_where_the_variant_uses_it(tiny_models, monkeypatch, tmp_path):
    """Closed form: G + similar_weight G_sim; --multi: E[kk^T] + multi_similar_weight E_sim[kk^T];
    nothing sampled when the variant's weight is 0."""
    import zu_cli.keep as keep
    import zu_cli.similar as similar
    from zu_cli.stats import collect_stats

    monkeypatch.setenv("ZU_CACHE_DIR", str(tmp_path))
    ckpt = open_checkpoint(tiny_models["llama"])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    listed = []
    monkeypatch.setattr(similar, "similar_items", lambda *a: listed.append(1) or [["Ada Lovelace", "Paris"]])
    reqs = [_req("a", "The quick brown fox jumps", "fox")]
    hp = Hyper(stats_samples=4, stats_len=8, seed=3, entity_weight=0.0, similar_weight=2.0, similar_names=2)
    args = (model, tok, ckpt.spec, [1], {1: None})
    g0, kk0, _ = collect_stats(*args, hp, None, "src", silent(), keys=True)
    g_s, kk_s = keep.keep_moments(*args, ["The quick brown Ada Lovelace jumps", "The quick brown Paris jumps"],
                                  silent(), keys=True)
    g, kk, _ = keep.solve_moments(*args, hp, None, "src", [], silent(), keys=True, closed=False, requests=reqs)
    assert listed == [] and torch.equal(g[1], g0[1]) and torch.equal(kk[1], kk0[1])
    g, _, _ = keep.solve_moments(*args, hp, None, "src", [], silent(), requests=reqs)
    torch.testing.assert_close(g[1], g0[1] + 2.0 * g_s[1])
    hp = dataclasses.replace(hp, multi_similar_weight=0.3)
    g, kk, _ = keep.solve_moments(*args, hp, None, "src", [], silent(), keys=True, closed=False, requests=reqs)
    torch.testing.assert_close(kk[1], kk0[1] + 0.3 * kk_s[1])
    assert torch.equal(g[1], g0[1]) and listed == [1, 1]


def test_an_older_profile_gets_the_multi_keep_sets_it_lacks():
    from zu_cli.calibrate import MULTI_BASE, Profile, settings

    old = {"solver": "exact", "multi_entity_weight": 1.0, "multi_swap_weight": 1.0, "multi_general_weight": 1e4}
    prof = Profile(fingerprint="f", layers=[2, 3], sensitive="output", multi_layers=[1, 2, 3], multi=old,
                   figures={}, seconds=1.0)
    hp, applied, _ = settings(prof, [1, 2, 3], Hyper(), multi=True)
    assert hp.multi_similar_weight == MULTI_BASE["multi_similar_weight"] > 0 and hp.multi_general_weight == 1e4
    assert "multi_similar_weight" in applied
    hp, _, _ = settings(prof, [1, 2, 3], dataclasses.replace(Hyper(), explicit=frozenset({"multi_similar_weight"})),
                        multi=True)
    assert hp.multi_similar_weight == 0.0  # what the user set is never replaced


@pytest.mark.parametrize("field", ["similar_weight", "multi_similar_weight", "similar_names", "similar_len"])
def test_negative_similar_setting_is_refused(field, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{field}: -1\n")
    res = CliRunner().invoke(app, ["unlearn", "--model", str(tmp_path), "--forget", str(cfg), "--out",
                                   str(tmp_path / "o"), "--config", str(cfg)])
    assert res.exit_code == 2 and field in res.output
