"""Requests over time (issue 28): an edit of an edited checkpoint records its parent, carries the
parent's signed manifest under ``zu-history/`` and so the whole chain travels with the checkpoint;
``zu log`` lists it and ``zu verify`` checks every link.

A link is one signed manifest. Link 1 is the checkpoint's own (top level); its predicate's
``lineage.parent`` names the folder holding link 2's files, the sha256 of link 2's manifest, its
signer's key id and its request count; and so on down to the first edit. No request text enters
the chain: the manifests hold commitments only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .manifest import ENVELOPE, MANIFEST, SIGNATURE, SIGNING_FILES, sha256_file

HISTORY = "zu-history"


def parent_record(src: Path, fingerprint: str) -> dict[str, Any]:
    """The ``lineage`` entry of a new edit of ``src``.

    Args:
        src: the input checkpoint folder.
        fingerprint: the input's weights fingerprint (``manifest.sha256_file_list`` of its files).

    Returns:
        ``{"depth": 1, "base_fingerprint": fingerprint}`` for a first edit; for an edit of a zu
        output also ``parent`` (``manifest_sha256``, ``keyid``, ``requests``, ``history``: the folder its
        files go to) and the parent's base fingerprint, so the base model's calibration and
        statistics serve every round.
    """
    if not (src / MANIFEST).is_file():
        return {"depth": 1, "base_fingerprint": fingerprint}
    stmt = json.loads((src / MANIFEST).read_text())
    pred = stmt.get("predicate", {})
    before = pred.get("lineage", {})
    digest = sha256_file(src / MANIFEST)
    depth = int(before.get("depth", 1))
    return {"depth": depth + 1, "base_fingerprint": before.get("base_fingerprint", fingerprint),
            "parent": {"manifest_sha256": digest, "keyid": pred.get("signer", {}).get("keyid"),
                       "requests": pred.get("requests", {}).get("count"),
                       "history": f"{HISTORY}/{depth:03d}-{digest[:12]}"}}


def carry_parent(tmp: Path, lineage: dict[str, Any]) -> None:
    """Move the parent's signing files, copied with the checkpoint, into its history folder."""
    parent = lineage.get("parent")
    if not parent:
        return
    dest = tmp / parent["history"]
    dest.mkdir(parents=True, exist_ok=True)
    for name in SIGNING_FILES:
        if (tmp / name).is_file():
            os.replace(tmp / name, dest / name)


@dataclass
class Link:
    """One signed manifest of the chain, newest first (``index`` 1 is the checkpoint's own)."""

    index: int
    folder: str  # "." or the history folder
    statement: dict[str, Any] = field(repr=False)

    def summary(self) -> dict[str, Any]:
        """When, what, by whom: the row ``zu log`` prints (no request text exists to print)."""
        pred = self.statement.get("predicate", {})
        edit = pred.get("edit", {})
        return {"link": self.index, "folder": self.folder, "created": pred.get("created"),
                "variant": edit.get("variant"), "layers": edit.get("layers"),
                "requests": pred.get("requests", {}).get("count"), "keyid": pred.get("signer", {}).get("keyid"),
                "rebased": bool(pred.get("lineage", {}).get("rebased")),
                "signature": pred.get("signer", {}).get("format", "zu-dsse")}


