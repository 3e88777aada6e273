"""Rows for the delta optimisation, run so that only what the delta can change is recomputed.

The delta is added at each row's lookup token. Every position before it, in every layer, does not
depend on the delta: ``PrefixBatch`` runs those prefixes once, keeps their keys and values (a KV
cache), and each optimisation step runs only the suffix (the lookup token onwards) against that
cache. ``FullBatch`` is the plain path (every token every step), used when a row has no prefix.
"""

from __future__ import annotations

import copy
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


def row_batch(model, seqs: list[list[int]], lookup: list[int], pad_id: int, dev: torch.device, cached: bool = True):
    """``PrefixBatch`` where every row has a prefix (a lookup token after position 0), else ``FullBatch``."""
    if cached and min(lookup) > 0:
        return PrefixBatch(model, seqs, lookup, pad_id, dev)
    return FullBatch(model, seqs, lookup, pad_id, dev)
