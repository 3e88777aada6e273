"""Signing a checkpoint the ecosystem's way: an OpenSSF model-signing bundle (``model.sig``, a sigstore
bundle whose DSSE envelope holds an in-toto statement of every file's sha256), made and checked with
the ``model_signing`` library, so ``model_signing verify key`` checks a zu output as ``zu verify`` does.

zu's edit record stays in ``zu-manifest.json`` (zu's predicate), which the bundle covers like any
other file. model-signing's key method takes EC keys only; an Ed25519 key signs zu's own DSSE
envelope instead (manifest.py), as releases before this one did.
"""

from __future__ import annotations

import os
import secrets
import tempfile
from pathlib import Path

from .manifest import SIGNATURE


def _hashing():
    """The hashing settings of ``model_signing sign/verify key`` run on the folder with
    ``--signature DIR/model.sig``: sha256 per file, the signature and git files left out."""
    from model_signing import hashing

    return hashing.Config().set_ignored_paths(paths=[SIGNATURE], ignore_git_paths=True)


def sign_dir(root: Path, key) -> Path:
    """Sign every file under ``root`` into ``root/model.sig`` with an EC ``keys.SigningKey``.

    The library reads the key from a file: it gets one encrypted with a random password that never
    leaves memory, in a private temporary folder removed at once, so no clear key touches the disk.

    Returns:
        The signature's path.
    """
    from cryptography.hazmat.primitives import serialization
    from model_signing import signing

    password = secrets.token_hex(16)
    pem = key.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.BestAvailableEncryption(password.encode()))
    with tempfile.TemporaryDirectory(prefix="zu-sign-") as tmp:
        path = Path(tmp) / "key.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        config = signing.Config().set_hashing_config(_hashing())
        # The library hands the password to cryptography as is, which wants bytes (its hint says str).
        config.use_elliptic_key_signer(private_key=path, password=password.encode()).sign(root, root / SIGNATURE)
    return root / SIGNATURE


def verify_dir(root: Path, public_pem: str) -> str | None:
    """Check ``root/model.sig`` and every file it lists with the model_signing library.

    Files it does not list are left to zu's own policy (weights and code fail, other files warn:
    docs/manifest.md); ``model_signing verify`` itself fails on any of them.

    Args:
        root: the checkpoint folder.
        public_pem: the EC public key (PEM) the bundle must be signed by.

    Returns:
        None when the signature and every file check out, else a one-line reason naming the file.
    """
    from model_signing import verifying

    with tempfile.TemporaryDirectory(prefix="zu-verify-") as tmp:
        pub = Path(tmp) / "key.pub"
        pub.write_text(public_pem)
        try:
            (verifying.Config().use_elliptic_key_verifier(public_key=pub).set_hashing_config(_hashing())
             .set_ignore_unsigned_files(True).verify(root, root / SIGNATURE))
        except Exception as exc:  # the library raises ValueError, InvalidSignature and parse errors
            return f"{root / SIGNATURE}: {_reason(exc)}"
    return None


def bundle_digests(sig: Path, public_pem: str) -> dict[str, str]:
    """The per-file sha256 digests a bundle signs, after checking its signature (not the files).

    A checkpoint's history keeps each earlier manifest with its bundle but not the files that
    bundle covered, so a link is checked this way: the signature, then the manifest's digest in it.

    Raises:
        ValueError: the bundle is unreadable or its signature does not verify with ``public_pem``.
    """
    from model_signing._signing import sign_ec_key, sign_sigstore_pb  # no public call checks a bundle alone

    with tempfile.TemporaryDirectory(prefix="zu-verify-") as tmp:
        pub = Path(tmp) / "key.pub"
        pub.write_text(public_pem)
        try:
            manifest = sign_ec_key.Verifier(pub).verify(sign_sigstore_pb.Signature.read(sig))
        except Exception as exc:
            raise ValueError(_reason(exc)) from exc
    return {str(rd.identifier): rd.digest.digest_hex for rd in manifest.resource_descriptors()}


def _reason(exc: Exception) -> str:
    """One line for a refusal: the library names a file that differs ("Signature mismatch: …");
    anything else (a bad signature, another key, an unreadable bundle) is a signature that does not verify."""
    text = " ".join(str(exc).split())
    if isinstance(exc, ValueError) and text.startswith("Signature mismatch"):
        return text
    return f"signature does not verify ({text or type(exc).__name__})"
