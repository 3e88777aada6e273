"""Keep-constraints (zu's addition to §2.6/§2.8): second moments of what the edit must leave alone,
added to the general statistics — the user's ``--retain`` facts and an entity keep-set sampled
from the model itself."""

from __future__ import annotations

import hashlib

import torch

from .config import Hyper
from .console import Output
from .stats import KEY_SUFFIX, cached_moments, collect_stats, second_moments
from .text import encode, sample

# Seeds that make a model name people, places and organisations. Sampled general text names
# few of them, and a neighbour's subject shares key directions with the forgotten subjects
# (docs/method.md, "where the neighbours go").
ENTITY_SEEDS = ["Famous scientists such as", "The capital city of", "Well-known companies like", "The writer",
                "The football club", "The university of", "Born in the city of", "The politician", "The musician",
                "The river", "The actor", "The painter", "The country of", "The language spoken by",
                "The newspaper", "The king"]
SENTENCE_END = (".", "!", "?", ":")


def keep_prompts(retain: list, forget: list) -> list[str]:
    """The prompts whose down-projection outputs the edit must keep: every prompt of the retain
    requests (prompt, paraphrases, neighbours) and the neighbours of the forget requests.

    Args:
        retain: requests.Request list from ``--retain`` (facts to keep).
        forget: the forget requests; their paraphrases are NOT kept (they are to be forgotten).

    Returns:
        Distinct prompts, in file order, without any prompt or paraphrase of a forget request.
    """
    prompts = [p for r in retain for p in (r.prompt, *r.paraphrases, *(nb.prompt for nb in r.neighbors))]
    prompts += [nb.prompt for r in forget for nb in r.neighbors]
    gone = {p for r in forget for p in (r.prompt, *r.paraphrases)}  # forgetting wins over keeping
    return [p for p in dict.fromkeys(prompts) if p not in gone]


def with_keep(stats: dict[int, torch.Tensor], keep: dict[int, torch.Tensor], weight: float) -> dict[int, torch.Tensor]:
    """Add keep moments to the general ones: ``stats + weight * keep`` per layer.

    Both are means over tokens, so ``weight`` says how much one keep token counts against one
    general-text token in the solve's "leave everything else alone" term.
    """
    return {l: s + weight * keep[l] for l, s in stats.items()} if keep and weight else stats


