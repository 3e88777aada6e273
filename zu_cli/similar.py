"""The similar-entity keep-set (zu's addition to §2.8): each forget prompt with its subject swapped
for entities the model itself lists next to that subject.

A neighbour the edit must spare is the same relation about a subject *of the same kind* (another
French actor, another Apple product), and the keys of such subjects share directions with the
forgotten one that general text and random names do not cover (docs/results.md, "Qwen2.5-0.5B,
50 facts"). Asked to continue a numbered list that starts with the subject, a language model
writes exactly such subjects; kept at their own outputs, they hold those directions.
"""

from __future__ import annotations

import re

import torch

from .config import Hyper
from .console import Output
from .keep import keep_moments
from .text import encode, sample, sample_steps

LIST_SEED = "1. {subject}\n2."
ITEM = re.compile(r"\s*(?:\d+[.)]\s*)?(.*?)\s*")  # one list line, its number dropped
NAME = re.compile(r"[\w .,'&()+-]{3,40}")  # what a list item must look like to be used as a subject
WORD = re.compile(r"[^\W\d_]{3,}")


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


def similar_items(model, tok, requests: list, hp: Hyper, out: Output) -> list[list[str]]:
    """What the model lists after each subject: ``similar_samples`` continuations of ``LIST_SEED``
    of ``similar_len`` tokens (top-k sampling seeded with ``seed``).

    Returns:
        Per request with a subject, in order, the list items of its continuations.
    """
    subjects = [r.subject for r in requests if r.subject]
    seeds = [LIST_SEED.format(subject=s) for s in subjects for _ in range(hp.similar_samples)]
    gen = torch.Generator().manual_seed(hp.seed)
    with out.progress("listing similar entities", sample_steps(len(seeds), hp.similar_len)) as adv:
        seqs = sample(model, tok, seeds, hp.similar_len, gen, advance=adv)
    texts = [tok.decode(s[len(encode(tok, seed)):], skip_special_tokens=True) for s, seed in zip(seqs, seeds)]
    k = hp.similar_samples
    return [[it for t in texts[i * k:(i + 1) * k] for it in list_items(t)] for i in range(len(subjects))]


def similar_moments(model, tok, spec, layers, biases, hp: Hyper, requests: list, out: Output,
                    keys: bool = False) -> tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]]:
    """G (and E[k k^T] when ``keys``) over the similar-entity prompts (``similar_prompts``).

    Returns:
        (layer -> G, layer -> E[k k^T] or empty), both empty when no prompt can be built. Not
        cached: the prompts depend on the requests.
    """
    prompts = similar_prompts(requests, similar_items(model, tok, requests, hp, out), hp.similar_names)
    return keep_moments(model, tok, spec, layers, biases, prompts, out, keys=keys, label="similar-entity statistics")
