"""A thin client for one Triton model service: numpy in, numpy out, Triton errors mapped to backend errors.

Used by `services/backends/triton.py`; imports no torch, so the gateway process stays free of model code.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from services.backends.base import BackendError, ModelUnavailable
from services.triton import protocol

# gRPC statuses meaning "the service is down, restarting, overloaded or not loaded": try again later.
# (DEADLINE_EXCEEDED is ReplicaTimedOut, told apart first in ServiceClient._error.)
UNAVAILABLE_STATUSES = {"StatusCode.UNAVAILABLE", "StatusCode.NOT_FOUND", "StatusCode.CANCELLED",
                        "StatusCode.RESOURCE_EXHAUSTED", None}
# How Triton answers a request for a model it does not have: a --catalog service without the version, or any
# service while it stops gracefully (it unloads every model first, ~2 s measured, then closes its port).
UNKNOWN_MODEL = "unknown model"
# UNAVAILABLE with these words comes from a live server, not from a connection that failed.
MODEL_UNAVAILABLE = re.compile(r"unknown model|not ready|not found", re.IGNORECASE)
# PyTriton reports a model function's PyTritonBadParameterError as INTERNAL with this text inside.
BAD_PARAMETER = re.compile(r"PyTritonBadParameterError: (.*)")


class ReplicaUnavailable(ModelUnavailable):
    """A service answered that it cannot serve the request now; url says which replica."""

    def __init__(self, message: str, url: str):
        super().__init__(message)
        self.url = url


class ServiceDown(ReplicaUnavailable):
    """The service cannot be reached at all (connection refused, reset, gone): another replica takes its worlds."""


class ModelMissing(ReplicaUnavailable):
    """The service is up but has no such model: it is stopping, or (--catalog) has not bound this version."""


class ReplicaTimedOut(ReplicaUnavailable):
    """The service took a request but gave no answer before the deadline: its process hangs (a deadlock, SIGSTOP)
    or is far behind. Its worlds move to live replicas, as a lost replica's do; it takes worlds again once its own
    process answers (ServiceClient.answers)."""


def process_answers(client: grpcclient.InferenceServerClient, timeout_s: float) -> bool:
    """Whether a model service's own Python process answers a request within timeout_s. Triton's health endpoints
    cannot tell: tritonserver answers them while the process that runs our models hangs. The request is the `info`
    model of a service with a fixed world or, for a --catalog service (no `info` until a version is bound), a control
    command it refuses at once without touching any version."""
    try:
        client.infer(protocol.INFO, to_inputs({"query": np.array([b""], dtype=object)}), client_timeout=timeout_s)
        return True
    except InferenceServerException as error:
        if UNKNOWN_MODEL not in str(error).lower():  # tritonserver answers that itself: try the catalog way
            return False
    try:
        client.infer(protocol.CONTROL, to_inputs({"command": np.array([b"probe"], dtype=object)}),
                     client_timeout=timeout_s)
    except InferenceServerException as error:
        return "not JSON" in str(error)  # refused by our own process: it answers
    return True


def channel_options(max_message_bytes: int) -> list[tuple[str, int]]:
    """Message limits, and reconnect attempts at most 1 s apart: a call never waits for a connection (no
    wait_for_ready), so a service that is down answers UNAVAILABLE at once, and one that came back is used
    within ~1 s instead of after gRPC's default reconnect backoff (up to 120 s)."""
    return [("grpc.max_send_message_length", max_message_bytes),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1000)]


def to_inputs(arrays: Mapping[str, np.ndarray]) -> list[grpcclient.InferInput]:
    inputs = []
    for name, array in arrays.items():
        datatype = "BYTES" if array.dtype == object else np_to_triton_dtype(array.dtype)
        tensor = grpcclient.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


def ids_column(world_id: str, rows: bool) -> np.ndarray:
    """A world id as a BYTES tensor: [1] for unbatched models, [1, 1] (one row) for batched ones."""
    column = np.array([world_id.encode("utf-8")], dtype=object)
    return column[None] if rows else column


@dataclass(frozen=True)
class ClientTLS:
    """TLS towards the model services: the CA that signed their certificates, and for mutual TLS our own."""

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None
    # The name the service's certificate must carry when we dial an address that is not that name: dns discovery
    # dials each replica's IP, while the certificate names the Service (None: verify the dialled host).
    server_name: str | None = None

    def __post_init__(self):
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("triton_tls_cert_file and triton_tls_key_file go together (mutual TLS), or neither")
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"TLS file {path}: no such file")

    def client_options(self) -> dict:
        """tritonclient's TLS arguments (it reads the files itself)."""
        return {"ssl": True, "root_certificates": str(self.ca_file),
                "private_key": None if self.key_file is None else str(self.key_file),
                "certificate_chain": None if self.cert_file is None else str(self.cert_file)}

    def channel_args(self) -> list[tuple[str, str]]:
        """gRPC channel arguments that verify the certificate against server_name (empty without one)."""
        return [] if self.server_name is None else [("grpc.ssl_target_name_override", self.server_name)]


