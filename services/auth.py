"""Who is calling a genie.v1 server: API keys (kept only as SHA-256 hashes) with scopes, and TLS credentials.

Shared by the world gateway and the job service; each reads its keys from its own settings
(GENIE_GATEWAY_API_KEYS[_FILE], GENIE_JOBS_API_KEYS[_FILE]). A caller sends its key as
`authorization: Bearer KEY` or `x-api-key: KEY` metadata. Keys never appear in messages or logs.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import grpc

from services.settings import ServerSecurity

log = logging.getLogger(__name__)

ANONYMOUS = "anonymous"  # the one caller when auth is off
# Scopes: read = Get/List/Watch calls; play = create, step and close worlds (gateway); train = submit and
# cancel training jobs (job service). A service ignores the scopes it does not check.
READ, PLAY, TRAIN = "read", "play", "train"
ALL_SCOPES = frozenset({READ, PLAY, TRAIN})
HASH_PREFIX = "sha256:"


class AuthError(Exception):
    """Base of the two errors a caller without the right key gets; each service maps them to a status code."""


class Unauthenticated(AuthError):
    pass


class PermissionDenied(AuthError):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Caller:
    name: str
    scopes: frozenset[str]


def _parse_entry(name: str, secret: str, scopes: frozenset[str]) -> tuple[str, Caller]:
    digest = secret[len(HASH_PREFIX):].lower() if secret.startswith(HASH_PREFIX) else hash_key(secret)
    if len(digest) != 64:
        raise ValueError(f"API key entry {name!r}: a sha256: hash has 64 hex digits")
    return digest, Caller(name, scopes)


def read_key_file(path: Path) -> list[tuple[str, str, frozenset[str]]]:
    """Lines 'NAME KEY [SCOPE,...]' or 'NAME sha256:HEX [SCOPE,...]'; '#' starts a comment; no scopes: all."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise ValueError(f"{path}:{number}: expected 'NAME KEY [SCOPES]' ({len(fields)} fields found)")
        scopes = frozenset(fields[2].split(",")) if len(fields) == 3 else ALL_SCOPES
        if not scopes <= ALL_SCOPES:
            raise ValueError(f"{path}:{number}: scopes are {', '.join(sorted(ALL_SCOPES))} (comma-separated)")
        entries.append((fields[0], fields[1], scopes))
    return entries


class Authenticator:
    """Maps call metadata to a Caller; the key table holds hashes only."""

    def __init__(self, settings: ServerSecurity):
        self.enabled = settings.auth == "api-key"
        entries = [(name, secret.get_secret_value(), ALL_SCOPES) for name, secret in settings.api_keys.items()]
        if settings.api_keys_file is not None:
            entries += read_key_file(settings.api_keys_file)
        self._callers = dict(_parse_entry(*entry) for entry in entries)
        if self.enabled and not self._callers:
            prefix = settings.model_config["env_prefix"]
            raise ValueError(f"auth is api-key but no API keys are configured: set {prefix}API_KEYS_FILE "
                             f"(or {prefix}API_KEYS), or {prefix}AUTH=none for development")

    def caller(self, metadata: Iterable[tuple[str, str | bytes]], scope: str) -> Caller:
        if not self.enabled:
            return Caller(ANONYMOUS, ALL_SCOPES)
        key = _key_from(metadata)
        if key is None:
            raise Unauthenticated("no API key: send metadata 'authorization: Bearer KEY' or 'x-api-key: KEY'")
        caller = self._callers.get(hash_key(key))
        if caller is None:
            raise Unauthenticated("unknown API key: check the key you were given (it is not echoed here)")
        if scope not in caller.scopes:
            raise PermissionDenied(f"API key {caller.name!r} may not {scope} (its scopes: "
                                   f"{', '.join(sorted(caller.scopes))}); use a key with the {scope} scope")
        return caller


def _key_from(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    for name, value in metadata:
        if isinstance(value, bytes):
            continue
        if name == "x-api-key" and value:
            return value.strip()
        if name == "authorization" and value[:7].lower() == "bearer " and value[7:].strip():
            return value[7:].strip()
    return None


def add_port(server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """Bind address on a grpc or grpc.aio server: TLS with credentials, plaintext without; -> the bound port."""
    return server.add_insecure_port(address) if credentials is None else server.add_secure_port(address, credentials)


def server_credentials(settings: ServerSecurity) -> grpc.ServerCredentials | None:
    """TLS credentials when a certificate is configured (mTLS when a client CA is too); None: plaintext. The files
    are read again when they change (RotatingCertificate), so a rotated certificate needs no restart."""
    if settings.tls_cert_file is None and settings.tls_key_file is None:
        if settings.tls_client_ca_file is not None:
            raise ValueError("tls_client_ca_file (mTLS) needs tls_cert_file and tls_key_file as well")
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise ValueError("TLS needs both tls_cert_file and tls_key_file")
    files = RotatingCertificate(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    return grpc.dynamic_ssl_server_credentials(files.configuration(), files.changed,
                                               require_client_authentication=settings.tls_client_ca_file is not None)


class RotatingCertificate:
    """A server's TLS files (certificate chain, key, client CA), read again when any of them changes: cert-manager
    renews certificates in place, and Kubernetes swaps a mounted secret's files at once. gRPC asks changed() at each
    new connection's handshake; connections already open keep the certificate they started with."""

    def __init__(self, cert_file: Path, key_file: Path, client_ca_file: Path | None):
        self.paths = [path for path in (cert_file, key_file, client_ca_file) if path is not None]
        self._seen = self._fingerprint()

    def _fingerprint(self) -> tuple:
        """What tells a rewritten file apart (a swapped symlink too: stat follows it)."""
        return tuple((stat.st_ino, stat.st_size, stat.st_mtime_ns) for stat in (path.stat() for path in self.paths))

    def configuration(self) -> grpc.ServerCertificateConfiguration:
        cert, key, *client_ca = (path.read_bytes() for path in self.paths)
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=client_ca[0] if client_ca
                                                         else None)

    def changed(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration if a file changed since it was last read, else None (keep the current one). A file
        missing or unreadable mid-rotation keeps the current one too; the next handshake looks again."""
        try:
            fingerprint = self._fingerprint()
            if fingerprint == self._seen:
                return None
            configuration = self.configuration()
        except OSError as error:
            log.warning("TLS files %s could not be read (%s); serving the certificate read before",
                        ", ".join(map(str, self.paths)), error)
            return None
        self._seen = fingerprint
        log.info("TLS files changed: new connections get the certificate in %s", self.paths[0])
        return configuration
