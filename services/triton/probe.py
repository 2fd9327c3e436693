"""`python -m services.triton.probe --grpc-port 8001`: whether a model service's own process answers a request.

Triton's health endpoints (and Kubernetes' gRPC probes of them) are served by tritonserver, which stays ready while
the Python process that runs our models hangs (SIGSTOP, a deadlock). A request that goes through that process tells:
the `info` model of a service with a fixed world, or, for a --catalog service (no `info` until a version is bound),
a control command it refuses at once without touching any version. Exit 0: it answered within --timeout-s; 1: not.
Used by `genie serve stack`'s supervisor and as the model services' Kubernetes liveness probe (exec).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Sequence
from pathlib import Path

import tritonclient.grpc as grpcclient

from services.triton.client import ClientTLS, process_answers


def answers(url: str, timeout_s: float, tls: ClientTLS | None = None) -> bool:
    with contextlib.closing(grpcclient.InferenceServerClient(url, **(tls.client_options() if tls else {}))) as client:
        return process_answers(client, timeout_s)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m services.triton.probe", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--timeout-s", type=float, default=5.0)
    parser.add_argument("--tls-ca", type=Path, help="PEM CA of a service serving TLS (--tls-cert)")
    parser.add_argument("--tls-cert", type=Path, help="client certificate for mutual TLS (with --tls-key)")
    parser.add_argument("--tls-key", type=Path)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    tls = None if args.tls_ca is None else ClientTLS(args.tls_ca, args.tls_cert, args.tls_key)
    url = f"{args.host}:{args.grpc_port}"
    if answers(url, args.timeout_s, tls):
        return 0
    print(f"the model service at {url} did not answer within {args.timeout_s:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
