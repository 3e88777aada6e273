"""Rows for the delta optimisation, run so that only what the delta can change is recomputed.

The delta is added at each row's lookup token. Every position before it, in every layer, does not
depend on the delta: ``PrefixBatch`` runs those prefixes once, keeps their keys and values (a KV
cache), and each optimisation step runs only the suffix (the lookup token onwards) against that
cache. ``FullBatch`` is the plain path (every token every step), used when a row has no prefix.
``RowGroups`` splits the rows into a few such batches of similar length, so that a step does not
run the pads of short rows up to the longest one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from .text import Batch, cache_kwarg, left_pad


class FullBatch:
    """Every row whole, left-padded (the uncached path).

    Attributes:
        shape: (rows, columns) of what a step runs.
        look: (rows,) column of each row's lookup token.
    """

    def __init__(self, model, seqs: list[list[int]], lookup: list[int], pad_id: int, dev: torch.device):
        self.batch: Batch = left_pad(seqs, pad_id, dev)
        self.shape = tuple(self.batch.ids.shape)
        self.look = (torch.tensor(lookup) + self.batch.offset.cpu()).to(dev)

    def kwargs(self) -> dict[str, Any]:
        """Arguments of one step's forward pass."""
        return {**self.batch.kwargs(), "use_cache": False}


class PrefixBatch:
    """Rows split before their lookup token: the prefixes' KV cache computed once, the suffixes per step.

    Layout of a step: ``[left pads | prefix]`` lives in the cache (P columns); the step's input is
    ``[pads | suffix]`` (S columns), right-aligned so every row ends at the last column (targets
    are read there, as in FullBatch). The pads between prefix and suffix are masked out and the
    position ids count real tokens only, so each row sees exactly its own sequence.
    """

    def __init__(self, model, seqs: list[list[int]], lookup: list[int], pad_id: int, dev: torch.device):
        pre = left_pad([s[:l] for s, l in zip(seqs, lookup)], pad_id, dev)
        suf = left_pad([s[l:] for s, l in zip(seqs, lookup)], pad_id, dev)
        self._cache_arg = cache_kwarg(model)
        with torch.no_grad():
            out = model(**pre.kwargs(), use_cache=True, logits_to_keep=1)
        self._cache = out[self._cache_arg]  # the prefixes' keys and values, every layer
        n_pre = pre.mask.sum(-1, keepdim=True)  # (rows, 1) real prefix tokens
        self._mask = torch.cat([pre.mask, suf.mask], dim=1)  # (rows, P + S)
        self._ids = suf.ids
        self._pos = n_pre + suf.pos  # a suffix token's position: the real tokens before it
        self.shape = tuple(suf.ids.shape)
        self.look = suf.offset.clone()  # the lookup token opens each suffix

    def kwargs(self) -> dict[str, Any]:
        """Arguments of one step's forward pass: the suffixes against a fresh copy of the prefix cache
        (a forward pass appends to the cache it is given)."""
        return {"input_ids": self._ids, "attention_mask": self._mask, "position_ids": self._pos, "use_cache": True,
                self._cache_arg: copy.deepcopy(self._cache)}


# What one more forward-and-backward pass costs beyond its tokens, in tokens: per-layer Python and
# kernel overhead, and under autocast a low-precision cast of every weight, forward and backward.
# Measured on SmolLM2-135M (2-core CPU, bfloat16): ~2 ms per token per step, ~70 ms per pass. On an
# accelerator a pass of a few hundred tokens costs its launches, not its tokens.
PASS_COST_TOKENS = {"cpu": 32}
PASS_COST_TOKENS_ACCELERATOR = 512


def length_groups(lengths: list[int], pass_cost: int) -> list[list[int]]:
    """Group rows so that padded tokens plus ``pass_cost`` per group are fewest.

    Rows of equal length always share a group; groups are runs of the sorted distinct lengths
    (a dynamic programme over them, each group padded to its longest row).

    Args:
        lengths: tokens each row runs per step.
        pass_cost: the cost of one more group, in tokens.

    Returns:
        Row indices per group, shortest rows first; every row in exactly one group.
    """
    values = sorted(set(lengths))
    count = [sum(1 for x in lengths if x == v) for v in values]
    best = [0.0] + [float("inf")] * len(values)  # best[j]: cost of the first j distinct lengths
    cut = [0] * (len(values) + 1)
    for j in range(1, len(values) + 1):
        rows = 0
        for i in range(j, 0, -1):  # group = values[i-1 .. j-1], padded to values[j-1]
            rows += count[i - 1]
            cost = best[i - 1] + pass_cost + rows * values[j - 1]
            if cost < best[j]:
                best[j], cut[j] = cost, i - 1
    spans, j = [], len(values)
    while j > 0:
        spans.append((values[cut[j]], values[j - 1]))
        j = cut[j]
    return [[r for r, x in enumerate(lengths) if lo <= x <= hi] for lo, hi in reversed(spans)]


@dataclass
class Part:
    """One group of rows: ``rows`` (k,) their indices among all rows, ``batch`` how they run."""

    rows: torch.Tensor
    batch: FullBatch | PrefixBatch


class RowGroups:
    """All rows, run as a few batches of similar length (``length_groups``).

    Attributes:
        parts: the groups, each a ``Part``.
        order: (rows,) position of each row in the groups' concatenation: ``cat(per part)[order]``
            puts per-part results back in row order.
    """

    def __init__(self, model, seqs: list[list[int]], lookup: list[int], pad_id: int, dev: torch.device,
                 cached: bool = True, pass_cost: int | None = None):
        """Args:
            seqs, lookup: each row's token ids and its lookup token's index.
            pad_id, dev: the pad token and the device of the model's inputs.
            cached: run each row from its lookup token on against a KV cache of the rest
                (``PrefixBatch``) where every row has a prefix, else whole (``FullBatch``).
            pass_cost: overrides the device's ``PASS_COST_TOKENS``.
        """
        prefixed = cached and min(lookup) > 0  # a lookup at position 0 has no prefix to cache
        steps = [len(s) - l if prefixed else len(s) for s, l in zip(seqs, lookup)]
        if pass_cost is None:
            pass_cost = PASS_COST_TOKENS.get(dev.type, PASS_COST_TOKENS_ACCELERATOR)
        kind = PrefixBatch if prefixed else FullBatch
        self.parts = [Part(torch.tensor(g, device=dev),
                           kind(model, [seqs[i] for i in g], [lookup[i] for i in g], pad_id, dev))
                      for g in length_groups(steps, pass_cost)]
        self.order = torch.argsort(torch.cat([p.rows for p in self.parts]))

