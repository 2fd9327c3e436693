"""Small client-side helpers of the serving tests: prompt images and frame decoding.

Kept apart from conftest.py so tests import them by name.
"""

from __future__ import annotations

import io
import socket
import subprocess
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from genie.v1 import world_pb2 as pb

MODEL_NAME = "tiny-test"
MAX_WORLDS = 24  # the test gateways' limit
MAX_MESSAGE_BYTES = 32 * 2**20


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def open_channel(port: int) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{port}", options=[
        ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES), ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)


def encoded(pixels: np.ndarray, image_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=image_format)
    return buffer.getvalue()


def png_prompt(width: int = 40, height: int = 30, seed: int = 0) -> pb.PromptImage:
    return pb.PromptImage(encoded=encoded(picture(width, height, seed), "PNG"))


def create_request(seed: int = 0, prompt: pb.PromptImage | None = None, model: str = MODEL_NAME,
                   output_format: int = pb.FRAME_FORMAT_UNSPECIFIED) -> pb.CreateWorldRequest:
    return pb.CreateWorldRequest(model=model, prompt=prompt or png_prompt(), sampling=pb.SamplingParams(seed=seed),
                                 output_format=output_format)


def pixels_of(frame: pb.Frame) -> np.ndarray:
    if frame.format == pb.FRAME_FORMAT_PNG:
        return np.asarray(Image.open(io.BytesIO(frame.data)).convert("RGB"))
    return np.frombuffer(frame.data, dtype=np.uint8).reshape(frame.height, frame.width, frame.channels)


def wait_serving(port: int, timeout_s: float = 90, describe=lambda: "") -> None:
    """Polls gRPC health on 127.0.0.1:port until SERVING; after timeout_s fails with describe()'s text."""
    deadline = time.monotonic() + timeout_s
    with open_channel(port) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as error:
                if time.monotonic() > deadline:
                    raise AssertionError(f"nothing serving on port {port}: {error.code()}\n{describe()}") from error
            time.sleep(0.1)


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def certificates(directory: Path) -> dict[str, Path]:
    """A CA, a server certificate for localhost/127.0.0.1 and a client certificate, all signed by the CA."""
    paths = {name: directory / name for name in ("ca.key", "ca.pem", "server.key", "server.pem", "client.key",
                                                 "client.pem", "san.ext")}
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=genie-test-ca",
            "-keyout", str(paths["ca.key"]), "-out", str(paths["ca.pem"]))
    paths["san.ext"].write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for who in ("server", "client"):
        request = directory / f"{who}.csr"
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={who}", "-keyout", str(paths[f"{who}.key"]),
                "-out", str(request))
        openssl("x509", "-req", "-in", str(request), "-CA", str(paths["ca.pem"]), "-CAkey", str(paths["ca.key"]),
                "-CAcreateserial", "-days", "2", "-extfile", str(paths["san.ext"]), "-out", str(paths[f"{who}.pem"]))
    return paths


def bearer(key: str) -> list[tuple[str, str]]:
    """Call metadata carrying an API key."""
    return [("authorization", f"Bearer {key}")]


def failure(call, request, metadata=None) -> tuple[grpc.StatusCode, str]:
    """The status code and details of a call that must fail; a streaming call's answer is read to its end."""
    with pytest.raises(grpc.RpcError) as error:
        answer = call(request, metadata=metadata, timeout=60)
        if isinstance(answer, grpc.Call):
            list(answer)
    return error.value.code(), error.value.details()
