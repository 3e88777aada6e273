"""Signing keys: ``zu keygen``, loading private and public keys, raw sign / verify (Ed25519, ECDSA P-256)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError, UsageError

KEY_FILE = "zu-signing.key"
PUB_FILE = "zu-signing.pub"
ENV_KEY = "ZU_SIGNING_KEY"
ENV_PASSWORD = "ZU_SIGNING_KEY_PASSWORD"
ENV_CONFIG = "ZU_CONFIG_DIR"


def config_dir() -> Path:
    """The user's zu config directory: ``$ZU_CONFIG_DIR`` or the platform's (``~/.config/zu`` on Linux)."""
    if os.environ.get(ENV_CONFIG):
        return Path(os.environ[ENV_CONFIG])
    import typer

    return Path(typer.get_app_dir("zu"))


@dataclass(frozen=True)
class SigningKey:
    """A private key ready to sign, with where it came from (for messages) and its public half."""

    key: object
    source: str

    @property
    def algorithm(self) -> str:
        """``ed25519`` or ``ecdsa-p256-sha256``."""
        return algorithm_of(self.key.public_key())

    @property
    def public_pem(self) -> str:
        """The public key, PEM (SubjectPublicKeyInfo)."""
        return public_pem(self.key.public_key())

    @property
    def keyid(self) -> str:
        """sha256 of the public key's DER encoding, hex."""
        return fingerprint(self.key.public_key())

    def sign(self, data: bytes) -> bytes:
        """Signature over ``data`` (Ed25519 raw, or ECDSA-SHA256 DER)."""
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import ec

        if self.algorithm == "ed25519":
            return self.key.sign(data)
        return self.key.sign(data, ec.ECDSA(hashes.SHA256()))


def algorithm_of(pub) -> str:
    """Algorithm name of a public key; anything but Ed25519 or ECDSA P-256 is refused.

    Raises:
        UsageError: unsupported key type (exit 2).
    """
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(pub, ec.EllipticCurvePublicKey) and pub.curve.name == "secp256r1":
        return "ecdsa-p256-sha256"
    raise UsageError(f"unsupported key type {type(pub).__name__}: zu signs with Ed25519 or ECDSA P-256")


def public_pem(pub) -> str:
    """PEM text of a public key."""
    from cryptography.hazmat.primitives import serialization

    return pub.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def fingerprint(pub) -> str:
    """Key id: hex sha256 of the DER SubjectPublicKeyInfo (``openssl pkey -pubin -outform DER | sha256sum``)."""
    from cryptography.hazmat.primitives import serialization

    der = pub.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()


def keygen(out_dir: Path | None, kind: str = "ecdsa-p256", force: bool = False) -> tuple[Path, Path, str]:
    """Create a key pair: ``zu-signing.key`` (PKCS#8 PEM, mode 0600) and ``zu-signing.pub``.

    Args:
        out_dir: target directory (default: the user's config directory).
        kind: ``ecdsa-p256`` (the default: model-signing verifies it) or ``ed25519`` (zu's own envelope).
        force: replace an existing key.

    Returns:
        (private key path, public key path, fingerprint).

    Raises:
        UsageError: a key exists and ``force`` is false, or an unknown ``kind`` (exit 2).
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    out_dir = out_dir or config_dir()
    priv_path, pub_path = out_dir / KEY_FILE, out_dir / PUB_FILE
    if not force and (priv_path.exists() or pub_path.exists()):
        raise UsageError(f"{priv_path}: a signing key already exists", hint="pass --force to replace it")
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    elif kind == "ecdsa-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise UsageError(f"--type {kind!r}: expected ed25519 or ecdsa-p256")
    out_dir.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    for path, data, mode in ((priv_path, pem, 0o600), (pub_path, public_pem(key.public_key()).encode(), 0o644)):
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)  # the umask must not widen or narrow what we asked for
        os.replace(tmp, path)
    return priv_path, pub_path, fingerprint(key.public_key())


def ephemeral() -> SigningKey:
    """A throw-away ECDSA P-256 key held in memory (the demo and benchmarks: nothing to pin, nothing saved)."""
    from cryptography.hazmat.primitives.asymmetric import ec

    return SigningKey(key=ec.generate_private_key(ec.SECP256R1()), source="ephemeral")


def _parse_private(data: bytes, source: str) -> SigningKey:
    from cryptography.hazmat.primitives import serialization

    password = os.environ.get(ENV_PASSWORD)
    try:
        key = serialization.load_pem_private_key(data, password=password.encode() if password else None)
    except (ValueError, TypeError) as exc:
        why = "encrypted; set ZU_SIGNING_KEY_PASSWORD" if "encrypted" in str(exc).lower() or "password" in \
            str(exc).lower() else "not a PEM private key"
        raise UsageError(f"{source}: not a usable private key ({why})",
                         hint="create one with `zu keygen`") from exc
    except Exception as exc:  # cryptography raises UnsupportedAlgorithm for exotic keys
        raise UsageError(f"{source}: not a usable private key ({exc})") from exc
    algorithm_of(key.public_key())  # refuse RSA, other curves
    return SigningKey(key=key, source=source)


def load_signing_key(path: Path | None) -> SigningKey:
    """The key to sign with: ``--key PATH``, else ``$ZU_SIGNING_KEY`` (PEM text), else the default key file.

    Raises:
        UsageError: no key anywhere, or the key found is unreadable or unsupported (exit 2).
    """
    if path is not None:
        try:
            return _parse_private(Path(path).read_bytes(), str(path))
        except OSError as exc:
            raise UsageError(f"--key {path}: cannot read ({exc.strerror})") from exc
    if os.environ.get(ENV_KEY):
        return _parse_private(os.environ[ENV_KEY].encode(), f"${ENV_KEY}")
    default = config_dir() / KEY_FILE
    if default.is_file():
        return _parse_private(default.read_bytes(), str(default))
    raise UsageError(f"no signing key: no --key, no ${ENV_KEY}, no {default}",
                     hint="run `zu keygen` once (or pass --key PEM / set ZU_SIGNING_KEY in CI)")


def load_public_key(path: Path):
    """A public key from a PEM file (a private key file is accepted; its public half is used).

    Raises:
        UsageError: unreadable or not a key (exit 2).
    """
    from cryptography.hazmat.primitives import serialization

    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"--public-key {path}: cannot read ({exc.strerror})") from exc
    try:
        pub = serialization.load_pem_public_key(data)
    except ValueError:
        pub = _parse_private(data, str(path)).key.public_key()
    algorithm_of(pub)
    return pub


def verify_signature(pub_pem: str, signature: bytes, data: bytes, what: str) -> None:
    """Check ``signature`` over ``data`` with the public key in ``pub_pem``.

    Raises:
        IntegrityError: bad signature or unusable key (exit 4), naming ``what``.
    """
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        pub = serialization.load_pem_public_key(pub_pem.encode())
        if algorithm_of(pub) == "ed25519":
            pub.verify(signature, data)
        else:
            pub.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature as exc:
        raise IntegrityError(f"{what}: signature does not verify") from exc
    except (ValueError, UsageError) as exc:
        raise IntegrityError(f"{what}: signer key unusable ({exc})") from exc
