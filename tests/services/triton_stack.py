"""The three Triton model services as real subprocesses on free loopback ports, for integration tests.

A thin layer over services.triton.stack: the tests' options (one torch thread per service, a long queue
delay so concurrent steps visibly share a batch), logs and workspaces in temporary directories.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

from services.triton.stack import ServiceOptions, ServicePorts, ServiceStack, TritonService


def options_for_tests(max_worlds: int = 16, workspace_root: Path | None = None,
                      environment: dict[str, str] | None = None) -> ServiceOptions:
    # Three services share the test machine's cores: one torch thread each avoids oversubscription.
    return ServiceOptions(max_worlds=max_worlds, max_queue_delay_us=20_000, workspace_root=workspace_root,
                          torch_threads=1, environment=environment or {})


def lone_service(kind: str, checkpoint: Path, model_name: str, log_dir: Path, max_worlds: int,
                 port_wait_s: float | None = None) -> TritonService:
    """One more service beside a stack, on its own free ports, logging to log_dir/<kind>.log; port_wait_s: how
    long it waits for ports held by another (None: the service's default)."""
    options = replace(options_for_tests(max_worlds), port_wait_s=port_wait_s)
    return TritonService(kind, checkpoint, model_name, ServicePorts.free(), options, Path(log_dir) / f"{kind}.log")


@contextlib.contextmanager
def running_stack(checkpoint: Path | None, model_name: str, max_worlds: int = 16,
                  environment: dict[str, str] | None = None, hold_lease_s: float | None = None) -> Iterator[ServiceStack]:
    """checkpoint None: catalog services (--catalog), with the store named in environment (GENIE_STORE_*) and
    holds on versions lapsing after hold_lease_s unrenewed (None: the services' default)."""
    # Workspaces get their own short root (Unix socket paths are short), removed even after a SIGKILL.
    with tempfile.TemporaryDirectory(prefix="genie-triton-test-") as log_dir, \
            tempfile.TemporaryDirectory(prefix="genie-ws-") as workspace_root:
        options = replace(options_for_tests(max_worlds, Path(workspace_root), environment), hold_lease_s=hold_lease_s)
        with ServiceStack(checkpoint, model_name, options, log_dir=Path(log_dir)) as stack:
            yield stack


@contextlib.contextmanager
def triton_stack(checkpoint: Path, model_name: str) -> Iterator[dict]:
    """The stack for the gateway tests: yields GatewaySettings overrides selecting backend="triton"."""
    with running_stack(checkpoint, model_name) as stack:
        yield stack.overrides()
