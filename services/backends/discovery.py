"""Discovery plugins (entry point group genie.discovery): the replicas one `triton_endpoints` entry names.

`static` reads a comma-separated list of host:port; `dns` resolves one name (a headless Kubernetes Service)
to every A/AAAA record it has now, on the entry's port. The triton backend re-reads them periodically.
"""

from __future__ import annotations

import socket
from typing import Protocol

EXAMPLE = "'dynamics-0:8001,dynamics-1:8001'"


class Discovery(Protocol):
    def resolve(self, endpoint: str) -> list[str]:
        """host:port of every replica the endpoint names now (sorted); ValueError for a malformed endpoint,
        OSError when the names cannot be looked up at the moment (the caller keeps what it knew)."""


def split_address(address: str, endpoint: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' -> (host, port); the error says what to write instead."""
    host, colon, port = address.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not colon or not host or ":" in host and not address.startswith("["):
        raise ValueError(f"replica address {address!r} in triton endpoint {endpoint!r} is not host:port: write "
                         f"e.g. 'dynamics:8001' (IPv6: '[::1]:8001'), several separated by commas: {EXAMPLE}")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"replica address {address!r} in triton endpoint {endpoint!r} has port {port!r}: "
                         "a port is a number from 1 to 65535")
    return host, int(port)


def join_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class StaticDiscovery:
    """The replicas listed in the endpoint itself: 'h1:8001,h2:8001' (one address: one replica)."""

    def __init__(self, settings: object = None):
        pass

    def resolve(self, endpoint: str) -> list[str]:
        addresses = [address.strip() for address in endpoint.split(",")]
        if not all(addresses):
            raise ValueError(f"triton endpoint {endpoint!r} has an empty address: separate host:port entries by "
                             f"single commas, e.g. {EXAMPLE}")
        for address in addresses:
            split_address(address, endpoint)
        duplicates = sorted({address for address in addresses if addresses.count(address) > 1})
        if duplicates:
            raise ValueError(f"triton endpoint {endpoint!r} lists {', '.join(duplicates)} more than once: list "
                             "each replica once")
        return sorted(addresses)


class DnsDiscovery:
    """Every address one name resolves to, e.g. a headless Service 'genie-dynamics-replicas:8001' (one A
    record per ready pod), so replicas that Kubernetes adds or removes are found at the next resolution."""

    def __init__(self, settings: object = None):
        pass

    def resolve(self, endpoint: str) -> list[str]:
        if "," in endpoint:
            raise ValueError(f"dns discovery takes one name:port per endpoint, got the list {endpoint!r}: name a "
                             "headless Service that resolves to every replica, or use discovery=static for a list")
        host, port = split_address(endpoint.strip(), endpoint)
        records = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)  # socket.gaierror is an OSError
        return sorted({join_address(record[4][0], port) for record in records})
