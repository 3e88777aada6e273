"""Edit manifest (design §3): an in-toto Statement v1 of what was changed, signed as a DSSE envelope.

The output directory holds ``zu-manifest.json`` (the canonical statement, readable) and
``zu-manifest.dsse.json`` (the DSSE envelope whose payload is exactly those bytes). The salt of the
request commitments goes to a receipt outside the checkpoint.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import ZuError

MANIFEST = "zu-manifest.json"
ENVELOPE = "zu-manifest.dsse.json"
PAYLOAD_TYPE = "application/vnd.in-toto+json"
STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://zu.dev/unlearn/v1"


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


def commitments(requests: list, salt: bytes) -> dict[str, str]:
    """Request id -> HMAC-SHA256(salt, canonical request): proves membership without revealing it."""
    return {r.id: hmac.new(salt, canonical_json(r.canonical()), hashlib.sha256).hexdigest() for r in requests}


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
    """The in-toto Statement over every file in ``out_dir`` (the manifest files excluded)."""
    subject = [{"name": name, "digest": {"sha256": digest}}
               for name, digest in dir_digests(out_dir, skip={MANIFEST, ENVELOPE}).items()]
    return {"_type": STATEMENT_TYPE, "subject": subject, "predicateType": PREDICATE_TYPE, "predicate": predicate}


def pae(payload_type: str, payload: bytes) -> bytes:
    """DSSE v1 pre-authentication encoding: the exact bytes that are signed."""
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def write_manifest(out_dir: Path, predicate: dict[str, Any], key) -> dict[str, Any]:
    """Write the canonical statement and its DSSE envelope signed with ``key`` into ``out_dir``.

    Args:
        out_dir: the (temporary) output checkpoint directory, complete but for the manifest.
        predicate: the edit record (design §3); the signer's public key is added to it.
        key: a ``keys.SigningKey``.

    Returns:
        The statement written.
    """
    predicate = {**predicate, "signer": {"keyid": key.keyid, "algorithm": key.algorithm,
                                         "public_key": key.public_pem}}
    stmt = statement(out_dir, predicate)
    payload = canonical_json(stmt)
    envelope = {"payloadType": PAYLOAD_TYPE, "payload": base64.b64encode(payload).decode(),
                "signatures": [{"keyid": key.keyid,
                                "sig": base64.b64encode(key.sign(pae(PAYLOAD_TYPE, payload))).decode()}]}
    (out_dir / MANIFEST).write_bytes(payload)
    (out_dir / ENVELOPE).write_bytes(json.dumps(envelope, indent=2).encode() + b"\n")
    return stmt


def write_receipt(path: Path, salt: bytes, commits: dict[str, str]) -> None:
    """The operator's receipt: the salt and id -> commitment, kept outside the checkpoint (mode 0600)."""
    body = {"salt": salt.hex(), "commitments": commits, "algorithm": "HMAC-SHA256(salt, canonical request JSON)"}
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(canonical_json(body) + b"\n")
    os.replace(tmp, path)


def sha256_file_list(digests: dict[str, str]) -> str:
    """One digest naming a whole set of files (for cache keys): sha256 of the canonical mapping."""
    return hashlib.sha256(canonical_json(digests)).hexdigest()


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx", ".py")


@dataclass
class IntegrityReport:
    """What ``zu verify`` found about a checkpoint's manifest.

    Attributes:
        problems: each a one-line failure naming the file (empty = intact).
        warnings: things worth saying that do not fail (unpinned signer, unlisted non-weight files).
        keyid: the signer's key id, when the envelope could be read.
        pinned: the signer matches ``--public-key``.
        files: number of listed files whose digest was checked.
        tensors: number of edited tensors checked against the manifest.
    """

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    keyid: str | None = None
    pinned: bool = False
    files: int = 0
    tensors: int = 0

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


def read_statement(model_dir: Path, report: IntegrityReport) -> dict[str, Any] | None:
    """Open the DSSE envelope and return its statement after the signature checks out.

    Problems go to ``report``; returns None when nothing more can be checked.
    """
    from .keys import verify_signature

    env_path, man_path = model_dir / ENVELOPE, model_dir / MANIFEST
    if not env_path.is_file():
        report.problems.append(f"{env_path}: missing (no signed manifest; was this written by zu unlearn?)")
        return None
    try:
        env = json.loads(env_path.read_text())
        payload = base64.b64decode(env["payload"], validate=True)
        sigs = env["signatures"]
        stmt = json.loads(payload)
        signer = stmt["predicate"]["signer"]
    except (ValueError, KeyError, TypeError) as exc:
        report.problems.append(f"{env_path}: not a zu DSSE envelope ({type(exc).__name__}: {exc})")
        return None
    if env.get("payloadType") != PAYLOAD_TYPE or stmt.get("_type") != STATEMENT_TYPE:
        report.problems.append(f"{env_path}: payload is not an in-toto statement ({env.get('payloadType')})")
        return None
    report.keyid = signer.get("keyid")
    mine = [s for s in sigs if isinstance(s, dict) and s.get("keyid") == report.keyid]
    if not mine:
        report.problems.append(f"{env_path}: no signature by the signer the statement names ({report.keyid})")
        return None
    try:
        from cryptography.hazmat.primitives import serialization

        from .keys import fingerprint

        if fingerprint(serialization.load_pem_public_key(signer["public_key"].encode())) != report.keyid:
            raise ValueError("the embedded public key does not match its key id")
        verify_signature(signer["public_key"], base64.b64decode(mine[0]["sig"]), pae(PAYLOAD_TYPE, payload),
                         str(env_path))
    except ZuError as exc:
        report.problems.append(exc.message)
        return None
    except (ValueError, KeyError, TypeError) as exc:
        report.problems.append(f"{env_path}: signer unusable ({exc})")
        return None
    if not man_path.is_file() or man_path.read_bytes() != payload:
        report.problems.append(f"{man_path}: differs from the signed payload in {ENVELOPE}")
    return stmt


