"""Keep-constraints: the entity keep-set's token selection, its moments and cache; the subject-swap
keep-set's names and prompts; and their wiring."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from conftest import build_tokenizer
from zu_cli.checkpoint import open_checkpoint
from zu_cli.loading import load_model
from zu_cli.cli import app
from zu_cli.config import Hyper
from zu_cli.console import silent

TEXT = "The capital of France is Paris. The river Seine flows through Paris and Le Havre.\nMany people live there."
NAMES = {"France", "Paris", "Seine", "Le", "Havre"}


def _flagged_words(tok, ids, flags):
    """The words of the decoded text that hold a character of a flagged token."""
    import re

    text, marked = "", set()
    for j, f in enumerate(flags):
        cur = tok.decode(ids[:j + 1])
        if f:
            marked.update(range(len(text), len(cur)))
        text = cur
    return {m.group() for m in re.finditer(r"\w+", text) if marked & set(range(m.start(), m.end()))}


def _metaspace_tokenizer():
    """A SentencePiece-style word tokenizer: '▁Paris' decodes alone as 'Paris', without its space."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = TEXT.replace(".", " .").split()
    vocab = {"<unk>": 0, "<0x0A>": 1, "▁\n": 2}
    for w in words:
        vocab.setdefault("▁" + w, len(vocab))
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tk.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")


def test_entity_mask_flags_names_not_sentence_openers():
    from zu_cli.keep import entity_mask

    for tok, text in ((build_tokenizer(), TEXT), (_metaspace_tokenizer(), TEXT.replace("\n", " "))):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        flags = entity_mask(tok, ids)
        assert len(flags) == len(ids)
        got = _flagged_words(tok, ids, flags)
        assert got == NAMES, (type(tok.backend_tokenizer.pre_tokenizer).__name__, got)
        special = tok.eos_token_id if tok.eos_token_id is not None else tok.unk_token_id
        assert entity_mask(tok, [special] + ids) == [False] + flags  # a BOS-like token changes nothing
        cut = ids.index(tok("Many", add_special_tokens=False)["input_ids"][0])
        assert not entity_mask(tok, ids[:3] + [special] + ids[cut:])[4]  # "Many" after end of text opens a sentence


