"""Checking a signed checkpoint (design §3): signature, signer pinning, file digests, edited tensors;
membership proofs from the operator's receipt."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ZuError
from .manifest import (COMMITMENT_V1, ENVELOPE, MANIFEST, PAYLOAD_TYPE, SIGNATURE, SIGNING_FILES, STATEMENT_TYPE,
                       commitments, pae, sha256_file, sha256_tensor)

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
        links: signed manifests in the checkpoint's history chain, its own included (lineage.py).
        statement: the verified statement (None until the signature checked out).
    """

    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    keyid: str | None = None
    pinned: bool = False
    files: int = 0
    tensors: int = 0
    links: int = 0
    statement: dict[str, Any] | None = field(default=None, repr=False)

    def to_json(self) -> dict[str, Any]:
        """The report for ``--json`` (the statement itself is not repeated)."""
        return {"problems": self.problems, "warnings": self.warnings, "keyid": self.keyid, "pinned": self.pinned,
                "files": self.files, "tensors": self.tensors, "links": self.links}

    @property
    def ok(self) -> bool:
        """No problem found."""
        return not self.problems


def read_statement(model_dir: Path, report: IntegrityReport) -> dict[str, Any] | None:
    """Check the folder's signature and return the statement it vouches for.

    ``model.sig`` (model-signing, EC keys) is checked with the model_signing library over every
    file; ``zu-manifest.dsse.json`` (Ed25519) is checked here. Problems go to ``report``; returns
    None when nothing more can be checked.
    """
    from .keys import verify_signature

    env_path, man_path = model_dir / ENVELOPE, model_dir / MANIFEST
    if (model_dir / SIGNATURE).is_file() and not env_path.is_file():
        return _read_bundle_signed(model_dir, report)
    if not env_path.is_file():
        report.problems.append(f"{model_dir}: no signed manifest (neither {SIGNATURE} nor {ENVELOPE}; was this "
                               "written by zu unlearn?)")
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


def _read_bundle_signed(model_dir: Path, report: IntegrityReport) -> dict[str, Any] | None:
    """The statement of a folder signed with model-signing, after the library checked the bundle
    (with the signer key the statement embeds; pinning is ``check_integrity``'s) and every file."""
    from cryptography.hazmat.primitives import serialization

    from .keys import fingerprint
    from .signing import verify_dir

    man_path = model_dir / MANIFEST
    try:
        stmt = json.loads(man_path.read_bytes())
        signer = stmt["predicate"]["signer"]
        report.keyid = signer["keyid"]
        if fingerprint(serialization.load_pem_public_key(signer["public_key"].encode())) != report.keyid:
            raise ValueError("the embedded public key does not match its key id")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        report.problems.append(f"{man_path}: not a readable zu manifest ({type(exc).__name__}: {exc})")
        return None
    problem = verify_dir(model_dir, signer["public_key"])
    if problem is None:
        return stmt
    report.problems.append(problem)
    # A file that differs is named again by the per-file checks below; a bad signature ends here.
    return None if "signature does not verify" in problem else stmt


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
    report.statement = stmt
    if public_key is not None:
        report.pinned = fingerprint(public_key) == report.keyid
        if not report.pinned:
            report.problems.append(f"{model_dir / MANIFEST}: signed by key {report.keyid[:16]}…, not the pinned "
                                   f"key {fingerprint(public_key)[:16]}…")
    elif require_key:
        report.problems.append(f"{model_dir / MANIFEST}: --require-key given but no --public-key to pin")
    else:
        report.warnings.append(f"valid signature by key {report.keyid[:16]}…, which is not pinned "
                               "(pass --public-key to require it)")
    listed = {s["name"]: s["digest"]["sha256"] for s in stmt.get("subject", [])}
    actual = {str(p.relative_to(model_dir)) for p in model_dir.rglob("*") if p.is_file()} - SIGNING_FILES
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
    _check_chain(model_dir, report)
    return report


def _check_chain(model_dir: Path, report: IntegrityReport) -> None:
    """Every earlier edit's signed manifest in ``zu-history/`` links to the next (lineage.chain)."""
    from .lineage import chain

    links, problems = chain(model_dir)
    report.links = len(links)
    report.problems += problems
    keys = list(dict.fromkeys(link.summary()["keyid"] for link in links))
    if len(keys) > 1:
        report.warnings.append(f"the history was signed by {len(keys)} keys: " + ", ".join(k[:16] + "…" for k in keys))


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
    # Manifests before the identity scheme committed to the whole request (docs/manifest.md).
    mine = commitments(requests, salt, stmt["predicate"]["requests"].get("commitment", COMMITMENT_V1))
    values = set(listed.values())
    return [{"id": rid, "commitment": c, "in_manifest": c in values} for rid, c in mine.items()]


def read_manifest(model: Path) -> dict[str, Any]:
    """The statement in ``model/zu-manifest.json`` (not verified).

    Raises:
        IntegrityError: missing or not JSON (exit 4).
    """
    from .errors import IntegrityError

    try:
        return json.loads((Path(model) / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"{Path(model) / MANIFEST}: cannot read the manifest ({type(exc).__name__})") from exc