def check_integrity(model_dir: Path, public_key=None, require_key: bool = False) -> IntegrityReport:
    """Signature, signer pinning, every file's digest, unlisted weight files, edited tensors.

    Args:
        model_dir: a checkpoint written by ``zu unlearn``.
        public_key: the pinned public key object (``--public-key``), or None.
        require_key: an unpinned signer is a failure instead of a warning.

    Returns:
        The IntegrityReport; the caller decides the exit code (4 when not ``ok``).
    """
    from .keys import fingerprint

    report = IntegrityReport()
    stmt = read_statement(model_dir, report)
    if stmt is None:
        return report
    if public_key is not None:
        report.pinned = fingerprint(public_key) == report.keyid
        if not report.pinned:
            report.problems.append(f"{model_dir / ENVELOPE}: signed by key {report.keyid[:16]}…, not the pinned "
                                   f"key {fingerprint(public_key)[:16]}…")
    elif require_key:
        report.problems.append(f"{model_dir / ENVELOPE}: --require-key given but no --public-key to pin")
    else:
        report.warnings.append(f"valid signature by key {report.keyid[:16]}…, which is not pinned "
                               "(pass --public-key to require it)")
    listed = {s["name"]: s["digest"]["sha256"] for s in stmt.get("subject", [])}
    actual = {str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()} - {MANIFEST, ENVELOPE}
    for name in sorted(listed):
        path = model_dir / name
        if name not in actual:
            report.problems.append(f"{path}: listed in the manifest but missing")
        elif sha256_file(path) != listed[name]:
            report.problems.append(f"{path}: sha256 differs from the manifest")
        else:
            report.files += 1
    for name in sorted(actual - set(listed)):
        if name.endswith(WEIGHT_SUFFIXES):
            report.problems.append(f"{model_dir / name}: weight file not listed in the manifest")
        else:
            report.warnings.append(f"{model_dir / name}: not listed in the manifest")
    _check_tensors(model_dir, stmt["predicate"].get("tensors", []), report)
    return report


def _check_tensors(model_dir: Path, tensors: list[dict[str, Any]], report: IntegrityReport) -> None:
    """Each edited tensor is present with the manifest's shape, dtype and sha256."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    try:
        wmap = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    except (ValueError, KeyError) as exc:
        report.problems.append(f"{index}: unreadable ({exc})")
        return
    for t in tensors:
        shard = model_dir / (wmap.get(t["name"], "") if wmap is not None else "model.safetensors")
        try:
            with safe_open(shard, framework="pt") as f:
                tensor = f.get_tensor(t["name"])
        except Exception as exc:  # safetensors raises several types for missing/corrupt files
            report.problems.append(f"{shard}: edited tensor {t['name']} unreadable ({type(exc).__name__})")
            continue
        if (list(tensor.shape) != t["shape"] or str(tensor.dtype) != t["dtype"]
                or sha256_tensor(tensor) != t["sha256_after"]):
            report.problems.append(f"{shard}: tensor {t['name']} differs from the manifest")
        else:
            report.tensors += 1


def prove(stmt: dict[str, Any], receipt: Path, requests: list) -> list[dict[str, Any]]:
    """Which of ``requests`` were part of the edit, from the operator's receipt (its salt).

    Returns:
        Per request: id, its commitment under the receipt's salt, and whether the manifest lists it.

    Raises:
        InputFileError: the receipt is unreadable (exit 2).
        IntegrityError: the receipt's commitments are not the manifest's (exit 4).
    """
    from .errors import InputFileError, IntegrityError

    try:
        body = json.loads(Path(receipt).read_text())
        salt = bytes.fromhex(body["salt"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputFileError(f"{receipt}: not a zu receipt ({type(exc).__name__})") from exc
    listed = stmt["predicate"]["requests"]["commitments"]
    if body.get("commitments") != listed:
        raise IntegrityError(f"{receipt}: its commitments are not this manifest's (receipt of another edit?)")
    mine = commitments(requests, salt)
    values = set(listed.values())
    return [{"id": rid, "commitment": c, "in_manifest": c in values} for rid, c in mine.items()]
