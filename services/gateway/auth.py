"""Who is calling: API keys (kept only as SHA-256 hashes), per-key scopes, and per-key step quotas.

Keys come from settings (GENIE_GATEWAY_API_KEYS / GENIE_GATEWAY_API_KEYS_FILE); a caller sends one as
`authorization: Bearer KEY` or `x-api-key: KEY` metadata. Keys never appear in messages or logs.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from services.gateway.errors import PermissionDenied, ResourceExhausted, Unauthenticated
from services.settings import GatewaySettings

ANONYMOUS = "anonymous"  # the one caller when auth is off
READ, PLAY = "read", "play"  # scopes: read = Get/List calls only; play = everything
HASH_PREFIX = "sha256:"


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
    """Lines 'NAME KEY [SCOPE,...]' or 'NAME sha256:HEX [SCOPE,...]'; '#' starts a comment."""
    entries = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) not in (2, 3):
            raise ValueError(f"{path}:{number}: expected 'NAME KEY [SCOPES]' ({len(fields)} fields found)")
        scopes = frozenset(fields[2].split(",")) if len(fields) == 3 else frozenset({READ, PLAY})
        if not scopes <= {READ, PLAY}:
            raise ValueError(f"{path}:{number}: scopes are read and play")
        entries.append((fields[0], fields[1], scopes))
    return entries


class Authenticator:
    """Maps call metadata to a Caller; the key table holds hashes only."""

    def __init__(self, settings: GatewaySettings):
        self.enabled = settings.auth == "api-key"
        entries = [(name, secret.get_secret_value(), frozenset({READ, PLAY}))
                   for name, secret in settings.api_keys.items()]
        if settings.api_keys_file is not None:
            entries += read_key_file(settings.api_keys_file)
        self._callers = dict(_parse_entry(*entry) for entry in entries)
        if self.enabled and not self._callers:
            raise ValueError("auth is api-key but no API keys are configured: set GENIE_GATEWAY_API_KEYS_FILE "
                             "(or GENIE_GATEWAY_API_KEYS), or GENIE_GATEWAY_AUTH=none for development")

    def caller(self, metadata: Iterable[tuple[str, str | bytes]], scope: str) -> Caller:
        if not self.enabled:
            return Caller(ANONYMOUS, frozenset({READ, PLAY}))
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


class StepQuota:
    """A token bucket per caller: `rate` steps/s sustained, bursts of up to one second's worth."""

    def __init__(self, rate: float):
        self.rate, self.burst = rate, max(1.0, rate)
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)
        self._lock = threading.Lock()

    def take(self, caller: str) -> None:
        now = time.monotonic()
        with self._lock:
            tokens, at = self._buckets.get(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1:
                self._buckets[caller] = (tokens, now)
                wait_s = (1 - tokens) / self.rate
                raise ResourceExhausted(f"this API key is over its quota of {self.rate:g} steps per second: "
                                        f"retry in {wait_s:.2f} s")
            self._buckets[caller] = (tokens - 1, now)
