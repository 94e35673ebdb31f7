"""Certificates for mutual TLS: generation (``splitmirror certs init``) and loading.

One private CA signs everything in a TLS directory:

- ``ca.pem`` (and ``ca.key``, which only ``certs init`` needs; keep it offline);
- ``<system-id>.pem`` / ``<system-id>.key`` per daemon: subject
  ``O=splitmirror, OU=system, CN=<system-id>``, usable as server and client
  (the interconnect is mutual), with the names ``splitmirror``,
  ``system-<id>.splitmirror``, ``localhost``, ``127.0.0.1``, ``::1`` and any
  extra ``--hosts``;
- ``client-<name>.pem`` / ``client-<name>.key`` per client: subject
  ``O=splitmirror, OU=<role>, CN=<name>`` (the role is the name unless given
  as ``name:role``);
- ``nbd-<name>/`` with ``ca-cert.pem``, ``client-cert.pem``,
  ``client-key.pem``: the layout qemu (``tls-creds-x509``) and libnbd
  (``nbds://...?tls-certificates=DIR``) expect.

A peer's system id and a client's role come from the verified certificate,
never from what the caller claims in metadata.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import ipaddress
import os
import ssl
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .errors import InvalidArgument

ROLES = ("admin", "host", "viewer")
SYSTEM_OU = "system"
ORGANIZATION = "splitmirror"
#: Every daemon certificate carries this name; clients that only know an
#: address (the CLI) verify the server against it.
SERVER_NAME = "splitmirror"
VALID_DAYS = 3650


def system_host_name(system_id: int) -> str:
    """The DNS name in system ``system_id``'s certificate; a daemon dialing a
    peer verifies the peer's certificate against it."""
    return f"system-{system_id}.splitmirror"


@dataclasses.dataclass(frozen=True)
class Subject:
    """Who a verified certificate names."""

    kind: str  # "system" or a role
    name: str  # the system id or the client name


