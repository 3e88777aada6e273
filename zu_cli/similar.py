"""The similar-entity keep-set (zu's addition to §2.8): each forget prompt with its subject swapped
for entities the model itself lists next to that subject.

A neighbour the edit must spare is the same relation about a subject *of the same kind* (another
French actor, another Apple product), and the keys of such subjects share directions with the
forgotten one that general text and random names do not cover (docs/results.md, "Qwen2.5-0.5B,
50 facts"). Asked to continue a numbered list that starts with the subject, a language model
writes exactly such subjects; kept at their own outputs, they hold those directions.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import torch

from .config import Hyper
from .console import Output
from .keep import keep_moments
from .stats import read_entry, write_entry
from .text import encode, sample, sample_steps

LIST_SEED = "1. {subject}\n2."
ITEM = re.compile(r"\s*(?:\d+[.)]\s*)?(.*?)\s*")  # one list line, its number dropped
NAME = re.compile(r"[\w .,'&()+-]{3,40}")  # what a list item must look like to be used as a subject
WORD = re.compile(r"[^\W\d_]{3,}")
ITEMS_VERSION = "similar-items-v1"  # bump when what a cached entry holds changes


def list_items(text: str) -> list[str]:
    """The items of a generated numbered list, in order: every complete line, its number dropped.

    The last line is left out (generation stops mid-item), as are lines that do not look like a
    name (``NAME``: markdown, questions, sentences).

    Args:
        text: the continuation of ``LIST_SEED`` (it starts with the second item's text).

    Returns:
        Item texts, possibly repeated.
    """
    items = []
    for line in text.split("\n")[:-1]:
        item = ITEM.fullmatch(line).group(1)
        if NAME.fullmatch(item):
            items.append(item)
    return items


def _words(s: str) -> set[str]:
    return {w.lower() for w in WORD.findall(s)}


def similar_prompts(requests: list, items: list[list[str]], per_request: int) -> list[str]:
    """Each forget prompt with its subject swapped for up to ``per_request`` of its listed items.

    Forgetting wins: an item that holds a forgotten subject or is held by one is left out, and so is
    one that shares a word with its own request's subject ("Claude Giraudeau" for "Bernard
    Giraudeau", "Bundesautobahn 7" for "Bundesautobahn 6"): kept, it pins the key directions the
    edit must change (on Qwen2.5-0.5B, 50 facts, such items left 20 % of them recalled against 8 %
    without them).

    Args:
        requests: the forget requests (those without a subject are skipped).
        items: per request with a subject, in order, the items the model listed (``list_items``).
        per_request: items used per request, in the order listed.

    Returns:
        Distinct prompts, none of them a forget prompt or paraphrase.
    """
    subjects = [r.subject for r in requests if r.subject]
    gone = {p for r in requests for p in (r.prompt, *r.paraphrases)}
    prompts = []
    for r, found in zip((r for r in requests if r.subject), items):
        own = _words(r.subject)
        ok = [n for n in dict.fromkeys(found)
              if not any(n in s or s in n for s in subjects) and not (_words(n) & own)]
        prompts += [r.prompt.replace(r.subject, n) for n in ok[:per_request]]
    return [p for p in dict.fromkeys(prompts) if p not in gone]


def similar_items(model, tok, requests: list, hp: Hyper, out: Output, source: str | None = None) -> list[list[str]]:
    """What the model lists after each subject: ``similar_samples`` continuations of ``LIST_SEED``
    of ``similar_len`` tokens, top-k sampled.

    Each continuation draws from its own generator, seeded by ``seed``, the subject and its number
    (``row_seed``), so a subject's items do not depend on the requests listed with it, and with
    ``source`` they are cached per subject (``cache_targets``): a rebased round lists only the
    subjects it has not listed before (docs/results.md, "Requests over time").

    Args:
        model, tok: the unedited model and its tokenizer.
        requests: the forget requests (those without a subject are skipped).
        hp: ``similar_samples``, ``similar_len``, ``seed``, ``cache_targets``.
        out: progress output.
        source: the weights' fingerprint, the cache's key; None: nothing is cached.

    Returns:
        Per request with a subject, in order, the list items of its continuations.
    """
    subjects = [r.subject for r in requests if r.subject]
    entries = {s: item_entry(source, s, hp) for s in subjects} if source and hp.cache_targets else {}
    found = {s: items for s, e in entries.items() if (items := load_items(*e)) is not None}
    todo = [s for s in dict.fromkeys(subjects) if s not in found]
    if found:
        out.info(f"similar entities: {len(found)} of {len(found) + len(todo)} subjects from the cache")
    k = hp.similar_samples
    seeds = [LIST_SEED.format(subject=s) for s in todo for _ in range(k)]
    gens = [torch.Generator().manual_seed(row_seed(hp.seed, s, j)) for s in todo for j in range(k)]
    with out.progress("listing similar entities", sample_steps(len(seeds), hp.similar_len)) as adv:
        seqs = sample(model, tok, seeds, hp.similar_len, gens, advance=adv) if seeds else []
    texts = [tok.decode(s[len(encode(tok, seed)):], skip_special_tokens=True) for s, seed in zip(seqs, seeds)]
    for i, s in enumerate(todo):
        found[s] = [it for t in texts[i * k:(i + 1) * k] for it in list_items(t)]
        if s in entries:
            store_items(*entries[s], found[s])
    return [found[s] for s in subjects]


def row_seed(seed: int, subject: str, j: int) -> int:
    """The seed of a subject's ``j``-th continuation: 63 bits of a digest of the three."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{subject}\0{j}".encode()).digest()[:8], "big") >> 1


def item_entry(source: str, subject: str, hp: Hyper) -> tuple[str, bytes]:
    """A subject's cache entry: (its name, the key its items are encrypted with).

    Both are digests of the weights' fingerprint, the subject and the listing's settings, under
    different labels: the cache holds no readable text, and only someone who already knows the
    subject can find or read its entry.
    """
    what = json.dumps([ITEMS_VERSION, source, subject, LIST_SEED, hp.similar_samples, hp.similar_len, hp.seed])
    name = hashlib.sha256(f"name\0{what}".encode()).hexdigest()[:40]
    return name, hashlib.sha256(f"key\0{what}".encode()).digest()


def load_items(name: str, key: bytes) -> list[str] | None:
    """A subject's cached items, or None if absent, damaged or not decryptable (then they are listed again)."""
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    entry = read_entry("similar", name)
    try:
        blob = bytes(entry["items"].tolist())
        return json.loads(AESGCM(key).decrypt(blob[:12], blob[12:], None))
    except (TypeError, KeyError, ValueError, InvalidTag):
        return None


def store_items(name: str, key: bytes, items: list[str]) -> None:
    """Write a subject's items, AES-GCM encrypted with ``key``, atomically."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    blob = nonce + AESGCM(key).encrypt(nonce, json.dumps(items).encode(), None)
    write_entry("similar", name, {"items": torch.tensor(list(blob), dtype=torch.uint8)})


def similar_moments(model, tok, spec, layers, biases, hp: Hyper, requests: list, out: Output, keys: bool = False,
                    source: str | None = None) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """G (and E[k k^T] when ``keys``) over the similar-entity prompts (``similar_prompts``).

    Args:
        source: the weights' fingerprint; the listed items are cached under it (``similar_items``).

    Returns:
        (layer -> G, layer -> E[k k^T] or empty), both empty when no prompt can be built. The
        moments are not cached: the prompts depend on every request.
    """
    prompts = similar_prompts(requests, similar_items(model, tok, requests, hp, out, source), hp.similar_names)
    return keep_moments(model, tok, spec, layers, biases, prompts, out, keys=keys, label="similar-entity statistics")
