"""The model catalog on a test's S3 server, and a gateway serving its published models in its own process
(`genie serve gateway` with GENIE_GATEWAY_CATALOG_MODELS): shared by test_model_versions.py and bench/bench_jobs.py.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from genie.v1 import world_pb2 as pb
from services.settings import StoreSettings
from services.stores import open_store
from services.stores.catalog import ModelCatalog
from services.triton import protocol
from tests.services.helpers import MAX_WORLDS, MODEL_NAME, create_request, free_port, png_prompt, wait_serving
from tests.services.jobs_servers import S3Server

# The `genie` command; with torch made unimportable (an import of it raises ImportError) for a torch-free gateway.
GENIE_MAIN = "import sys; from genie_models.cli import main; main(sys.argv[1:])"
WITHOUT_TORCH = "import sys; sys.modules['torch'] = None; " + GENIE_MAIN


def store_settings(server: S3Server, bucket: str, cache_dir: Path) -> dict[str, str]:
    return server.env(bucket=bucket, GENIE_STORE_CACHE_DIR=str(cache_dir), GENIE_STORE_RETRY_S="5")


def open_catalog(environment: dict[str, str]) -> ModelCatalog:
    settings = StoreSettings(**{key.removeprefix("GENIE_STORE_").lower(): value for key, value in environment.items()})
    return ModelCatalog(open_store(settings), Path(settings.cache_dir))


def create_world(stub, seed: int, model: str = MODEL_NAME) -> pb.CreateWorldResponse:
    return stub.CreateWorld(create_request(seed=seed, prompt=png_prompt(seed=seed), model=model), timeout=60)


@contextlib.contextmanager
def gateway_process(environment: dict[str, str], log: Path, torch_free: bool = False) -> Iterator[tuple[int, int]]:
    """`genie serve gateway` on free loopback ports, configured by environment (GENIE_GATEWAY_*, GENIE_STORE_*);
    yields (port, metrics_port) once it serves. torch_free: `import torch` fails in it (the triton backend, issue 10),
    so the caller can check its log for "import of torch halted"."""
    port, metrics_port = free_port(), free_port()
    environment = os.environ | {"GENIE_GATEWAY_HOST": "127.0.0.1", "GENIE_GATEWAY_AUTH": "none",
                                "GENIE_GATEWAY_MAX_WORLDS": str(MAX_WORLDS),
                                "GENIE_GATEWAY_BATCH_WINDOW_MS": "5"} | environment
    process = subprocess.Popen([sys.executable, "-c", WITHOUT_TORCH if torch_free else GENIE_MAIN, "serve", "gateway",
                                "--port", str(port), "--metrics-port", str(metrics_port)], env=environment,
                               stdout=subprocess.DEVNULL, stderr=log.open("ab"))
    try:
        # A triton gateway serves once the latest version is bound in every service: minutes on a loaded machine.
        wait_serving(port, timeout_s=protocol.CONTROL_TIMEOUT_S,
                     describe=lambda: log.read_text(errors="replace")[-3000:])
        yield port, metrics_port
    finally:
        process.terminate()
        process.wait(30)
