"""The `triton` model backend: each world model's tokenizer, latent-action and dynamics services over gRPC.

World caches live in the dynamics and tokenizer services, keyed by world id; a service that restarted or
evicted a world answers "not cached", which surfaces as WorldsNotCached so the gateway rebuilds it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from services.backends.base import ModelInfo, ModelUnavailable, StepResult, WorldsNotCached, WorldStep
from services.settings import GatewaySettings
from services.triton import protocol
from services.triton.client import ServiceClient, ids_column
from services.triton.protocol import Status


@dataclass
class WorldServices:
    """The three services of one world model, and its info once a service has confirmed it."""

    name: str
    tokenizer: ServiceClient
    lam: ServiceClient
    dynamics: ServiceClient
    info: ModelInfo | None = None


def _connect(name: str, urls: dict[str, str], settings: GatewaySettings) -> WorldServices:
    missing = [kind for kind in protocol.SERVICE_KINDS if kind not in urls]
    if missing:
        raise ValueError(f"triton_endpoints[{name!r}] lacks {', '.join(missing)}; "
                         f"each model needs {', '.join(protocol.SERVICE_KINDS)}")
    clients = {kind: ServiceClient(urls[kind], f"{name} {kind} service", settings.max_message_bytes,
                                   settings.step_deadline_s) for kind in protocol.SERVICE_KINDS}
    return WorldServices(name, **clients)


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
        self._worlds = {name: _connect(name, urls, settings) for name, urls in settings.triton_endpoints.items()}

    def _get(self, model: str) -> WorldServices:
        services = self._worlds.get(model)
        if services is None:
            raise ModelUnavailable(f"model {model!r} has no Triton endpoints; configured: "
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
            answer = client.infer(protocol.INFO, query).as_numpy("info").reshape(-1)[0]
            info, served_kind = protocol.info_from_json(answer)
            if (info.name, served_kind) != (services.name, kind):
                raise ModelUnavailable(f"{client.url} serves the {served_kind} of {info.name!r}, "
                                       f"not the {kind} of {services.name!r}: check triton_endpoints")
            infos.append(info)
        return infos[-1]

    def models(self) -> list[ModelInfo]:
        return [self._get(name).info for name in self._worlds]

    def encode(self, model: str, frames: np.ndarray) -> np.ndarray:
        result = self._get(model).tokenizer.infer(protocol.TOKENIZER_ENCODE, {"frames": np.ascontiguousarray(frames)})
        return result.as_numpy("tokens")

    def infer_actions(self, model: str, frames: np.ndarray) -> np.ndarray:
        result = self._get(model).lam.infer(protocol.LAM_LABEL, {"frames": np.ascontiguousarray(frames)})
        return result.as_numpy("actions")

    def start_world(self, model: str, world_id: str, tokens: np.ndarray, actions: np.ndarray,
                    first_position: int = 0) -> np.ndarray:
        services = self._get(model)
        tokens = np.asarray(tokens, dtype=np.int64)
        position = np.array([first_position], dtype=np.int64)
        services.dynamics.infer(protocol.DYNAMICS_START, {
            "world_id": ids_column(world_id, rows=False), "tokens": tokens.reshape(len(tokens), -1),
            "actions": np.asarray(actions, dtype=np.int64), "first_position": position})
        result = services.tokenizer.infer(protocol.TOKENIZER_START, {
            "world_id": ids_column(world_id, rows=False), "tokens": tokens, "first_position": position})
        return result.as_numpy("frames")

    def step_worlds(self, model: str, steps: Sequence[WorldStep]) -> list[StepResult]:
        """Step on the dynamics service, then decode on the tokenizer service; one request per world, all
        in flight at once, so each service's dynamic batcher runs them (and other gateways') together.

        A failure never half-applies: both services keep the step index each world expects next, so a world
        that advanced in one service before the batch failed answers "not cached" on its retry (same index)
        and is rebuilt from the caller's history instead of playing from a cache a frame ahead."""
        services = self._get(model)
        grid = services.info.grid_size
        tokens = self._sample(services, steps).reshape(len(steps), grid, grid)
        frames = self._decode(services, steps, tokens)
        return [StepResult(tokens=tokens[index], frame=frames[index]) for index in range(len(steps))]

    def _sample(self, services: WorldServices, steps: Sequence[WorldStep]) -> np.ndarray:
        requests = [{"world_id": np.array([[step.world_id.encode("utf-8")] for step in chunk], dtype=object),
                     "action": np.array([[step.action] for step in chunk], dtype=np.int64),
                     "seed": np.array([[step.seed] for step in chunk], dtype=np.int64),
                     "step_index": np.array([[step.step_index] for step in chunk], dtype=np.int64),
                     "num_maskgit_steps": np.array([[step.num_maskgit_steps] for step in chunk], dtype=np.int32),
                     "temperature": np.array([[step.temperature] for step in chunk], dtype=np.float32)}
                    for chunk in _chunks(steps)]
        results = services.dynamics.infer_many(protocol.DYNAMICS_STEP, requests)
        self._check(steps, _statuses(results), "dynamics")
        return np.concatenate([result.as_numpy("tokens") for result in results])  # [B, S]

    def _decode(self, services: WorldServices, steps: Sequence[WorldStep], tokens: np.ndarray) -> np.ndarray:
        requests = [{"world_id": np.array([[step.world_id.encode("utf-8")] for step in chunk], dtype=object),
                     "tokens": tokens[start:start + len(chunk)],
                     "step_index": np.array([[step.step_index] for step in chunk], dtype=np.int64)}
                    for start, chunk in zip(range(0, len(steps), ROWS_PER_REQUEST), _chunks(steps))]
        results = services.tokenizer.infer_many(protocol.TOKENIZER_DECODE, requests)
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
        services.dynamics.infer(protocol.DYNAMICS_END, ids)
        services.tokenizer.infer(protocol.TOKENIZER_END, ids)

    def close(self) -> None:
        for services in self._worlds.values():
            for kind in protocol.SERVICE_KINDS:
                getattr(services, kind).close()
