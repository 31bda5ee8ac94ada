"""Signed snapshots: the coordinator signs each model it publishes (Ed25519); agents configured
with its public key refuse any model it did not sign, so a compromised broker or another
account cannot push a model to the fleet.

The signature is a trailer after the snapshot frame, covering every byte before it::

    <snapshot frame> | b"FSIG" | alg u8 (1 = Ed25519) | key id (8 bytes) | signature (64 bytes)

A trailer keeps the codec unchanged and makes an old agent reject a signed frame (trailing
bytes) rather than accept it unchecked. The key id (first 8 bytes of SHA-256 of the raw public
key) lets an agent say which key signed a model it refuses, which helps during key rotation.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from fedasync_iot.models._errors import ConfigError, WireError

TRAILER_MAGIC = b"FSIG"
ALG_ED25519 = 1
_TRAILER_LEN = 4 + 1 + 8 + 64


def key_id(public_raw: bytes) -> bytes:
    return hashlib.sha256(public_raw).digest()[:8]


class Signer:
    """Holds the coordinator's private key."""

    def __init__(self, private_pem: bytes) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            key = serialization.load_pem_private_key(private_pem, password=None)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"cannot read the signing key: {exc}", key="signing_key") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError("the signing key must be an Ed25519 private key",
                              key="signing_key")
        self._key = key
        self.public_raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                                        serialization.PublicFormat.Raw)
        self.key_id = key_id(self.public_raw)

    @classmethod
    def from_file(cls, path: str | Path) -> Signer:
        try:
            return cls(Path(path).read_bytes())
        except OSError as exc:
            raise ConfigError(f"cannot read the signing key {path}: {exc}",
                              key="signing_key") from exc

    def sign(self, frame: bytes) -> bytes:
        head = frame + TRAILER_MAGIC + bytes([ALG_ED25519]) + self.key_id
        return head + self._key.sign(head)


class Verifier:
    """Holds the public key(s) an agent trusts."""

    def __init__(self, public_pems: list[bytes]) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        self._keys: dict[bytes, Ed25519PublicKey] = {}
        for pem in public_pems:
            try:
                key = serialization.load_pem_public_key(pem)
            except (ValueError, TypeError) as exc:
                raise ConfigError(f"cannot read a coordinator public key: {exc}",
                                  key="coordinator_public_key") from exc
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError("coordinator public keys must be Ed25519",
                                  key="coordinator_public_key")
            raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
            self._keys[key_id(raw)] = key

    @classmethod
    def from_files(cls, paths: list[str]) -> Verifier:
        try:
            return cls([Path(p).read_bytes() for p in paths])
        except OSError as exc:
            raise ConfigError(f"cannot read a coordinator public key: {exc}",
                              key="coordinator_public_key") from exc

    def verify(self, data: bytes) -> bytes:
        """The frame inside a correctly signed message; WireError for anything else."""
        from cryptography.exceptions import InvalidSignature

        frame, kid, signature = split(data)
        if kid is None:
            raise WireError("model is not signed")
        key = self._keys.get(kid)
        if key is None:
            raise WireError(f"model is signed by an unknown key {kid.hex()}")
        try:
            key.verify(signature, data[:-64])
        except InvalidSignature as exc:
            raise WireError(f"model signature does not verify (key {kid.hex()})") from exc
        return frame


def split(data: bytes) -> tuple[bytes, bytes | None, bytes]:
    """(frame, key id, signature) of a signed message; (data, None, b"") if it has no trailer."""
    if len(data) < _TRAILER_LEN or data[-_TRAILER_LEN:-_TRAILER_LEN + 4] != TRAILER_MAGIC:
        return data, None, b""
    trailer = data[-_TRAILER_LEN:]
    if trailer[4] != ALG_ED25519:
        raise WireError(f"unknown signature algorithm {trailer[4]}")
    return data[:-_TRAILER_LEN], trailer[5:13], trailer[13:]


def generate_keypair(directory: Path, *, name: str = "coordinator") -> tuple[Path, Path]:
    """Write ``<name>.key`` (private, mode 0600) and ``<name>.pub`` (public) PEM files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    private, public = directory / f"{name}.key", directory / f"{name}.pub"
    if private.exists():
        raise ConfigError(f"{private} exists: refusing to overwrite a signing key")
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                     serialization.PublicFormat.SubjectPublicKeyInfo))
    return private, public
