"""Edit manifest (design §3): an in-toto Statement v1 of what was changed, signed as a DSSE envelope.

The output directory holds ``zu-manifest.json`` (the canonical statement, readable), signed either by
``model.sig`` (an OpenSSF model-signing bundle over every file, EC keys: signing.py) or by
``zu-manifest.dsse.json`` (zu's DSSE envelope whose payload is exactly those bytes: Ed25519 keys,
which model-signing does not take). The salt of the request commitments goes to a receipt outside
the checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import platform
from pathlib import Path
from typing import Any

from . import __version__

MANIFEST = "zu-manifest.json"
ENVELOPE = "zu-manifest.dsse.json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://zu.dev/unlearn/v1"


SIGNATURE = "model.sig"  # signing.SIGNATURE, named here too so reading a manifest needs no model_signing
# The files that sign a checkpoint rather than belong to it: no statement lists them.
SIGNING_FILES = frozenset({MANIFEST, ENVELOPE, SIGNATURE})


def signature_format(algorithm: str) -> tuple[str, str]:
    """(``signer.format``, file) a key of ``algorithm`` signs with: model-signing takes EC keys
    only, so Ed25519 keys sign zu's own DSSE envelope."""
    return ("zu-dsse", ENVELOPE) if algorithm == "ed25519" else ("model-signing", SIGNATURE)


def has_manifest(path: Path) -> bool:
    """Whether the directory holds a zu manifest (any of its files)."""
    return any((Path(path) / name).is_file() for name in SIGNING_FILES)


def canonical_json(obj: Any) -> bytes:
    """Canonical JSON bytes: sorted keys, no insignificant whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def sha256_file(path: Path, block: int = 1 << 22) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            h.update(chunk)
    return h.hexdigest()


def sha256_tensor(t) -> str:
    """Hex sha256 of a tensor's raw bytes (contiguous, on CPU, in its own dtype)."""
    import torch

    data = t.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes()
    return hashlib.sha256(data).hexdigest()


def dir_digests(root: Path, skip: set[str] = frozenset()) -> dict[str, str]:
    """relative path -> sha256 for every file under ``root`` (sorted)."""
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and str(p.relative_to(root)) not in skip}


# What a commitment covers. v2 (this release): the request's identity (id, prompt, subject,
# target, neutral), so the same request proves membership whatever probes travel with it. v1
# (manifests without ``requests.commitment``): the whole canonical request, probes included.
COMMITMENT = "hmac-sha256-identity-v2"
COMMITMENT_V1 = "hmac-sha256-request-v1"


def commitments(requests: list, salt: bytes, scheme: str = COMMITMENT) -> dict[str, str]:
    """Request id -> HMAC-SHA256(salt, canonical JSON of what ``scheme`` covers): proves membership
    without revealing the request.

    Args:
        requests: requests.Request list.
        salt: the run's salt (kept in the operator's receipt).
        scheme: ``COMMITMENT`` (identity) or ``COMMITMENT_V1`` (whole request, older manifests).
    """
    body = (lambda r: r.identity()) if scheme == COMMITMENT else (lambda r: r.canonical())
    return {r.id: hmac.new(salt, canonical_json(body(r)), hashlib.sha256).hexdigest() for r in requests}


def edit_predicate(source: dict[str, Any], edit: dict[str, Any], tensors: list[dict[str, Any]], requests: list,
                   commits: dict[str, str], include_plaintext: bool, probes: dict[str, Any], created: str,
                   lineage: dict[str, Any]) -> dict[str, Any]:
    """The manifest's predicate (docs/manifest.md), the signer excepted (``write_manifest`` adds it).

    Args:
        created: UTC time of the edit, ISO 8601.
        lineage: ``depth``, ``base_fingerprint`` and, for an edit of a zu output, ``parent`` (lineage.py).
        source: what the input was (``path_name``, file digests, ``hub`` id and revision).
        edit: the variant, layers, settings and how they were chosen.
        tensors: per edited tensor its name, shape, dtype, digests before and after, change.
        requests: the forget requests; their text enters only when ``include_plaintext``.
        commits: request id -> commitment (``commitments``).
        probes: counts of the before/after probes.
    """
    reqs: dict[str, Any] = {"count": len(requests), "commitment": COMMITMENT, "commitments": commits}
    if include_plaintext:
        reqs["plaintext"] = [r.canonical() for r in requests]
    return {"versions": versions(), "created": created, "lineage": lineage, "source": source, "edit": edit,
            "tensors": tensors, "requests": reqs, "probes": probes}


def new_salt() -> bytes:
    """32 random bytes for one run's commitments."""
    return os.urandom(32)


def versions() -> dict[str, str]:
    """Versions that shaped the edit."""
    import torch
    import transformers

    return {"zu": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def statement(out_dir: Path, predicate: dict[str, Any]) -> dict[str, Any]:
    """The in-toto Statement over every file in ``out_dir`` (the signing files excluded)."""
    subject = [{"name": name, "digest": {"sha256": digest}}
               for name, digest in dir_digests(out_dir, skip=SIGNING_FILES).items()]
    return {"_type": STATEMENT_TYPE, "subject": subject, "predicateType": PREDICATE_TYPE, "predicate": predicate}


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: the exact bytes that are signed."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def write_manifest(out_dir: Path, predicate: dict[str, Any], key) -> dict[str, Any]:
    """Write the canonical statement into ``out_dir`` and sign the folder with ``key``.

    An EC key signs with model-signing (``model.sig`` over every file, the statement included);
    an Ed25519 key signs zu's DSSE envelope of the statement. A signature of the other kind left
    by an earlier write is removed, so one folder never holds two.

    Args:
        out_dir: the (temporary) output checkpoint directory, complete but for the manifest.
        predicate: the edit record (design §3); the signer's public key is added to it.
        key: a ``keys.SigningKey``.

    Returns:
        The statement written.
    """
    predicate = {**predicate, "signer": {"keyid": key.keyid, "algorithm": key.algorithm,
                                         "public_key": key.public_pem,
                                         "format": signature_format(key.algorithm)[0]}}
    for name in SIGNING_FILES:
        (out_dir / name).unlink(missing_ok=True)
    stmt = statement(out_dir, predicate)
    payload = canonical_json(stmt)
    (out_dir / MANIFEST).write_bytes(payload)
    if predicate["signer"]["format"] == "model-signing":
        from .signing import sign_dir

        sign_dir(out_dir, key)
        return stmt
    envelope = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
                "signatures": [{"keyid": key.keyid,
                                "sig": base64.b64encode(key.sign(pae(PAYLOAD_TYPE, payload))).decode()}]}
    (out_dir / ENVELOPE).write_bytes(json.dumps(envelope, indent=2).encode() + b"\n")
    return stmt


def write_receipt(path: Path, salt: bytes, commits: dict[str, str]) -> None:
    """The operator's receipt: the salt and id -> commitment, kept outside the checkpoint (mode 0600)."""
    body = {"salt": salt.hex(), "commitments": commits, "scheme": COMMITMENT,
            "algorithm": "HMAC-SHA256(salt, canonical JSON of the request's id, prompt, subject, target, neutral)"}
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(canonical_json(body) + b"\n")
    os.replace(tmp, path)


def sha256_file_list(digests: dict[str, str]) -> str:
    """One digest naming a whole set of files (for cache keys): sha256 of the canonical mapping."""
    return hashlib.sha256(canonical_json(digests)).hexdigest()
