"""Requests over time without compounding (issue 28): ``zu unlearn --base DIR``.

A round normally edits the previous round's output, so every round's update lands on top of the
last and their side effects add up (docs/results.md, "Requests over time": perplexity +15.4 %
after 16 rounds against +8.0 % for one edit of the same facts). With ``--base`` the round edits
the chain's original weights instead, with every request so far (``--previous`` and
``--forget``) as one edit, and still extends the history of ``--model``, the checkpoint it
replaces. Requests already optimised on the base come from the targets cache
(``targets_cache``), so a round pays the targets stage for its new requests only.

What it needs from the operator: the original checkpoint and every earlier request file, both
already on the operator's side; nothing enters the published checkpoint but commitments.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from .errors import InputFileError, UsageError
from .lineage import HISTORY, chain
from .manifest import SIGNING_FILES


def forgotten_so_far(model_dir: Path) -> int:
    """How many requests the chain ending at ``model_dir`` has forgotten: each link's count,
    down to and including the newest rebased link (its count already holds all earlier ones)."""
    total = 0
    for link in chain(model_dir)[0]:
        pred = link.statement.get("predicate", {})
        total += int(pred.get("requests", {}).get("count") or 0)
        if pred.get("lineage", {}).get("rebased"):
            break
    return total


def rebased_lineage(model_dir: Path, lineage: dict[str, Any], base_fingerprint: str, previous: int,
                    base_dir: Path) -> dict[str, Any]:
    """The ``lineage`` of a ``--base`` edit, after refusing one that would not reproduce the
    chain's forgetting.

    Args:
        model_dir: ``--model``, the checkpoint this edit replaces (a zu output).
        lineage: ``pipeline.input_lineage`` of ``model_dir``.
        base_fingerprint: the fingerprint of ``--base``'s files (``manifest.sha256_file_list``).
        previous: how many requests ``--previous`` gives.
        base_dir: ``--base``, for the messages.

    Returns:
        ``lineage`` with ``rebased``: ``{"previous_requests": previous}``.

    Raises:
        UsageError: ``--model`` is not a verified zu output, ``--base`` is not the chain's
            original, or ``--previous`` holds fewer requests than the chain forgot (exit 2).
    """
    if "parent" not in lineage:
        raise UsageError(f"--model {model_dir}: not a zu output whose manifest verifies; --base re-edits a chain",
                         hint="without a chain, edit the original directly: --model BASE")
    if lineage["base_fingerprint"] != base_fingerprint:
        raise UsageError(f"--base {base_dir}: its files differ from the checkpoint the chain of {model_dir} began "
                         "with", hint="pass the unedited checkpoint the first round edited, unchanged")
    need = forgotten_so_far(model_dir)
    if previous < need:
        raise UsageError(f"--previous: {previous} requests, but the chain of {model_dir} forgot {need}; an edit of "
                         "--base without them would bring them back", hint="pass every earlier round's request file")
    return {**lineage, "rebased": {"previous_requests": previous}}


def every_request(earlier: list, requests: list) -> list:
    """``--previous`` then ``--forget``: the requests of one edit, each id once.

    Raises:
        InputFileError: two requests share an id (exit 2): the manifest commits to each id once.
    """
    seen: dict[str, Any] = {}
    for r in [*earlier, *requests]:
        if r.id in seen:
            raise InputFileError(f"{r.where}: field 'id': {r.id!r} is also at {seen[r.id].where}; with --base every "
                                 "request so far is part of one edit", hint="give each request its own \"id\"")
        seen[r.id] = r
    return list(seen.values())


def carry_history(tmp: Path, parent_dir: Path, lineage: dict[str, Any]) -> None:
    """Copy ``--model``'s history and signing files into the new output (``tmp``, built from
    ``--base``, which holds neither), where ``lineage.carry_parent`` would have moved them."""
    if (parent_dir / HISTORY).is_dir():
        shutil.copytree(parent_dir / HISTORY, tmp / HISTORY, dirs_exist_ok=True)
    dest = tmp / lineage["parent"]["history"]
    dest.mkdir(parents=True, exist_ok=True)
    for name in SIGNING_FILES:
        if (parent_dir / name).is_file():
            shutil.copyfile(parent_dir / name, dest / name)