def keep_moments(model, tok, spec, layers, biases, prompts: list[str], out: Output,
                 keys: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """G (and E[k k^T] when ``keys``) over the keep-prompts' tokens, on the unedited model.

    Each prompt's first token is left out: it is the attention sink (see edit.build_rows), the
    same state whatever follows, already in the general statistics, and in a prompt of eight
    tokens it would be an eighth of the weight.

    Returns:
        (layer -> G (d, d), layer -> E[k k^T] (f, f) or empty), float64 on CPU; both empty when
        there are no prompts. Not cached: a retain file is small next to the general corpus.
    """
    if not prompts:
        return {}, {}
    names = {l: spec.down_proj_module(l) for l in layers}
    mods = [names[l] for l in layers]
    seqs = [encode(tok, p) for p in prompts]
    m = second_moments(model, seqs, mods, {names[l]: biases[l] for l in layers}, tok.pad_token_id, out,
                       key_modules=tuple(mods) if keys else (), label="keep statistics",
                       select=[[False] + [True] * (len(s) - 1) for s in seqs])
    return ({l: m[names[l]] for l in layers}, {l: m[names[l] + KEY_SUFFIX] for l in layers} if keys else {})


def entity_mask(tok, ids: list[int]) -> list[bool]:
    """Which tokens belong to a capitalised word that does not open a sentence (a name, mostly).

    Pieces come from decoding growing prefixes, so a tokenizer that drops a token's leading
    space when it is decoded alone (SentencePiece) still shows where words start. A special
    token (BOS, end of text) is never a name and starts a new sentence.

    Args:
        tok: the tokenizer.
        ids: one token sequence.

    Returns:
        One flag per token.
    """
    special = set(tok.all_special_ids)
    flags, prev, in_name, sentence_start = [], "", False, True
    for j in range(len(ids)):
        if ids[j] in special:  # BOS, end of text: what follows opens a sentence
            flags.append(False)
            sentence_start = True
            continue
        cur = tok.decode(ids[:j + 1], skip_special_tokens=True)
        piece, at = cur[len(prev):], len(prev)
        prev = cur
        word = piece.lstrip()
        if "\n" in piece[:len(piece) - len(word)]:
            sentence_start = True
        if not word:  # whitespace: the next piece starts a word
            flags.append(False)
            continue
        start = at + len(piece) - len(word)  # where the piece's text starts in ``cur``
        if not word[0].isalnum() or start == 0 or not cur[start - 1].isalnum():  # a new word or punctuation
            in_name = word[0].isupper() and not sentence_start
        flags.append(in_name)
        sentence_start = word.rstrip().endswith(SENTENCE_END) or "\n" in word
    return flags


def entity_moments(model, tok, spec, layers, biases, hp: Hyper, source: str, out: Output,
                   keys: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """G (and E[k k^T] when ``keys``) over the name tokens of text the model writes from
    ``ENTITY_SEEDS``: the entity keep-set, cached like the general statistics.

    Args:
        model, tok, spec: the unedited model, its tokenizer and architecture.
        layers: edited layers; biases: layer -> down-projection bias or None.
        hp: ``entity_samples`` texts of ``entity_len`` tokens, sampled with ``seed``.
        source: digest of the source weights (cache key).
        out: progress output.
        keys: E[k k^T] is wanted too (--multi).

    Returns:
        (layer -> G, layer -> E[k k^T] or empty unless ``keys``).
    """
    digest = hashlib.sha256(f"entity-samples-v3:{hp.entity_samples}x{hp.entity_len}:seed{hp.seed}:"
                            f"{'|'.join(ENTITY_SEEDS)}".encode()).hexdigest()
    names = {l: spec.down_proj_module(l) for l in layers}

    def compute(need: list[int], key_mods: tuple[str, ...]) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(hp.seed)
        seeds = [ENTITY_SEEDS[i % len(ENTITY_SEEDS)] for i in range(hp.entity_samples)]
        seqs = sample(model, tok, seeds, hp.entity_len, gen)
        return second_moments(model, seqs, [names[l] for l in need], {names[l]: biases[l] for l in need},
                              tok.pad_token_id, out, key_modules=key_mods, label="entity statistics",
                              select=[entity_mask(tok, s) for s in seqs])

    return cached_moments(source, digest, names, keys, compute)


def solve_moments(model, tok, spec, layers, biases, hp: Hyper, corpus, source: str, keep: list[str],
                  out: Output, keys: bool = False, closed: bool = True
                  ) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], str]:
    """The statistics the solve uses, per layer: general + entity keep-set + keep-prompts.

    G ← G + ``entity_weight`` G_ent + ``retain_weight`` G_keep and, when ``keys``,
    E[k k^T] ← E[k k^T] + ``multi_entity_weight`` E_ent[k k^T] + ``retain_weight`` E_keep[k k^T].
    The entity pass runs (or is read from the cache) only when a variant that is asked for uses it.

    Args:
        corpus: ``--stats-corpus`` or None (model samples).
        keep: keep-prompts (``keep_prompts``).
        keys: E[k k^T] is wanted (--multi).
        closed: G is used by a closed-form solve (so ``entity_weight`` applies).

    Returns:
        (layer -> G, layer -> E[k k^T] or empty, digest naming the general corpus).
    """
    g, kk, digest = collect_stats(model, tok, spec, layers, biases, hp, corpus, source, out, keys=keys)
    ent_keys = keys and hp.multi_entity_weight > 0
    g_ent, kk_ent = (entity_moments(model, tok, spec, layers, biases, hp, source, out, keys=ent_keys)
                     if (closed and hp.entity_weight > 0) or ent_keys else ({}, {}))
    g_keep, kk_keep = keep_moments(model, tok, spec, layers, biases, keep, out, keys=keys)
    g = with_keep(with_keep(g, g_ent, hp.entity_weight if closed else 0.0), g_keep, hp.retain_weight)
    kk = with_keep(with_keep(kk, kk_ent, hp.multi_entity_weight), kk_keep, hp.retain_weight)
    return g, kk, digest