def test_entity_moments_match_a_direct_pass_and_are_cached(tiny_models, monkeypatch, tmp_path):
    """Left-padded batches select the same tokens as one unpadded sequence at a time; a second
    call reads the cache."""
    import zu_cli.keep as keep
    from zu_cli.hooks import TraceDict
    from zu_cli.text import sample

    monkeypatch.setenv("ZU_CACHE_DIR", str(tmp_path))
    ckpt = open_checkpoint(tiny_models["llama"])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    hp = Hyper(entity_weight=1.0, entity_samples=20, entity_len=12, seed=3)
    calls = []
    real = keep.second_moments
    monkeypatch.setattr(keep, "second_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    g, kk = keep.entity_moments(model, tok, ckpt.spec, [1], {1: None}, hp, "src", silent(), keys=True)
    assert len(calls) == 1

    seeds = [keep.ENTITY_SEEDS[i % len(keep.ENTITY_SEEDS)] for i in range(20)]
    seqs = sample(model, tok, seeds, 12, torch.Generator().manual_seed(3))
    name = ckpt.spec.down_proj_module(1)
    vs, ks = [], []
    with TraceDict(model, [name], retain_input=True) as td, torch.no_grad():
        for s in seqs:
            m = torch.tensor(keep.entity_mask(tok, s))
            model(torch.tensor([s]))
            vs.append(td[name].output[0][m].double())
            ks.append(td[name].input[0][m].double())
    v, k = torch.cat(vs), torch.cat(ks)
    assert len(v) > 0, "no name token sampled: the check below would be vacuous"
    torch.testing.assert_close(g[1], v.T @ v / len(v), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kk[1], k.T @ k / len(k), rtol=1e-4, atol=1e-6)

    g2, kk2 = keep.entity_moments(model, tok, ckpt.spec, [1], {1: None}, hp, "src", silent(), keys=True)
    assert len(calls) == 1 and torch.equal(g2[1], g[1]) and torch.equal(kk2[1], kk[1])


def test_solve_moments_adds_the_entity_set_where_the_variant_uses_it(tiny_models, monkeypatch, tmp_path):
    """Closed form: G + entity_weight G_ent; --multi: E[kk^T] + multi_entity_weight E_ent[kk^T], and no
    entity pass at all when the variant's weight is 0."""
    import dataclasses

    import zu_cli.keep as keep
    from zu_cli.stats import collect_stats

    monkeypatch.setenv("ZU_CACHE_DIR", str(tmp_path))
    ckpt = open_checkpoint(tiny_models["llama"])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    hp = Hyper(stats_samples=4, stats_len=8, entity_samples=20, entity_len=12, seed=3, entity_weight=2.0,
               multi_entity_weight=0.0)
    calls = []
    real = keep.second_moments
    monkeypatch.setattr(keep, "second_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = (model, tok, ckpt.spec, [1], {1: None})
    g0, kk0, _ = collect_stats(*args, hp, None, "src", silent(), keys=True)
    g_ent, kk_ent = keep.entity_moments(*args, hp, "src", silent(), keys=True)
    calls.clear()
    g, kk, _ = keep.solve_moments(*args, hp, None, "src", [], silent(), keys=True, closed=False)
    assert calls == [] and torch.equal(g[1], g0[1]) and torch.equal(kk[1], kk0[1])
    g, _, _ = keep.solve_moments(*args, hp, None, "src", [], silent())
    torch.testing.assert_close(g[1], g0[1] + 2.0 * g_ent[1])
    hp = dataclasses.replace(hp, multi_entity_weight=3.0)
    g, kk, _ = keep.solve_moments(*args, hp, None, "src", [], silent(), keys=True, closed=False)
    torch.testing.assert_close(kk[1], kk0[1] + 3.0 * kk_ent[1])
    assert torch.equal(g[1], g0[1])


@pytest.mark.parametrize("field", ["entity_weight", "swap_weight"])
def test_keep_set_weight_changes_the_edit_and_is_recorded(field, tiny_models, tmp_path, monkeypatch):
    import zu_cli.keep as keep

    monkeypatch.setenv("ZU_CACHE_DIR", str(tmp_path / "cache"))
    # A random tiny model writes few capitalised words: give the swap set names to use.
    monkeypatch.setattr(keep, "name_pool", lambda *a: ["Ada Lovelace", "Paris"])
    req = tmp_path / "forget.jsonl"
    req.write_text(json.dumps({"id": "a", "prompt": "The quick brown fox", "subject": "fox", "target": "jumps"}) + "\n")
    base = ("n_prefixes: 1\nprefix_len: 3\nz_steps: 3\nsens_steps: 3\nstats_samples: 8\nstats_len: 12\n"
            "max_rel_change: 1000.0\nentity_samples: 16\nentity_len: 12\n"
            + ("entity_weight: 0\n" if field == "swap_weight" else "swap_weight: 0\n"))
    news = {}
    for w in (0.0, 5.0):
        cfg = tmp_path / f"c{w}.yaml"
        cfg.write_text(base + f"{field}: {w}\n")
        out = tmp_path / f"o{w}"
        res = CliRunner().invoke(app, ["unlearn", "--model", str(tiny_models["llama"]), "--forget", str(req),
                                       "--out", str(out), "--config", str(cfg), "--layers", "1",
                                       "--device-map", "cpu"])
        assert res.exit_code == 0, res.output
        pred = json.loads((out / "zu-manifest.json").read_text())["predicate"]
        assert pred["edit"]["hyperparameters"][field] == w
        ck = open_checkpoint(out)
        news[w] = ck.read_tensor(ck.spec.down_proj_weight(1))
    assert not torch.equal(news[0.0], news[5.0])


@pytest.mark.parametrize("field", ["entity_weight", "swap_weight", "multi_swap_weight", "swap_names"])
def test_negative_keep_set_setting_is_refused(field, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"{field}: -1\n")
    res = CliRunner().invoke(app, ["unlearn", "--model", str(tmp_path), "--forget", str(cfg), "--out",
                                   str(tmp_path / "o"), "--config", str(cfg)])
    assert res.exit_code == 2 and field in res.output


def _req(id_, prompt, subject, paraphrases=()):
    from zu_cli.requests import Request

    return Request(id=id_, prompt=prompt, subject=subject, target="x", paraphrases=tuple(paraphrases))


def test_swap_prompts_replace_the_subject_and_never_keep_what_is_forgotten():
    from zu_cli.keep import swap_prompts

    reqs = [_req("a", "Marie Curie works in the area of", "Marie Curie"),
            _req("b", "The capital of France is", "France"),
            _req("c", "Some prompt without a subject", None),
            _req("d", "Zed is a", "Zed", paraphrases=["Ada Lovelace is a"]),
            _req("e", "Rex met Rex", "Rex")]
    names = ["Ada Lovelace", "Curie", "Marie Curie Institute", "Paris", "Rome", "Zed", "Zedland"]
    got = swap_prompts(reqs, names, 3, seed=0)
    # Names holding a forgotten subject or held by one never stand in; "Ada Lovelace is a" is a
    # forget paraphrase and is not kept; the subject-less request gives nothing.
    pool = ["Ada Lovelace", "Paris", "Rome"]
    for p in got:
        assert not any(n in p for n in ("Curie", "Zed", "France", "Rex")), p
        assert p != "Ada Lovelace is a"
        assert any(p == r.prompt.replace(r.subject, n) for r in reqs if r.subject for n in pool), p
    assert sorted(got) == sorted([r.prompt.replace(r.subject, n) for r in reqs[:2] + reqs[4:] for n in pool]
                                 + ["Paris is a", "Rome is a"])  # three names each, but "Ada Lovelace is a"
    assert "Paris met Paris" in got  # every occurrence of the subject is swapped
    assert swap_prompts(reqs, names, 3, seed=0) == got  # deterministic
    assert len(set(swap_prompts(reqs, names, 1, s)[0] for s in range(20))) > 1  # the seed draws
    assert swap_prompts(reqs, [], 2, seed=0) == []


def test_name_pool_holds_the_names_the_model_writes_and_is_cached(tiny_models, monkeypatch, tmp_path):
    import zu_cli.keep as keep

    monkeypatch.setenv("ZU_CACHE_DIR", str(tmp_path))
    ckpt = open_checkpoint(tiny_models["llama"])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    calls = []
    monkeypatch.setattr(keep, "sample", lambda m, t, seeds, n, gen, **kw: calls.append(len(seeds)) or [ids] * len(seeds))
    hp = Hyper(swap_texts=3, seed=1)
    assert keep.name_pool(model, tok, hp, "src") == ["France", "Le Havre", "Paris", "Seine"]
    assert calls == [3]
    assert keep.name_pool(model, tok, hp, "src") == ["France", "Le Havre", "Paris", "Seine"] and calls == [3]
    keep.name_pool(model, tok, hp, "other weights")  # another checkpoint never reuses the names
    assert calls == [3, 3]


def test_solve_moments_adds_the_swap_set_where_the_variant_uses_it(tiny_models, monkeypatch, tmp_path):
    """Closed form: G + swap_weight G_swap; --multi: E[kk^T] + multi_swap_weight E_swap[kk^T], the
    moments of the subject-swapped prompts; no name pool drawn when the variant's weight is 0."""
    import dataclasses

    import zu_cli.keep as keep
    from zu_cli.stats import collect_stats

    monkeypatch.setenv("ZU_CACHE_DIR", str(tmp_path))
    ckpt = open_checkpoint(tiny_models["llama"])
    model, tok = load_model(ckpt, device_map="cpu", dtype="float32")
    pools = []
    monkeypatch.setattr(keep, "name_pool", lambda *a: pools.append(1) or ["Ada Lovelace", "Paris"])
    reqs = [_req("a", "The quick brown fox jumps", "fox")]
    hp = Hyper(stats_samples=4, stats_len=8, seed=3, entity_weight=0.0, swap_weight=2.0, swap_names=2)
    args = (model, tok, ckpt.spec, [1], {1: None})
    g0, kk0, _ = collect_stats(*args, hp, None, "src", silent(), keys=True)
    g_s, kk_s = keep.keep_moments(*args, ["The quick brown Ada Lovelace jumps", "The quick brown Paris jumps"],
                                  silent(), keys=True)
    g, kk, _ = keep.solve_moments(*args, hp, None, "src", [], silent(), keys=True, closed=False, requests=reqs)
    assert pools == [] and torch.equal(g[1], g0[1]) and torch.equal(kk[1], kk0[1])
    g, _, _ = keep.solve_moments(*args, hp, None, "src", [], silent(), requests=reqs)
    torch.testing.assert_close(g[1], g0[1] + 2.0 * g_s[1])
    hp = dataclasses.replace(hp, multi_swap_weight=3.0)
    g, kk, _ = keep.solve_moments(*args, hp, None, "src", [], silent(), keys=True, closed=False, requests=reqs)
    torch.testing.assert_close(kk[1], kk0[1] + 3.0 * kk_s[1])
    assert torch.equal(g[1], g0[1]) and pools == [1, 1]