def chain(model_dir: Path) -> tuple[list[Link], list[str]]:
    """Every link, newest first, and the problems that break the chain (each naming its link).

    A link holds when its folder has the manifest its child names (same sha256), signed by the key
    its child names, with the request count its child names, the signature verifying, and when the
    child's recorded input files are the parent's listed outputs (the child edited exactly it).

    Returns:
        (links, problems); problems is empty for a genuine chain.
    """
    from .errors import IntegrityError

    links: list[Link] = []
    problems: list[str] = []
    try:
        stmt = json.loads((model_dir / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{model_dir / MANIFEST}: cannot read the manifest ({type(exc).__name__})") from exc
    links.append(Link(1, ".", stmt))
    seen = set()
    while (parent := links[-1].statement.get("predicate", {}).get("lineage", {}).get("parent")):
        index, folder = len(links) + 1, str(parent.get("history", ""))
        where = f"link {index} ({folder})"
        if folder in seen or not folder.startswith(f"{HISTORY}/"):
            problems.append(f"{where}: not a history folder of this checkpoint")
            break
        seen.add(folder)
        parent_stmt, why = _read_link(model_dir / folder, parent)
        if why:
            problems.append(f"{where}: {why}")
            break
        links.append(Link(index, folder, parent_stmt))
        problems += [f"{where}: {p}" for p in _continuity(links[-2].statement, parent_stmt)]
    return links, problems


def _read_link(folder: Path, parent: dict[str, Any]) -> tuple[dict[str, Any], str | None]:
    """The parent's statement after checking it against the child's record and its signature."""
    man = folder / MANIFEST
    if not man.is_file():
        return {}, f"{man}: missing"
    if sha256_file(man) != parent.get("manifest_sha256"):
        return {}, f"{man}: sha256 differs from the one its child edit records"
    try:
        stmt = json.loads(man.read_bytes())
        signer = stmt["predicate"]["signer"]
    except (ValueError, KeyError, TypeError) as exc:
        return {}, f"{man}: not a zu manifest ({type(exc).__name__})"
    if signer.get("keyid") != parent.get("keyid"):
        return {}, f"{man}: signed by {signer.get('keyid')}, the child edit records {parent.get('keyid')}"
    if stmt["predicate"].get("requests", {}).get("count") != parent.get("requests"):
        return {}, f"{man}: request count differs from the child edit's record"
    return stmt, _signature_problem(folder, man, signer)


def _signature_problem(folder: Path, man: Path, signer: dict[str, Any]) -> str | None:
    """Check the link's own signature: its bundle (without the files it covered, which the next
    edit changed) and the manifest's digest in it, or its DSSE envelope."""
    from cryptography.hazmat.primitives import serialization

    from .integrity import IntegrityReport, read_statement
    from .keys import fingerprint

    try:
        if fingerprint(serialization.load_pem_public_key(signer["public_key"].encode())) != signer["keyid"]:
            return f"{man}: the embedded public key does not match its key id"
    except (ValueError, KeyError) as exc:
        return f"{man}: signer unusable ({exc})"
    if (folder / SIGNATURE).is_file():
        from .signing import bundle_digests

        try:
            digests = bundle_digests(folder / SIGNATURE, signer["public_key"])
        except ValueError as exc:
            return f"{folder / SIGNATURE}: {exc}"
        return None if digests.get(MANIFEST) == sha256_file(man) else \
            f"{folder / SIGNATURE}: does not sign this {MANIFEST}"
    if (folder / ENVELOPE).is_file():
        report = IntegrityReport()
        read_statement(folder, report)
        return report.problems[0] if report.problems else None
    return f"{folder}: no signature ({SIGNATURE} or {ENVELOPE})"


def _continuity(child: dict[str, Any], parent: dict[str, Any]) -> list[str]:
    """The child's input was the parent's output: every file the parent lists, same sha256. A
    rebased child (``zu unlearn --base``) edited the chain's original instead: its input's
    fingerprint is the chain's base fingerprint, which the parent records too."""
    from .manifest import sha256_file_list

    pred = child.get("predicate", {})
    inputs = pred.get("source", {}).get("files", {})
    if pred.get("lineage", {}).get("rebased"):
        base = parent.get("predicate", {}).get("lineage", {}).get("base_fingerprint")
        return [] if sha256_file_list(inputs) == base == pred["lineage"].get("base_fingerprint") else \
            ["the child edit re-edited a base other than this chain's original"]
    return [f"{s['name']}: the child edit's input differs from this edit's output"
            for s in parent.get("subject", []) if inputs.get(s["name"]) != s["digest"]["sha256"]]
