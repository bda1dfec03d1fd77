"""Test certificates: a CA that issues server and client certificates, and TLS helpers."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import bcrypt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CLIENT_DNS_NAME = "prometheus.monitoring.example"
CLIENT_IP = "2001:db8::7"


class Authority:
    """A certificate authority that issues server and client certificates into a directory."""

    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        public_key = self.key.public_key()
        self.certificate = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .sign(self.key, hashes.SHA256())
        )

    def write(self, path: Path) -> Path:
        path.write_bytes(self.certificate.public_bytes(serialization.Encoding.PEM))
        return path

    def issue(
        self,
        directory: Path,
        stem: str,
        names: Sequence[x509.GeneralName],
        *,
        server: bool,
    ) -> Issued:
        """Write ``stem.crt`` and ``stem.key``; a server certificate, or a client one."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        certificate = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
            .issuer_name(self.certificate.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(hours=1))
            .not_valid_after(now + timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        issued = Issued(directory / f"{stem}.crt", directory / f"{stem}.key", certificate)
        replace_file(
            issued.key,
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        )
        replace_file(issued.cert, certificate.public_bytes(serialization.Encoding.PEM))
        return issued


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    certificate: x509.Certificate

    @property
    def pair(self) -> tuple[str, str]:
        return str(self.cert), str(self.key)


@dataclass(frozen=True)
class Pki:
    authority: Authority
    ca: Path
    server: Issued
    client: Issued
    intruder: Issued
    stranger: Issued


def replace_file(path: Path, content: bytes) -> None:
    """Write ``content`` to ``path`` atomically."""
    # Atomically, as certificate tools do: the exporter never reads a half-written file.
    partial = path.with_name(path.name + ".tmp")
    partial.write_bytes(content)
    partial.replace(path)


SERVER_NAMES: list[x509.GeneralName] = [
    x509.DNSName("localhost"),
    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
]


def make_pki(directory: Path) -> Pki:
    """A CA with a server and two client certificates, and a client of another CA."""
    authority = Authority("test CA")
    other = Authority("some other CA")
    return Pki(
        authority=authority,
        ca=authority.write(directory / "ca.crt"),
        server=authority.issue(directory, "server", SERVER_NAMES, server=True),
        client=authority.issue(
            directory,
            "client",
            [x509.DNSName(CLIENT_DNS_NAME), x509.IPAddress(ipaddress.ip_address(CLIENT_IP))],
            server=False,
        ),
        intruder=authority.issue(
            directory, "intruder", [x509.DNSName("intruder.example")], server=False
        ),
        stranger=other.issue(directory, "stranger", [x509.DNSName(CLIENT_DNS_NAME)], server=False),
    )


def tls_section(pki: Pki, **extra: str) -> str:
    lines = [
        "tls_server_config:",
        f"  cert_file: {pki.server.cert}",
        f"  key_file: {pki.server.key}",
    ]
    lines += [f"  {key}: {value}" for key, value in extra.items()]
    return "\n".join(lines) + "\n"


def client_context(
    pki: Pki,
    identity: Issued | None = None,
    *,
    maximum_version: ssl.TLSVersion | None = None,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    if identity is not None:
        context.load_cert_chain(*identity.pair)
    if maximum_version is not None:
        context.maximum_version = maximum_version
    return context


PASSWORD = "correct horse battery staple"
# The lowest cost bcrypt allows keeps the suite fast; it is still a valid hash.
BCRYPT_ROUNDS = 4


@dataclass(frozen=True)
class CertificateFiles:
    """A CA, a server certificate for localhost it signed, and keys that do not fit it."""

    ca: Path
    cert: Path
    key: Path
    other_key: Path
    encrypted_key: Path


def write_certificate_files(directory: Path) -> CertificateFiles:
    """Write a CA, a server certificate for localhost, and keys that do not fit it."""
    pki = make_pki(directory)
    key = serialization.load_pem_private_key(pki.server.key.read_bytes(), password=None)
    encrypted_key = directory / "encrypted.key"
    encrypted_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    return CertificateFiles(
        ca=pki.ca,
        cert=pki.server.cert,
        key=pki.server.key,
        other_key=pki.client.key,
        encrypted_key=encrypted_key,
    )


def bcrypt_hash(password: str = PASSWORD) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=BCRYPT_ROUNDS)).decode()
