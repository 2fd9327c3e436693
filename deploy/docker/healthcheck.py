"""Container health check shared by the images: `genie-healthcheck grpc HOST:PORT` or `genie-healthcheck http URL`.

Exit 0 when the gRPC health service answers SERVING (or the URL answers 2xx), 1 otherwise; stdlib + grpcio only.
A server on TLS: `grpc HOST:PORT --ca CA.pem` (+ `--cert`/`--key` when it requires client certificates).
"""

from __future__ import annotations

import argparse
import sys
import urllib.request
from pathlib import Path


def grpc_serving(address: str, service: str = "", ca: Path | None = None, cert: Path | None = None,
                 key: Path | None = None) -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    if ca is None:
        channel = grpc.insecure_channel(address)
    else:  # the server's certificate must name HOST (the dev certificates name localhost and 127.0.0.1)
        client = (key.read_bytes(), cert.read_bytes()) if cert is not None else (None, None)
        channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(ca.read_bytes(), *client))
    with channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 (a fixed loopback URL)
        return 200 <= response.status < 300


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="genie-healthcheck", description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=("grpc", "http"))
    parser.add_argument("target", help="HOST:PORT (grpc) or URL (http)")
    parser.add_argument("service", nargs="?", default="", help="grpc: the health service name (default: the server)")
    parser.add_argument("--ca", type=Path, help="grpc: PEM CA of a server on TLS")
    parser.add_argument("--cert", type=Path, help="grpc: PEM client certificate, for a server on mutual TLS")
    parser.add_argument("--key", type=Path, help="grpc: PEM private key of --cert")
    args = parser.parse_args(argv)
    if (args.cert is None) != (args.key is None) or (args.cert is not None and args.ca is None):
        parser.error("--cert and --key go together, and with --ca")
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)  # a usage error exits 2
    try:
        healthy = (grpc_serving(args.target, args.service, args.ca, args.cert, args.key) if args.kind == "grpc"
                   else http_ok(args.target))
    except Exception as error:  # any failure to answer is "unhealthy"; say why for `docker inspect`
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
