"""The `triton` model backend: each world model's tokenizer, latent-action and dynamics services over gRPC.

World caches live in the dynamics and tokenizer services, keyed by world id; a service that restarted or
evicted a world answers "not cached", which surfaces as WorldsNotCached so the gateway rebuilds it.
A published version is loaded into a name's services (run with --catalog) through their `control` model and
served under versioned Triton model names, so old and new versions play side by side in the same processes.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from services.backends.base import BackendError, ModelInfo, ModelUnavailable, StepResult, WorldsNotCached, WorldStep
from services.settings import GatewaySettings
from services.stores.catalog import ModelCatalog, ModelVersion, split_key
from services.triton import protocol
from services.triton.client import ServiceClient, ids_column
from services.triton.protocol import Status

log = logging.getLogger(__name__)


@dataclass
class WorldServices:
    """The three services of one world model (one version of it), and its info once a service has confirmed it."""

    name: str  # the model key: a fixed model's name, or name@N
    tokenizer: ServiceClient
    lam: ServiceClient
    dynamics: ServiceClient
    version: int | None = None  # published version (served under versioned Triton model names)
    info: ModelInfo | None = None

    def model(self, base: str) -> str:
        return protocol.versioned(base, self.version)


def _connect(name: str, urls: dict[str, str], settings: GatewaySettings) -> dict[str, ServiceClient]:
    missing = [kind for kind in protocol.SERVICE_KINDS if kind not in urls]
    if missing:
        raise ValueError(f"triton_endpoints[{name!r}] lacks {', '.join(missing)}; "
                         f"each model needs {', '.join(protocol.SERVICE_KINDS)}")
    return {kind: ServiceClient(urls[kind], f"{name} {kind} service", settings.max_message_bytes,
                                settings.step_deadline_s) for kind in protocol.SERVICE_KINDS}


# How Triton answers a request for a model it does not have (here: a version a restarted service has not reloaded).
UNKNOWN_MODEL = "unknown model"


# A batch goes out as few multi-row requests (one round trip and one PyTriton hand-off per request, not per
# world); Triton's dynamic batcher still merges them with other gateways'. Needs --max-batch-size >= this.
ROWS_PER_REQUEST = 16


def _chunks(steps: Sequence[WorldStep]) -> list[Sequence[WorldStep]]:
    return [steps[start:start + ROWS_PER_REQUEST] for start in range(0, len(steps), ROWS_PER_REQUEST)]


def _statuses(results) -> list[Status]:
    return [Status(int(value)) for result in results for value in result.as_numpy("status").reshape(-1)]


class TritonBackend:
    """Implements services.backends.base.ModelBackend against the Triton model services."""

    def __init__(self, settings: GatewaySettings):
        self._clients = {name: _connect(name, urls, settings) for name, urls in settings.triton_endpoints.items()}
        self._worlds = {name: WorldServices(name, **clients) for name, clients in self._clients.items()
                        if name not in settings.catalog_models}
        self._holder = f"gateway-{uuid.uuid4().hex[:12]}"  # this gateway's holds on versions in the services

    def _get(self, model: str) -> WorldServices:
        services = self._worlds.get(model)
        if services is None:
            raise ModelUnavailable(f"model {model!r} is not served by this backend; serving: "
                                   f"{', '.join(self._worlds) or 'none'}")
        if services.info is None:
            services.info = self._confirm(services)
        return services

    def _confirm(self, services: WorldServices) -> ModelInfo:
        """Ask every service what it serves, so a miswired endpoint fails loudly instead of playing nonsense."""
        query = {"query": np.array([b""], dtype=object)}
        infos = []
        for kind in protocol.SERVICE_KINDS:
            client = getattr(services, kind)
            answer = client.infer(services.model(protocol.INFO), query).as_numpy("info").reshape(-1)[0]
            info, served_kind = protocol.info_from_json(answer)
            if (info.name, served_kind) != (services.name, kind):
                raise ModelUnavailable(f"{client.url} serves the {served_kind} of {info.name!r}, "
                                       f"not the {kind} of {services.name!r}: check triton_endpoints")
            infos.append(info)
        return infos[-1]

    def models(self) -> list[ModelInfo]:
        return [self._get(name).info for name in list(self._worlds) if "@" not in name]

    def load_version(self, model: ModelVersion, catalog: ModelCatalog) -> ModelInfo:
        """Asks the name's three services to load the version (each fetches it from the catalog itself)."""
        if model.ref not in self._worlds:
            clients = self._clients.get(model.name)
            if clients is None:
                raise ModelUnavailable(f"model {model.name!r} has no Triton endpoints; configured: "
                                       f"{', '.join(self._clients) or 'none'}")
            self._control(clients, "load", model.version)
            self._worlds.setdefault(model.ref, WorldServices(model.ref, **clients, version=model.version))
        return self._get(model.ref).info

    def unload_version(self, key: str) -> None:
        services = self._worlds.pop(key, None)
        if services is not None and services.version is not None:
            self._control({kind: getattr(services, kind) for kind in protocol.SERVICE_KINDS}, "unload",
                          services.version)

    def _control(self, clients: dict[str, ServiceClient], action: str, version: int) -> None:
        """One control request per service, in parallel: each loads its part of the version (seconds)."""
        command = {"command": np.array([protocol.control_command(action, version, self._holder)], dtype=object)}

        def send(client: ServiceClient) -> list[int]:
            answer = client.infer(protocol.CONTROL, command, timeout_s=protocol.CONTROL_TIMEOUT_S)
            return json.loads(answer.as_numpy("loaded").reshape(-1)[0])["loaded"]

        with ThreadPoolExecutor(len(clients)) as pool:
            list(pool.map(send, clients.values()))

    def _reloaded(self, services: WorldServices, error: ModelUnavailable) -> bool:
        """Whether a --catalog service that answered without this version (it restarted since it loaded it) has
        loaded it again now: the version is immutable, so reloading it restores exactly what was served."""
        if services.version is None or UNKNOWN_MODEL not in str(error):
            return False
        try:
            self._control(self._clients[split_key(services.name)[0]], "load", services.version)
        except (BackendError, ValueError):
            return False
        log.info("reloaded %s in its restarted model services", services.name)
        return True

    def _once_more_after_reload(self, services: WorldServices, call: Callable[[], np.ndarray]) -> np.ndarray:
        try:
            return call()
        except ModelUnavailable as error:
            if not self._reloaded(services, error):
                raise
        return call()

    def encode(self, model: str, frames: np.ndarray) -> np.ndarray:
        services = self._get(model)
        return self._once_more_after_reload(services, lambda: services.tokenizer.infer(
            services.model(protocol.TOKENIZER_ENCODE), {"frames": np.ascontiguousarray(frames)}).as_numpy("tokens"))

    def infer_actions(self, model: str, frames: np.ndarray) -> np.ndarray:
        services = self._get(model)
        result = services.lam.infer(services.model(protocol.LAM_LABEL), {"frames": np.ascontiguousarray(frames)})
        return result.as_numpy("actions")

    def start_world(self, model: str, world_id: str, tokens: np.ndarray, actions: np.ndarray,
                    first_position: int = 0) -> np.ndarray:
        services = self._get(model)
        tokens = np.asarray(tokens, dtype=np.int64)
        position = np.array([first_position], dtype=np.int64)

        def start() -> np.ndarray:
            services.dynamics.infer(services.model(protocol.DYNAMICS_START), {
                "world_id": ids_column(world_id, rows=False), "tokens": tokens.reshape(len(tokens), -1),
                "actions": np.asarray(actions, dtype=np.int64), "first_position": position})
            result = services.tokenizer.infer(services.model(protocol.TOKENIZER_START), {
                "world_id": ids_column(world_id, rows=False), "tokens": tokens, "first_position": position})
            return result.as_numpy("frames")

        return self._once_more_after_reload(services, start)

    def step_worlds(self, model: str, steps: Sequence[WorldStep]) -> list[StepResult]:
        """Step on the dynamics service, then decode on the tokenizer service; one request per world, all
        in flight at once, so each service's dynamic batcher runs them (and other gateways') together.

        A failure never half-applies: both services keep the step index each world expects next, so a world
        that advanced in one service before the batch failed answers "not cached" on its retry (same index)
        and is rebuilt from the caller's history instead of playing from a cache a frame ahead."""
        services = self._get(model)
        grid = services.info.grid_size
        try:
            tokens = self._sample(services, steps).reshape(len(steps), grid, grid)
            frames = self._decode(services, steps, tokens)
        except ModelUnavailable as error:
            if self._reloaded(services, error):  # the restarted service has no world caches either: rebuild them
                raise WorldsNotCached([step.world_id for step in steps]) from error
            raise
        return [StepResult(tokens=tokens[index], frame=frames[index]) for index in range(len(steps))]

    def _sample(self, services: WorldServices, steps: Sequence[WorldStep]) -> np.ndarray:
        requests = [{"world_id": np.array([[step.world_id.encode("utf-8")] for step in chunk], dtype=object),
                     "action": np.array([[step.action] for step in chunk], dtype=np.int64),
                     "seed": np.array([[step.seed] for step in chunk], dtype=np.int64),
                     "step_index": np.array([[step.step_index] for step in chunk], dtype=np.int64),
                     "num_maskgit_steps": np.array([[step.num_maskgit_steps] for step in chunk], dtype=np.int32),
                     "temperature": np.array([[step.temperature] for step in chunk], dtype=np.float32)}
                    for chunk in _chunks(steps)]
        results = services.dynamics.infer_many(services.model(protocol.DYNAMICS_STEP), requests)
        self._check(steps, _statuses(results), "dynamics")
        return np.concatenate([result.as_numpy("tokens") for result in results])  # [B, S]

    def _decode(self, services: WorldServices, steps: Sequence[WorldStep], tokens: np.ndarray) -> np.ndarray:
        requests = [{"world_id": np.array([[step.world_id.encode("utf-8")] for step in chunk], dtype=object),
                     "tokens": tokens[start:start + len(chunk)],
                     "step_index": np.array([[step.step_index] for step in chunk], dtype=np.int64)}
                    for start, chunk in zip(range(0, len(steps), ROWS_PER_REQUEST), _chunks(steps))]
        results = services.tokenizer.infer_many(services.model(protocol.TOKENIZER_DECODE), requests)
        self._check(steps, _statuses(results), "tokenizer")
        return np.concatenate([result.as_numpy("frames") for result in results])  # [B, H, W, 3]

    @staticmethod
    def _check(steps: Sequence[WorldStep], statuses: list[Status], kind: str) -> None:
        invalid = [step.world_id for step, status in zip(steps, statuses) if status == Status.INVALID]
        if invalid:
            raise ValueError(f"the {kind} service refused the steps of worlds {invalid}: action, step count "
                             f"or temperature out of range, or a world twice in one batch")
        if any(status == Status.NOT_CACHED for status in statuses):
            # The gateway retries the whole batch after rebuilding, so every world in it must be rebuilt:
            # the others may already have advanced in this or the other service.
            raise WorldsNotCached([step.world_id for step in steps])

    def end_world(self, model: str, world_id: str) -> None:
        self._end(self._get(model), world_id)

    @staticmethod
    def _end(services: WorldServices, world_id: str) -> None:
        ids = {"world_id": ids_column(world_id, rows=False)}
        services.dynamics.infer(services.model(protocol.DYNAMICS_END), ids)
        services.tokenizer.infer(services.model(protocol.TOKENIZER_END), ids)

    def close(self) -> None:
        """Lets go of this gateway's versions in the services (other gateways' holds keep theirs loaded)."""
        for key in [key for key, services in list(self._worlds.items()) if services.version is not None]:
            try:
                self.unload_version(key)
            except (BackendError, ValueError) as error:  # a service that is down has nothing loaded to free
                log.warning("releasing %s in the model services failed: %s", key, error)
        for clients in self._clients.values():
            for client in clients.values():
                client.close()
