"""Per-request cache of the targets stage (zu's addition): z and the sensitive vectors of a request
already optimised on the same weights with the same settings are read back, not recomputed.

The targets stage is most of an edit (docs/results.md, "Speed, measured"), and each request's
delta depends only on its own rows (``edit.edit_targets``), so a request can be cached on its
own. A rerun then pays only for requests it has not seen. This covers a run that failed at
``--out``, a change of solver settings, and the same requests edited again with another
``--config``. Entries live under ``ZU_CACHE_DIR/targets`` on the operator's machine, like the
statistics: vectors, no text. Each entry's name is a digest of the request's text together with
the weights' fingerprint and the settings. ``cache_targets: false`` in ``--config`` turns it off.
"""

from __future__ import annotations

import hashlib
import json

import torch

from .config import Hyper
from .requests import Request
from .stats import read_entry, write_entry

VERSION = "v1"
# Hyper fields the targets stage reads; batch sizes and the prefix cache change how, not what.
STAGE_PREFIXES = ("z_", "sens_")


def request_keys(fingerprint: str, requests: list[Request], neutral: list[list[int]], layers: list[int],
                 templates: list[str], hp: Hyper, sensitive: str, dtype: str) -> list[str]:
    """One cache key per request.

    Args:
        fingerprint: the input weights' fingerprint (their file digests).
        requests, neutral, layers, templates, hp, sensitive: as for ``edit.edit_targets``.
        dtype: the optimisation's resolved precision (``budget.optim_dtype``).

    Returns:
        Hex digests, one per request, in order.
    """
    # A setting left at "" (off) is left out, so that adding one keeps the keys of earlier targets.
    stage = {k: v for k, v in hp.to_dict().items() if k.startswith(STAGE_PREFIXES) and v != ""}
    common = json.dumps([VERSION, fingerprint, layers, templates, stage, sensitive, dtype], sort_keys=True)
    return [hashlib.sha256(json.dumps([common, r.prompt, r.subject, r.target, t]).encode()).hexdigest()[:40]
            for r, t in zip(requests, neutral)]


def load(key: str, layers: list[int]) -> tuple[torch.Tensor, torch.Tensor, dict[int, torch.Tensor]] | None:
    """One request's (z, probability (1,), layer -> sensitive vector (1, d)), or None if absent or unreadable."""
    t = read_entry("targets", key)
    try:
        return None if t is None else (t["z"][None], t["prob"], {l: t["sens"][i][None] for i, l in enumerate(layers)})
    except (KeyError, IndexError):  # a damaged entry is recomputed, not fatal
        return None


def store(key: str, z: torch.Tensor, prob: torch.Tensor, sens: torch.Tensor) -> None:
    """Write one request's targets atomically.

    Args:
        z: (d,) or (layers, d); prob: (1,); sens: (layers, d).
    """
    write_entry("targets", key, {"z": z, "prob": prob, "sens": sens})


def cached_targets(keys: list[str], layers: list[int], compute) -> tuple[tuple, int]:
    """``edit.edit_targets``' result for every request, computing (one call) only the uncached ones.

    Args:
        keys: ``request_keys`` for the requests.
        layers: the edited layers (the sensitive vectors' order).
        compute: indices of the missing requests -> ``edit.edit_targets``' result for them.

    Returns:
        ((z, probability, layer -> M_f) over all requests, in order; number read from the cache).
    """
    found = {i: hit for i, k in enumerate(keys) if (hit := load(k, layers)) is not None}
    missing = [i for i in range(len(keys)) if i not in found]
    if missing:
        z, prob, sens = compute(missing)
        for j, i in enumerate(missing):
            found[i] = z[j:j + 1], prob[j:j + 1], {l: sens[l][j:j + 1] for l in layers}
            store(keys[i], z[j], prob[j:j + 1], torch.stack([sens[l][j] for l in layers]))
    parts = [found[i] for i in range(len(keys))]
    return ((torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
             {l: torch.cat([p[2][l] for p in parts]) for l in layers}), len(keys) - len(missing))