def _name(ou: str, cn: str) -> x509.Name:
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
        x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
        x509.NameAttribute(NameOID.COMMON_NAME, cn),
    ])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _san(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        return x509.DNSName(value)


class _Ca:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
        self.key = key
        self.cert = cert

    @classmethod
    def create(cls) -> _Ca:
        key = ec.generate_private_key(ec.SECP256R1())
        name = _name("ca", "splitmirror CA")
        now = datetime.datetime.now(datetime.UTC)
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False,
                                             encipher_only=False, decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        return cls(key, cert)

    @classmethod
    def load(cls, directory: Path) -> _Ca:
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise InvalidArgument(f"{directory / 'ca.key'}: not an EC private key")
        return cls(key, x509.load_pem_x509_certificate((directory / "ca.pem").read_bytes()))

    def issue(self, subject: x509.Name, names: list[str], server: bool) -> tuple[bytes, bytes]:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
        if server:
            usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(self.cert.subject)
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=True,
                                                content_commitment=False, data_encipherment=False,
                                                key_agreement=True, key_cert_sign=False, crl_sign=False,
                                                encipher_only=False, decipher_only=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                                  critical=False))
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName([_san(n) for n in names]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def parse_clients(text: str) -> list[tuple[str, str]]:
    """``admin,host,alice:viewer`` -> [(name, role)]."""
    out: list[tuple[str, str]] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        name, _, role = item.partition(":")
        role = role or name
        if role not in ROLES:
            raise InvalidArgument(f"--clients: {item!r}: role must be one of {', '.join(ROLES)}")
        if not name.replace("-", "").replace("_", "").isalnum():
            raise InvalidArgument(f"--clients: {item!r}: names use letters, digits, '-' and '_'")
        out.append((name, role))
    return out


def parse_systems(text: str) -> list[int]:
    out: list[int] = []
    for item in filter(None, (p.strip() for p in text.split(","))):
        if not item.isdecimal() or int(item) <= 0:
            raise InvalidArgument(f"--systems: {item!r} is not a positive system id")
        out.append(int(item))
    if not out:
        raise InvalidArgument("--systems: name at least one system id")
    return out


def init_dir(directory: Path, systems: list[int], clients: list[tuple[str, str]],
             hosts: list[str] | None = None) -> list[Path]:
    """Create (or extend) a TLS directory; an existing CA is reused. Returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if (directory / "ca.pem").exists() and (directory / "ca.key").exists():
        ca = _Ca.load(directory)
    else:
        ca = _Ca.create()
        _write(directory / "ca.key", _key_pem(ca.key), private=True)
        _write(directory / "ca.pem", ca.cert.public_bytes(serialization.Encoding.PEM))
        written += [directory / "ca.pem", directory / "ca.key"]
    ca_pem = (directory / "ca.pem").read_bytes()
    for sid in systems:
        names = [SERVER_NAME, system_host_name(sid), "localhost", "127.0.0.1", "::1", *(hosts or [])]
        cert, key = ca.issue(_name(SYSTEM_OU, str(sid)), names, server=True)
        _write(directory / f"{sid}.pem", cert)
        _write(directory / f"{sid}.key", key, private=True)
        written += [directory / f"{sid}.pem", directory / f"{sid}.key"]
    for name, role in clients:
        cert, key = ca.issue(_name(role, name), [], server=False)
        _write(directory / f"client-{name}.pem", cert)
        _write(directory / f"client-{name}.key", key, private=True)
        nbd_dir = directory / f"nbd-{name}"
        nbd_dir.mkdir(exist_ok=True)
        _write(nbd_dir / "ca-cert.pem", ca_pem)
        _write(nbd_dir / "client-cert.pem", cert)
        _write(nbd_dir / "client-key.pem", key, private=True)
        written += [directory / f"client-{name}.pem", directory / f"client-{name}.key", nbd_dir]
    return written


# ------------------------------------------------------------------- loading


@dataclasses.dataclass(frozen=True)
class TlsFiles:
    """The PEM bytes one daemon or client presents and trusts."""

    ca: bytes
    cert: bytes
    key: bytes
    directory: Path
    cert_path: Path
    key_path: Path

    @classmethod
    def load(cls, directory: Path, stem: str) -> TlsFiles:
        paths = {"ca": directory / "ca.pem", "cert": directory / f"{stem}.pem", "key": directory / f"{stem}.key"}
        data: dict[str, bytes] = {}
        for what, path in paths.items():
            try:
                data[what] = path.read_bytes()
            except OSError as exc:
                raise InvalidArgument(f"TLS {what} {path}: {exc.strerror}") from None
        return cls(data["ca"], data["cert"], data["key"], directory, paths["cert"], paths["key"])

    def server_ssl_context(self, require_client_cert: bool = True) -> ssl.SSLContext:
        """For NBD's STARTTLS: our certificate, clients verified against the CA."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.cert_path, self.key_path)
        ctx.load_verify_locations(cadata=self.ca.decode())
        ctx.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        return ctx


@functools.lru_cache(maxsize=256)
def subject_of(pem: bytes) -> Subject | None:
    """The subject of a certificate the TLS layer already verified against the CA."""
    try:
        cert = x509.load_pem_x509_certificate(pem)
    except ValueError:
        return None
    return subject_from_name(cert.subject)


def cert_subject(context: Any) -> Subject | None:
    """The subject of the client certificate of a gRPC call (verified by the TLS layer)."""
    pems = list((context.auth_context() or {}).get("x509_pem_cert") or [])
    return subject_of(bytes(pems[0])) if pems else None


def subject_from_name(name: x509.Name) -> Subject | None:
    def one(oid: x509.ObjectIdentifier) -> str:
        values = name.get_attributes_for_oid(oid)
        return str(values[0].value) if len(values) == 1 else ""

    ou, cn = one(NameOID.ORGANIZATIONAL_UNIT_NAME), one(NameOID.COMMON_NAME)
    if one(NameOID.ORGANIZATION_NAME) != ORGANIZATION or not cn:
        return None
    if ou == SYSTEM_OU or ou in ROLES:
        return Subject(ou, cn)
    return None


def subject_from_der(der: bytes) -> Subject | None:
    try:
        return subject_from_name(x509.load_der_x509_certificate(der).subject)
    except ValueError:
        return None
