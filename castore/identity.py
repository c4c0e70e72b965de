"""A peer's identity and the cluster's admission secret: ECDSA P-256 key, self-signed
certificate, peer id (BLAKE3 of the DER certificate, castore.ids.PeerId), join tokens and enrolment proofs.

Owns HOME/peer/ (key.pem 0600, cert.pem) and HOME/cluster.json (0600). Imports cryptography,
never grpc: the rpc layer turns these PEM bytes into credentials.
"""
from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from castore.errors import ConfigError
from castore.ids import PeerId

SAN = "castore"            # every peer certificate names this; clients override the target name
TOKEN_PREFIX = "castore1-"


@dataclass(frozen=True)
class Identity:
    """This peer's key and certificate (PEM) and its id."""

    key_pem: bytes
    cert_pem: bytes

    @property
    def peer_id(self) -> str:
        return cert_peer_id(self.cert_pem)


def cert_fingerprint(cert_pem: bytes) -> str:
    """The peer id of a certificate (PeerId.of: BLAKE3 of its DER bytes), hex: what peers
    pin and what a token carries. Raises ValueError if the PEM does not parse."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding
    der = x509.load_pem_x509_certificate(cert_pem).public_bytes(Encoding.DER)
    return PeerId.of(der).hex


cert_peer_id = cert_fingerprint     # the peer id is the certificate fingerprint (Syncthing)


def load_or_create(home: Path) -> Identity:
    """The identity in HOME/peer/, created on first use (key file mode 0600).

    The certificate is backdated a day, so peers with skewed clocks still accept it, and valid
    for 20 years; Ed25519 is avoided because grpcio's handshake rejects it."""
    d = home / "peer"
    key_path, cert_path = d / "key.pem", d / "cert.pem"
    if key_path.exists() and cert_path.exists():
        return Identity(key_path.read_bytes(), cert_path.read_bytes())
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP256R1())
    # a unique subject per peer: OpenSSL finds a trust anchor by subject name, so peers that
    # all called themselves "castore" would fail verification against a multi-cert store
    cn = f"castore peer {os.urandom(8).hex()}"
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=365 * 20))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(SAN)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    key_pem = key.private_bytes(serialization.Encoding.PEM,
                                serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    _write_private(key_path, key_pem)
    cert_path.write_bytes(cert_pem)
    return Identity(key_pem, cert_pem)


def _write_private(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


# -- the cluster record -------------------------------------------------------------------
@dataclass
class ClusterFile:
    """HOME/cluster.json: the cluster secret and settings, and the last known members (so a
    restarted peer finds the cluster again without a token)."""

    cluster_id: str
    secret: str                   # hex; admits new peers, never sent on the wire
    redundancy: int
    members: dict[str, dict[str, Any]] = field(default_factory=dict)

    @classmethod
    def load(cls, home: Path) -> ClusterFile | None:
        path = home / "cluster.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path}: {exc}") from None
        return cls(raw["cluster_id"], raw["secret"], int(raw["redundancy"]),
                   dict(raw.get("members", {})))

    def save(self, home: Path) -> None:
        body = json.dumps({"cluster_id": self.cluster_id, "secret": self.secret,
                           "redundancy": self.redundancy, "members": self.members},
                          sort_keys=True).encode()
        _write_private(home / "cluster.json", body)

    @classmethod
    def create(cls, redundancy: int) -> ClusterFile:
        return cls(os.urandom(16).hex(), os.urandom(32).hex(), redundancy)


# -- tokens and proofs --------------------------------------------------------------------
@dataclass(frozen=True)
class JoinToken:
    """What `castore invite` prints: the cluster secret, the seed's enrolment address, and the
    fingerprint of the seed's certificate (so the joiner can pin it before it trusts anything)."""

    secret: str
    enrol_addr: str
    fingerprint: str

    def encode(self) -> str:
        body = json.dumps({"s": self.secret, "a": self.enrol_addr, "f": self.fingerprint},
                          separators=(",", ":")).encode()
        return TOKEN_PREFIX + base64.urlsafe_b64encode(body).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> JoinToken:
        text = text.strip()
        if not text.startswith(TOKEN_PREFIX):
            raise ConfigError("not a castore join token (they start with 'castore1-')")
        b64 = text[len(TOKEN_PREFIX):]
        try:
            raw = json.loads(base64.urlsafe_b64decode(b64 + "=" * (-len(b64) % 4)))
            return cls(str(raw["s"]), str(raw["a"]), str(raw["f"]))
        except (ValueError, KeyError, TypeError):
            raise ConfigError("the join token is damaged (copy it again from "
                              "'castore invite')") from None


def enrol_proof(secret_hex: str, nonce: bytes, cert_fingerprint_hex: str) -> bytes:
    """HMAC-SHA256(secret, nonce || fingerprint): proves the secret without sending it, bound
    to the joiner's certificate and to a one-time server nonce."""
    return hmac.new(bytes.fromhex(secret_hex), nonce + bytes.fromhex(cert_fingerprint_hex),
                    hashlib.sha256).digest()


def check_proof(secret_hex: str, nonce: bytes, cert_fingerprint_hex: str, proof: bytes) -> bool:
    return hmac.compare_digest(enrol_proof(secret_hex, nonce, cert_fingerprint_hex), proof)
