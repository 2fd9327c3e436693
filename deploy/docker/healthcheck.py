"""Container health check shared by the images: `genie-healthcheck grpc HOST:PORT` or `genie-healthcheck http URL`.

Exit 0 when the gRPC health service answers SERVING (or the URL answers 2xx), 1 otherwise; stdlib + grpcio only.
"""

from __future__ import annotations

import sys
import urllib.request


def grpc_serving(address: str, service: str = "") -> bool:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service), timeout=3)
    return answer.status == health_pb2.HealthCheckResponse.SERVING


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 (a fixed loopback URL)
        return 200 <= response.status < 300


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("grpc", "http"):
        print("usage: genie-healthcheck grpc HOST:PORT [SERVICE] | http URL", file=sys.stderr)
        return 2
    try:
        healthy = grpc_serving(*argv[1:3]) if argv[0] == "grpc" else http_ok(argv[1])
    except Exception as error:  # any failure to answer is "unhealthy"; say why for `docker inspect`
        print(f"unhealthy: {error}", file=sys.stderr)
        return 1
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
