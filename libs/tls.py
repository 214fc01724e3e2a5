"""Mutual TLS between Weir's services: one deployment CA, one certificate per identity.

The network between services is not a trust boundary, so every internal call proves who
makes it. ``python -m libs.tls init`` creates (once) a CA and a certificate for each
identity — the five services and the operator — in the credentials directory. Internal
servers require a client certificate from that CA and then admit, per RPC, only the
identities allowed to call it (`libs.grpcserver.PeerAuthorizer`); clients check that the
server holds the certificate of the service they meant to reach, so a process announcing
itself as an executor cannot receive tasks without the executor-manager's key.

An identity is carried as the DNS name ``<identity>.weir.internal`` in the certificate's
subject alternative names; clients dial addresses (127.0.0.1:50052) and check the name with
``grpc.ssl_target_name_override``, so certificates need not list every host and port.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from libs import batching, config as weir_config, tracing

DOMAIN = "weir.internal"
SERVICES = ("gateway", "router", "dispatcher", "executor-manager", "notifier")
OPERATOR = "operator"
IDENTITIES = (*SERVICES, OPERATOR)
PAGE_TOKEN_KEY = "page-token.key"
ROOT = Path(__file__).resolve().parents[1]
# Internal streams carry batches (libs.batching splits them well below this).
MESSAGE_LIMITS = [("grpc.max_receive_message_length", batching.MAX_MESSAGE_BYTES),
                  ("grpc.max_send_message_length", batching.MAX_MESSAGE_BYTES)]
VALIDITY = dt.timedelta(days=3650)


class MissingCredentials(RuntimeError):
    """The credentials directory lacks a file a service needs."""


def dns_name(identity: str) -> str:
    """The name an identity's certificate carries, e.g. ``router.weir.internal``."""
    return f"{identity}.{DOMAIN}"


def identity_of_name(name: str) -> str | None:
    """The identity a certificate name stands for, or None for a foreign name."""
    identity = name.removesuffix("." + DOMAIN)
    return identity if identity != name and identity in IDENTITIES else None


def credentials_dir(config: weir_config.WeirConfig) -> Path:
    """The configured directory; relative paths are from the repository root."""
    path = Path(config.credentials_dir)
    return path if path.is_absolute() else ROOT / path


@dataclass(frozen=True)
class Credentials:
    """One identity's key and certificate with the deployment CA, read once at start-up."""

    identity: str
    ca: bytes
    certificate: bytes
    key: bytes

    @classmethod
    def load(cls, directory: Path, identity: str) -> Credentials:
        """Reads the identity's files; raises `MissingCredentials` naming what to run."""
        paths = [directory / "ca.pem", directory / f"{identity}.pem",
                 directory / f"{identity}-key.pem"]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise MissingCredentials(
                f"missing {', '.join(missing)}: create the deployment's credentials with "
                f"`python -m libs.tls init --dir {directory}` (make run does)")
        ca, certificate, key = (p.read_bytes() for p in paths)
        return cls(identity, ca, certificate, key)

    @classmethod
    def of(cls, config: weir_config.WeirConfig, identity: str) -> Credentials:
        return cls.load(credentials_dir(config), identity)

    def server(self) -> grpc.ServerCredentials:
        """Server side: present our certificate, require one from the CA of every client."""
        return grpc.ssl_server_credentials([(self.key, self.certificate)],
                                           root_certificates=self.ca,
                                           require_client_auth=True)

    def channel(self, address: str, peer: str) -> grpc.Channel:
        """A channel to ``peer`` (an identity) at ``address``, authenticated both ways; its
        calls carry the caller's trace context (every internal call is traced)."""
        return tracing.instrument_channel(grpc.secure_channel(
            address, self._channel_credentials(), options=self.channel_options(peer)))

    def aio_channel(self, address: str, peer: str) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(address, self._channel_credentials(),
                                       options=self.channel_options(peer),
                                       interceptors=tracing.aio_interceptors())

    def channel_options(self, peer: str) -> list[tuple[str, str | int]]:
        # A restarted service is found again within a couple of seconds: grpc's default
        # reconnect backoff grows to two minutes, long enough to idle an executor.
        return [("grpc.ssl_target_name_override", dns_name(peer)),
                ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 2000),
                *MESSAGE_LIMITS]

    def _channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(root_certificates=self.ca,
                                            private_key=self.key,
                                            certificate_chain=self.certificate)


def peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    """The Weir identity of the caller, from its verified client certificate."""
    auth = context.auth_context() or {}
    for raw in auth.get("x509_subject_alternative_name", ()):
        identity = identity_of_name(raw.decode() if isinstance(raw, bytes) else raw)
        if identity is not None:
            return identity
    return None


def page_token_key(config: weir_config.WeirConfig) -> bytes:
    """The key that signs page tokens; shared by every gateway of the deployment."""
    path = credentials_dir(config) / PAGE_TOKEN_KEY
    if not path.is_file():
        raise MissingCredentials(f"missing {path}: run `python -m libs.tls init`")
    return bytes.fromhex(path.read_text().strip())


# --- creating the credentials ------------------------------------------------------------

def _private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, *, private: bool) -> None:
    """Writes a file readable by its owner only when ``private`` (created so from the start:
    no moment in which another user could open it)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    with os.fdopen(os.open(path, flags, 0o600 if private else 0o644), "wb") as out:
        out.write(data)


def _certificate(subject: str, key: ec.EllipticCurvePrivateKey, *,
                 issuer: x509.Certificate | None, issuer_key: ec.EllipticCurvePrivateKey,
                 ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Weir deployment"),
                      x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder()
               .subject_name(name)
               .issuer_name(issuer.subject if issuer else name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5))
               .not_valid_after(now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                              critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = (builder
                   .add_extension(x509.SubjectAlternativeName([x509.DNSName(subject)]),
                                  critical=False)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                         ExtendedKeyUsageOID.CLIENT_AUTH]),
                                  critical=False))
    return builder.sign(issuer_key, hashes.SHA256())


def init(directory: Path, identities: Sequence[str] = IDENTITIES) -> list[str]:
    """Creates what is missing: the CA, each identity's certificate, the page-token key.

    Existing files are kept, so running it at every start changes nothing; returns the
    names of the files it created.
    """
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)
    created: list[str] = []
    ca_path, ca_key_path = directory / "ca.pem", directory / "ca-key.pem"
    if not ca_path.exists():
        ca_key = _private_key()
        ca_cert = _certificate("Weir deployment CA", ca_key, issuer=None, issuer_key=ca_key,
                               ca=True)
        _write(ca_key_path, _pem_key(ca_key), private=True)
        _write(ca_path, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
        created += [ca_path.name, ca_key_path.name]
    ca_cert = x509.load_pem_x509_certificate(ca_path.read_bytes())
    loaded = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    for identity in identities:
        cert_path, key_path = directory / f"{identity}.pem", directory / f"{identity}-key.pem"
        if cert_path.exists() and key_path.exists():
            continue
        key = _private_key()
        cert = _certificate(dns_name(identity), key, issuer=ca_cert, issuer_key=loaded,
                            ca=False)
        _write(key_path, _pem_key(key), private=True)
        _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), private=False)
        created += [cert_path.name, key_path.name]
    token_path = directory / PAGE_TOKEN_KEY
    if not token_path.exists():
        _write(token_path, secrets.token_hex(32).encode(), private=True)
        created.append(token_path.name)
    return created


def main() -> None:
    parser = argparse.ArgumentParser(description="The deployment's mutual-TLS credentials.")
    commands = parser.add_subparsers(dest="command", required=True)
    create = commands.add_parser("init", help="create the CA, certificates and keys (once)")
    create.add_argument("--dir", type=Path, help="default: the credentials_dir setting")
    args = parser.parse_args()
    directory = args.dir or credentials_dir(weir_config.load())
    created = init(directory)
    print(f"credentials in {directory}: "
          + (f"created {', '.join(created)}" if created else "all present"))


if __name__ == "__main__":
    main()
