"""Keep-constraints (zu's addition to §2.6/§2.8): second moments of what the edit must leave alone,
added to the general statistics — the user's ``--retain`` facts, an entity keep-set sampled from
the model itself, and the forget prompts with their subject swapped for other names."""

from __future__ import annotations

import hashlib
import json
import os
import random

import torch

from .config import Hyper
from .console import Output, silent
from .stats import KEY_SUFFIX, cache_dir, cached_moments, collect_stats, second_moments
from .text import encode, sample, sample_steps

# Seeds that make a model name people, places and organisations. Sampled general text names
# few of them, and a neighbour's subject shares key directions with the forgotten subjects
# (docs/method.md, "where the neighbours go").
ENTITY_SEEDS = ["Famous scientists such as", "The capital city of", "Well-known companies like", "The writer",
                "The football club", "The university of", "Born in the city of", "The politician", "The musician",
                "The river", "The actor", "The painter", "The country of", "The language spoken by",
                "The newspaper", "The king"]
SENTENCE_END = (".", "!", "?", ":")
NAME_LEN = 24  # tokens per text sampled for the name pool: a seed's continuation names one or two things
NOT_NAMES = {"The", "I"}  # capitalised inside a sentence without being a name


def keep_prompts(retain: list, forget: list, previous: list = ()) -> list[str]:
    """The prompts whose down-projection outputs the edit must keep: every prompt of the retain
    requests (prompt, paraphrases, neighbours), of earlier rounds' requests, and the neighbours of
    the forget requests.

    Args:
        retain: requests.Request list from ``--retain`` (facts to keep).
        forget: the forget requests; their paraphrases are NOT kept (they are to be forgotten).
        previous: requests an earlier edit of this checkpoint forgot (``--previous``): keeping
            their outputs holds them at what that edit made them, so this edit cannot revive them.

    Returns:
        Distinct prompts, in file order, without any prompt or paraphrase of a forget request.
    """
    prompts = [p for r in (*retain, *previous) for p in (r.prompt, *r.paraphrases, *(nb.prompt for nb in r.neighbors))]
    prompts += [nb.prompt for r in forget for nb in r.neighbors]
    gone = {p for r in forget for p in (r.prompt, *r.paraphrases)}  # forgetting wins over keeping
    return [p for p in dict.fromkeys(prompts) if p not in gone]


def with_keep(stats: dict[int, torch.Tensor], keep: dict[int, torch.Tensor], weight: float) -> dict[int, torch.Tensor]:
    """Add keep moments to the general ones: ``stats + weight * keep`` per layer.

    Both are means over tokens, so ``weight`` says how much one keep token counts against one
    general-text token in the solve's "leave everything else alone" term.
    """
    return {l: s + weight * keep[l] for l, s in stats.items()} if keep and weight else stats


def keep_moments(model, tok, spec, layers, biases, prompts: list[str], out: Output, keys: bool = False,
                 label: str = "keep statistics") -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
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
                       key_modules=tuple(mods) if keys else (), label=label,
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
        with out.progress("sampling name-eliciting text", sample_steps(len(seeds), hp.entity_len)) as adv:
            seqs = sample(model, tok, seeds, hp.entity_len, gen, advance=adv)
        return second_moments(model, seqs, [names[l] for l in need], {names[l]: biases[l] for l in need},
                              tok.pad_token_id, out, key_modules=key_mods, label="entity statistics",
                              select=[entity_mask(tok, s) for s in seqs])

    return cached_moments(source, digest, names, keys, compute)


def name_spans(tok, ids: list[int]) -> list[str]:
    """The names in one token sequence, as text: runs of ``entity_mask`` tokens, a space token
    between two of them included (a tokenizer that splits spaces off words)."""
    spans, cur, gap = [], [], []
    for t, f in zip(ids, entity_mask(tok, ids)):
        piece = tok.decode([t])
        if f:
            cur, gap = cur + gap + [t], []
        elif cur and piece.isspace() and "\n" not in piece:
            gap.append(t)
        elif cur:
            spans.append(tok.decode(cur).strip())
            cur, gap = [], []
    return spans + ([tok.decode(cur).strip()] if cur else [])


def name_pool(model, tok, hp: Hyper, source: str, out: Output | None = None) -> list[str]:
    """Distinct names the model writes after ``ENTITY_SEEDS`` (``swap_texts`` texts of ``NAME_LEN``
    tokens, seeded), sorted; cached as JSON under ``ZU_CACHE_DIR`` keyed by the source weights.

    Args:
        model, tok: the unedited model and its tokenizer.
        hp: ``swap_texts`` and ``seed``.
        source: digest of the source weights.

    Returns:
        Names of three characters or more.
    """
    digest = hashlib.sha256(f"names-v1:{source}:{hp.swap_texts}x{NAME_LEN}:seed{hp.seed}:"
                            f"{'|'.join(ENTITY_SEEDS)}".encode()).hexdigest()[:32]
    f = cache_dir() / "names" / f"{digest}.json"
    try:
        return json.loads(f.read_text())
    except (OSError, ValueError):  # absent or damaged: recomputed
        pass
    gen = torch.Generator().manual_seed(hp.seed)
    with (out or silent()).progress("sampling names", sample_steps(hp.swap_texts, NAME_LEN)) as adv:
        seqs = sample(model, tok, [ENTITY_SEEDS[i % len(ENTITY_SEEDS)] for i in range(hp.swap_texts)], NAME_LEN, gen,
                      advance=adv)
    names = sorted({n for s in seqs for n in name_spans(tok, s) if len(n) > 2 and n not in NOT_NAMES})
    f.parent.mkdir(parents=True, exist_ok=True)
    tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(names))
    os.replace(tmp, f)
    return names


