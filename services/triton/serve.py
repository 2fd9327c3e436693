"""Start one Triton model service (tokenizer, lam or dynamics) for one trained world, in this process.

`python -m services.triton KIND --checkpoint DIR --model-name NAME --grpc-port P ...`; `genie serve KIND`
calls `main(argv)` or `serve(kind, settings)` here. Each process gets its own ports and PyTriton workspace.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sysconfig
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pytriton.model_config import Tensor
from pytriton.proxy.types import Request
from pytriton.triton import Triton, TritonConfig

from genie_models.world_model import WorldModel
from services.backends.base import ModelInfo
from services.backends.inprocess import model_info
from services.triton import protocol
from services.triton.batching import UNBATCHED, Binding, batched_config

logger = logging.getLogger("genie.triton")

# PyTriton puts sockets like <workspace>/dynamics_step_0_0-server.sock in it; Unix socket paths stop at 107 bytes.
MAX_WORKSPACE_CHARS = 60


@dataclass(frozen=True)
class ServiceSettings:
    checkpoint: Path
    model_name: str
    grpc_port: int = 8001
    http_port: int = 8000
    metrics_port: int = 8002
    address: str = "0.0.0.0"
    workspace_root: Path | None = None  # a fresh workspace is made inside it (default: the temp dir)
    max_worlds: int = 256  # world caches kept; the least recently used is evicted beyond this
    max_batch_size: int = 64
    max_queue_delay_us: int = 500  # how long a step waits for others to join its batch
    device: str = "cpu"


def info_binding(info: ModelInfo, kind: str) -> Binding:
    """A tiny model answering which world (and which part of it) this service serves."""
    payload = np.array([protocol.info_to_json(info, kind)], dtype=object)

    def answer(requests: list[Request]) -> list[dict[str, np.ndarray]]:
        return [{"info": payload} for _ in requests]

    return Binding(protocol.INFO, answer, [Tensor(name="query", dtype=bytes, shape=(1,))],
                   [Tensor(name="info", dtype=bytes, shape=(1,))], UNBATCHED)


def build_bindings(kind: str, model: WorldModel, settings: ServiceSettings) -> list[Binding]:
    # Imported here so each service loads only its own model code path.
    batcher = batched_config(settings.max_batch_size, settings.max_queue_delay_us)
    if kind == "tokenizer":
        from services.triton.tokenizer_service import TokenizerService
        service = TokenizerService(model.tokenizer, settings.max_worlds, settings.device)
        return service.bindings(batcher)
    if kind == "lam":
        from services.triton.lam_service import LatentActionService
        return LatentActionService(model.lam, settings.device).bindings()
    if kind == "dynamics":
        from services.triton.dynamics_service import DynamicsService
        return DynamicsService(model.dynamics, settings.max_worlds, settings.device).bindings(batcher)
    raise ValueError(f"unknown service kind {kind!r}; kinds are {', '.join(protocol.SERVICE_KINDS)}")


def triton_config(settings: ServiceSettings) -> TritonConfig:
    return TritonConfig(grpc_port=settings.grpc_port, http_port=settings.http_port,
                        metrics_port=settings.metrics_port, grpc_address=settings.address,
                        http_address=settings.address, metrics_address=settings.address,
                        allow_metrics=True, allow_gpu_metrics=settings.device.startswith("cuda"),
                        exit_timeout_secs=10)


def use_own_libpython() -> None:
    """Put this interpreter's libpython first for the Triton Python-backend stub, which PyTriton starts with
    a copy of our environment; a system libpython of another patch release breaks it (ENVIRONMENT.md)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    paths = os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep)
    if libdir and paths[0] != libdir:
        os.environ["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [libdir, *paths]))


def serve(kind: str, settings: ServiceSettings) -> None:
    """Load the world, bind its Triton models and serve until SIGTERM/SIGINT (then stop gracefully)."""
    if not protocol.MODEL_NAME_PATTERN.match(settings.model_name):
        raise ValueError(f"model name {settings.model_name!r} must match {protocol.MODEL_NAME_PATTERN.pattern}")
    model = WorldModel.load(settings.checkpoint, device=settings.device)
    bindings = [info_binding(model_info(model, settings.model_name), kind), *build_bindings(kind, model, settings)]
    # PyTriton refuses an existing workspace dir; a private parent keeps concurrent processes apart.
    parent = Path(tempfile.mkdtemp(prefix=f"genie-{kind}-", dir=settings.workspace_root))
    if len(str(parent)) > MAX_WORKSPACE_CHARS:
        shutil.rmtree(parent)
        raise ValueError(f"workspace {parent} is too long for the Unix sockets PyTriton makes in it; "
                         f"pass a --workspace-root of at most {MAX_WORKSPACE_CHARS - 25} characters")
    use_own_libpython()
    # Triton.serve() stops the server cleanly on KeyboardInterrupt; make SIGTERM (Kubernetes, tests) do the same.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with Triton(config=triton_config(settings), workspace=parent / "ws") as triton:
            for binding in bindings:
                triton.bind(model_name=binding.name, infer_func=binding.infer, inputs=binding.inputs,
                            outputs=binding.outputs, config=binding.config, strict=True)
            logger.info("serving %s of world %r on grpc :%d", kind, settings.model_name, settings.grpc_port)
            triton.serve()
    finally:
        shutil.rmtree(parent, ignore_errors=True)


def parse_args(argv: Sequence[str] | None) -> tuple[str, ServiceSettings]:
    parser = argparse.ArgumentParser(prog="python -m services.triton", description=__doc__)
    parser.add_argument("kind", choices=protocol.SERVICE_KINDS)
    parser.add_argument("--checkpoint", type=Path, required=True, help="trained world directory")
    parser.add_argument("--model-name", required=True, help="the world model's name in the gateway")
    defaults = ServiceSettings(Path("."), "")
    for name in ("grpc_port", "http_port", "metrics_port", "max_worlds", "max_batch_size", "max_queue_delay_us"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    parser.add_argument("--address", default=defaults.address, help="interface every endpoint binds")
    parser.add_argument("--workspace-root", type=Path, default=None)
    parser.add_argument("--device", default=defaults.device)
    args = vars(parser.parse_args(argv))
    kind = args.pop("kind")
    return kind, ServiceSettings(**args)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    kind, settings = parse_args(argv)
    serve(kind, settings)
