"""TLS / mutual TLS for the gRPC server, and a development PKI generator.

`generate_dev_pki(out_dir, hosts, clients)` writes (PEM, keys 0600):
  ca.pem / ca.key                 a self-signed development CA (ECDSA P-256, 1 year)
  server.pem / server.key         server certificate with SANs for every host (DNS or IP)
  client-<name>.pem / .key        client certificates for mutual TLS (clientAuth)
`server_credentials(cert, key, client_ca)` builds grpc server credentials; with a client CA
every client must present a certificate it signed (mTLS). `channel_credentials` is the
client-side counterpart (edge_runtime has its own copy in edge_runtime.cli_join, as the two
packages never import each other).

These certificates are for development and loopback tests. In production use your own CA
and keep ca.key offline.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")


@dataclass(frozen=True)
class DevPKI:
    """Paths of a generated development PKI."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    clients: dict[str, tuple[Path, Path]]  # name -> (cert, key)


def _key():
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return path


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str):
    from cryptography import x509

    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _cert(subject: str, key, issuer_name, issuer_key, days: int, *, ca: bool = False,
          sans: Sequence[str] = (), server: bool = False):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "edgefed development")])
    now = dt.datetime.now(dt.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer_name or name).public_key(key.public_key())
         .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
         .not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True))
    if ca:
        b = b.add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                          content_commitment=False, key_encipherment=False, data_encipherment=False,
                                          key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
        b = b.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        b = b.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        b = b.add_extension(x509.SubjectAlternativeName([_san(h) for h in (sans or [subject])]), critical=False)
    return b.sign(issuer_key or key, hashes.SHA256()), name


def generate_dev_pki(out_dir: str | Path, hosts: Sequence[str] = DEFAULT_HOSTS, clients: Sequence[str] = ("device",),
                     days: int = 365) -> DevPKI:
    """A development CA, a server certificate for `hosts` and one client certificate per name."""
    from cryptography.hazmat.primitives import serialization

    if not hosts:
        raise ValueError("the server certificate needs at least one host name or IP (--host)")
    for c in clients:
        if not c or not all(ch.isalnum() or ch in "-_." for ch in c):
            raise ValueError(f"client name {c!r} is invalid: use letters, digits, '-', '_' or '.'")
    out = Path(out_dir)
    pem = serialization.Encoding.PEM
    ca_key = _key()
    ca_cert, ca_name = _cert("edgefed dev CA", ca_key, None, None, days, ca=True)
    paths = {"ca_cert": _write(out / "ca.pem", ca_cert.public_bytes(pem)),
             "ca_key": _write(out / "ca.key", _pem_key(ca_key), private=True)}
    skey = _key()
    scert, _ = _cert(hosts[0], skey, ca_name, ca_key, days, sans=hosts, server=True)
    paths["server_cert"] = _write(out / "server.pem", scert.public_bytes(pem))
    paths["server_key"] = _write(out / "server.key", _pem_key(skey), private=True)
    cl = {}
    for c in clients:
        ckey = _key()
        ccert, _ = _cert(c, ckey, ca_name, ca_key, days)
        cl[c] = (_write(out / f"client-{c}.pem", ccert.public_bytes(pem)),
                 _write(out / f"client-{c}.key", _pem_key(ckey), private=True))
    return DevPKI(clients=cl, **paths)


def _read(path: str | Path, flag: str) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{flag} {p}: no such file (generate development ones with "
                                "`edge-coordinator certs --out DIR`)")
    return p.read_bytes()


def server_credentials(cert: str | Path, key: str | Path, client_ca: str | Path | None = None):
    """grpc.ServerCredentials for TLS; with `client_ca`, clients must present a certificate it signed."""
    import grpc

    pair = (_read(key, "--tls-key"), _read(cert, "--tls-cert"))
    ca = _read(client_ca, "--client-ca") if client_ca else None
    return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)


def channel_credentials(root_ca: str | Path, cert: str | Path | None = None, key: str | Path | None = None):
    """grpc.ChannelCredentials trusting `root_ca`, optionally presenting a client certificate (mTLS)."""
    import grpc

    if bool(cert) != bool(key):
        raise ValueError("mutual TLS needs both a client certificate and its key")
    return grpc.ssl_channel_credentials(_read(root_ca, "--root-ca"), _read(key, "--client-key") if key else None,
                                        _read(cert, "--client-cert") if cert else None)