def swap_prompts(requests: list, names: list[str], per_request: int, seed: int) -> list[str]:
    """Each forget prompt with its subject swapped for ``per_request`` names from ``names``.

    A neighbour is the same relation about another subject ("Michio Kaku works in the area of"
    next to "Paracelsus works in the area of"); these prompts stand in for the ones the user did
    not list. Names that hold a forgotten subject, or that one holds, are left out (forgetting
    wins), as are requests without a subject.

    Args:
        requests: the forget requests.
        names: the name pool (``name_pool``).
        per_request: names drawn per request (without replacement).
        seed: the draw's seed.

    Returns:
        Distinct prompts, none of them a forget prompt or paraphrase.
    """
    subjects = [r.subject for r in requests if r.subject]
    pool = [n for n in names if not any(n in s or s in n for s in subjects)]
    rng = random.Random(seed)
    # Every occurrence is swapped: a kept prompt that still names the subject would fight the edit.
    prompts = [r.prompt.replace(r.subject, n) for r in requests if r.subject and pool
               for n in rng.sample(pool, min(per_request, len(pool)))]
    gone = {p for r in requests for p in (r.prompt, *r.paraphrases)}
    return [p for p in dict.fromkeys(prompts) if p not in gone]


def swap_moments(model, tok, spec, layers, biases, hp: Hyper, requests: list, source: str, out: Output,
                 keys: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """G (and E[k k^T] when ``keys``) over the subject-swapped forget prompts (``swap_prompts``).

    Returns:
        (layer -> G, layer -> E[k k^T] or empty), both empty when no prompt can be built. Not
        cached: the prompts depend on the requests (the name pool is cached).
    """
    prompts = swap_prompts(requests, name_pool(model, tok, hp, source, out), hp.swap_names, hp.seed)
    return keep_moments(model, tok, spec, layers, biases, prompts, out, keys=keys, label="swap statistics")


def solve_moments(model, tok, spec, layers, biases, hp: Hyper, corpus, source: str, keep: list[str],
                  out: Output, keys: bool = False, closed: bool = True, requests: list = (),
                  weights: str | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor], str]:
    """The statistics the solve uses, per layer: general + entity + subject-swap + keep-prompts.

    G ← G + ``entity_weight`` G_ent + ``swap_weight`` G_swap + ``similar_weight`` G_sim +
    ``retain_weight`` G_keep and, when ``keys``, E[k k^T] ← E[k k^T] + ``multi_entity_weight``
    E_ent[k k^T] + ``multi_swap_weight`` E_swap[k k^T] + ``multi_similar_weight`` E_sim[k k^T] +
    ``retain_weight`` E_keep[k k^T]. The entity, swap and similar-entity passes run (or are read
    from the cache) only when a variant that is asked for uses them.

    Args:
        corpus: ``--stats-corpus`` or None (model samples).
        keep: keep-prompts (``keep_prompts``).
        keys: E[k k^T] is wanted (--multi).
        closed: G is used by a closed-form solve (so ``entity_weight`` and ``swap_weight`` apply).
        requests: the forget requests (for the subject-swap keep-set).
        weights: fingerprint of the weights loaded, under which the similar-entity listing is
            cached; default ``source`` (they differ when a chain's round reads the base's statistics).

    Returns:
        (layer -> G, layer -> E[k k^T] or empty, digest naming the general corpus).
    """
    from .similar import similar_moments  # similar.py builds on keep_moments

    g, kk, digest = collect_stats(model, tok, spec, layers, biases, hp, corpus, source, out, keys=keys)
    args = (model, tok, spec, layers, biases, hp)
    ent_w, swap_w, sim_w = (hp.entity_weight, hp.swap_weight, hp.similar_weight) if closed else (0.0,) * 3
    ent_kw, swap_kw, sim_kw = ((hp.multi_entity_weight, hp.multi_swap_weight, hp.multi_similar_weight) if keys
                               else (0.0,) * 3)
    g_ent, kk_ent = (entity_moments(*args, source, out, keys=ent_kw > 0) if ent_w or ent_kw else ({}, {}))
    g_swap, kk_swap = (swap_moments(*args, list(requests), source, out, keys=swap_kw > 0)
                       if (swap_w or swap_kw) and requests else ({}, {}))
    g_sim, kk_sim = (similar_moments(*args, list(requests), out, keys=sim_kw > 0,
                                     source=weights or source)
                     if (sim_w or sim_kw) and requests else ({}, {}))
    g_keep, kk_keep = keep_moments(model, tok, spec, layers, biases, keep, out, keys=keys)
    for extra, w, kextra, kw in ((g_ent, ent_w, kk_ent, ent_kw), (g_swap, swap_w, kk_swap, swap_kw),
                                 (g_sim, sim_w, kk_sim, sim_kw), (g_keep, hp.retain_weight, kk_keep, hp.retain_weight)):
        g, kk = with_keep(g, extra, w), with_keep(kk, kextra, kw)
    return g, kk, digest