class ServiceClient:
    """One Triton service (tokenizer, lam or dynamics) of one world model."""

    def __init__(self, url: str, what: str, max_message_bytes: int, timeout_s: float, tls: ClientTLS | None = None):
        self.url, self.what, self.timeout_s = url, what, timeout_s
        arguments = channel_options(max_message_bytes) + (tls.channel_args() if tls else [])
        self.client = grpcclient.InferenceServerClient(url, channel_args=arguments,
                                                       **(tls.client_options() if tls else {}))

    def _error(self, error: InferenceServerException) -> Exception:
        message = error.message() or str(error)
        if error.status() == "StatusCode.DEADLINE_EXCEEDED":
            return ReplicaTimedOut(f"{self.what} at {self.url} did not answer before the deadline: {message}",
                                   self.url)
        if error.status() == "StatusCode.UNAVAILABLE" and not MODEL_UNAVAILABLE.search(message):
            return ServiceDown(f"{self.what} at {self.url} is unavailable: {message}", self.url)
        if UNKNOWN_MODEL in message.lower():
            return ModelMissing(f"{self.what} at {self.url} is unavailable: {message}", self.url)
        if error.status() in UNAVAILABLE_STATUSES:
            return ModelUnavailable(f"{self.what} at {self.url} is unavailable: {message}")
        bad = BAD_PARAMETER.search(message)
        if bad:
            return ValueError(f"{self.what} refused the request: {bad.group(1)}")
        if error.status() == "StatusCode.INVALID_ARGUMENT":  # Triton's own checks: shapes, dtypes
            return ValueError(f"{self.what} refused the request: {message}")
        return BackendError(f"{self.what} at {self.url} failed: {message}")

    def infer(self, model_name: str, arrays: Mapping[str, np.ndarray],
              timeout_s: float | None = None) -> grpcclient.InferResult:
        try:
            return self.client.infer(model_name, to_inputs(arrays), client_timeout=timeout_s or self.timeout_s)
        except InferenceServerException as error:
            raise self._error(error) from error

    def infer_many(self, model_name: str, requests: Sequence[Mapping[str, np.ndarray]]) -> list[grpcclient.InferResult]:
        """Send all requests at once (so Triton's dynamic batcher can batch them) and wait for every answer."""
        return self.gather(self.submit(model_name, requests))

    def submit(self, model_name: str, requests: Sequence[Mapping[str, np.ndarray]]) -> list[Future]:
        """Sends the requests without waiting: gather() their futures (requests to several replicas overlap)."""
        futures: list[Future] = []
        for arrays in requests:
            future: Future = Future()
            futures.append(future)
            self.client.async_infer(model_name, to_inputs(arrays), callback=self._settle(future),
                                    client_timeout=self.timeout_s)
        return futures

    def gather(self, futures: Sequence[Future]) -> list[grpcclient.InferResult]:
        # The client deadline settles every future; the margin only guards against a lost callback.
        _, pending = wait(futures, timeout=self.timeout_s + 5)
        if pending:
            raise ReplicaTimedOut(f"{self.what} at {self.url} did not answer within {self.timeout_s} s", self.url)
        errors = [future.exception() for future in futures if future.exception() is not None]
        if errors:
            raise self._error(errors[0]) from errors[0]
        return [future.result() for future in futures]

    @staticmethod
    def _settle(future: Future):
        def callback(result: grpcclient.InferResult | None, error: InferenceServerException | None) -> None:
            if error is not None:
                future.set_exception(error)
            else:
                future.set_result(result)
        return callback

    def ready(self, timeout_s: float = 1.0) -> bool:
        """Whether the service answers Triton's readiness check now (a probe of a replica that was down)."""
        try:
            return self.client.is_server_ready(client_timeout=timeout_s)
        except InferenceServerException:
            return False

    def answers(self, timeout_s: float = 2.0) -> bool:
        """Whether the service's own process answers now (the probe of a replica that was down or hung)."""
        return process_answers(self.client, timeout_s)

    def close(self) -> None:
        self.client.close()
