"""The `triton` model backend: each world model's tokenizer, latent-action and dynamics services over gRPC.

World caches live in the dynamics and tokenizer services, keyed by world id; a service that restarted or
evicted a world answers "not cached", which surfaces as WorldsNotCached so the gateway rebuilds it.
A published version is loaded into a name's services (run with --catalog) through their `control` model and
served under versioned Triton model names, so old and new versions play side by side in the same processes.
Each service may run as several replicas (found by a discovery plugin); each world is pinned to one replica of
each kind (services/backends/replicas.py), and a replica that cannot be reached, or hangs (no answer within half
the step deadline), hands its worlds to live ones.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import threading
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

import numpy as np

from services import registry
from services.backends.base import BackendError, ModelInfo, ModelUnavailable, StepResult, WorldsNotCached, WorldStep
from services.backends.discovery import split_address
from services.backends.replicas import Refresher, Replica, ReplicaSet
from services.metrics import GatewayMetrics
from services.settings import GatewaySettings
from services.stores.catalog import ModelCatalog, ModelVersion, split_key
from services.triton import protocol
from services.triton.client import (ClientTLS, ModelMissing, ReplicaTimedOut, ReplicaUnavailable, ServiceClient,
                                    ServiceDown, ids_column)
from services.triton.protocol import Status

log = logging.getLogger(__name__)


def tls_for_endpoint(tls: ClientTLS | None, endpoint: str) -> ClientTLS | None:
    """TLS towards one endpoint's replicas. An endpoint that is one name ('genie-dynamics-replicas:8001') may be
    resolved to IP addresses (dns discovery), which no certificate names: verify the name instead. A list of
    addresses (static discovery) is dialled as written, each address verified as itself."""
    if tls is None or "," in endpoint:
        return tls
    host, _ = split_address(endpoint.strip(), endpoint)
    try:
        ipaddress.ip_address(host)
        return tls  # an IP literal is dialled as itself
    except ValueError:
        return replace(tls, server_name=host)


@dataclass
class WorldServices:
    """The three services of one world model (one version of it), and its info once a service has confirmed it.
    Versions of one name share its replicas (a --catalog service serves them all)."""

    name: str  # the model key: a fixed model's name, or name@N
    tokenizer: ReplicaSet
    lam: ReplicaSet
    dynamics: ReplicaSet
    version: int | None = None  # published version (served under versioned Triton model names)
    info: ModelInfo | None = None

    def model(self, base: str) -> str:
        return protocol.versioned(base, self.version)

    def moved(self, world_ids: Sequence[str]) -> list[str]:
        moved = set(self.dynamics.moved(world_ids)) | set(self.tokenizer.moved(world_ids))
        return [world_id for world_id in world_ids if world_id in moved]

    def lost(self, error: Exception) -> bool:
        """Whether error says its replica is gone: unreachable, hung (no answer before the deadline), or without a
        fixed model's models (it is stopping). A --catalog replica without a version is asked to load it instead
        (TritonBackend._reloaded)."""
        return (isinstance(error, (ServiceDown, ReplicaTimedOut))
                or isinstance(error, ModelMissing) and self.version is None)


T = TypeVar("T")


def _failing_over(services: WorldServices, replicas: ReplicaSet, call: Callable[[], T]) -> T:
    """call() (which picks its replica from `replicas`), again after the replica it reached was lost and a live
    one took over that replica's worlds."""
    for _ in range(len(replicas.clients())):
        try:
            return call()
        except ReplicaUnavailable as error:
            if not services.lost(error) or not replicas.down(error.url, error):
                raise
    return call()


# A call to one replica may take this share of the step deadline: a hung replica's call gives up in time for its
# worlds to move, be rebuilt and step on a live replica before their callers' deadline (a per-try timeout).
REPLICA_CALL_SHARE = 0.5

# A batch goes out as few multi-row requests (one round trip and one PyTriton hand-off per request, not per
# world); Triton's dynamic batcher still merges them with other gateways'. Needs --max-batch-size >= this.
ROWS_PER_REQUEST = 16


def _chunks(rows: Sequence[int]) -> list[Sequence[int]]:
    return [rows[start:start + ROWS_PER_REQUEST] for start in range(0, len(rows), ROWS_PER_REQUEST)]


def _column(values: list, dtype) -> np.ndarray:
    return np.array([[value] for value in values], dtype=dtype)


def _statuses(results) -> list[Status]:
    return [Status(int(value)) for result in results for value in result.as_numpy("status").reshape(-1)]


class TritonBackend:
    """Implements services.backends.base.ModelBackend against the Triton model services."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics | None = None):
        self._settings, self._metrics = settings, (metrics or GatewayMetrics()).replicas
        self._tls = (None if settings.triton_tls_ca_file is None else  # checked here: bad files fail the start
                     ClientTLS(settings.triton_tls_ca_file, settings.triton_tls_cert_file, settings.triton_tls_key_file))
        self._discovery = registry.get("discovery", settings.discovery)(settings)
        self._refresher = Refresher(settings.discovery_refresh_s)
        try:
            self._replicas = {name: self._connect(name, urls) for name, urls in settings.triton_endpoints.items()}
        except BaseException:
            self._refresher.close()
            raise
        self._worlds = {name: WorldServices(name, **kinds) for name, kinds in self._replicas.items()
                        if name not in settings.catalog_models}
        self._holder = f"gateway-{uuid.uuid4().hex[:12]}"  # this gateway's holds on versions in the services
        # Holds are leases (services/triton/versions.py): renewed while this gateway lives, so a gateway that dies
        # without unloading (SIGKILL) leaves its versions loaded for one lease, not forever.
        self._holds = threading.Lock()  # guards _held: a renewal is never sent after its version's unload
        self._held: set[str] = set()  # the name@version keys this gateway holds
        self._closed = threading.Event()
        self._renewer = threading.Thread(target=self._renew_holds, name="hold-renewer", daemon=True)
        self._renewer.start()

    def _connect(self, name: str, endpoints: dict[str, str]) -> dict[str, ReplicaSet]:
        missing = [kind for kind in protocol.SERVICE_KINDS if kind not in endpoints]
        if missing:
            raise ValueError(f"triton_endpoints[{name!r}] lacks {', '.join(missing)}; "
                             f"each model needs {', '.join(protocol.SERVICE_KINDS)}")
        kinds = {kind: ReplicaSet(name, kind, endpoints[kind], self._discovery,
                                  self._client(name, kind, endpoints[kind]),
                                  self._metrics, self._refresher.wake) for kind in protocol.SERVICE_KINDS}
        self._refresher.sets.extend(kinds.values())
        return kinds

    def _client(self, name: str, kind: str, endpoint: str) -> Callable[[str], ServiceClient]:
        settings, tls = self._settings, tls_for_endpoint(self._tls, endpoint)
        return lambda address: ServiceClient(address, f"{name} {kind} service", settings.max_message_bytes,
                                             settings.step_deadline_s * REPLICA_CALL_SHARE, tls)

    def _get(self, model: str) -> WorldServices:
        services = self._worlds.get(model)
        if services is None:
            raise ModelUnavailable(f"model {model!r} is not served by this backend; serving: "
                                   f"{', '.join(self._worlds) or 'none'}")
        if services.info is None:
            services.info = self._confirm(services)
        return services

    def _confirm(self, services: WorldServices) -> ModelInfo:
        """Ask every service replica what it serves, so a miswired endpoint fails loudly instead of playing nonsense.
        A replica that cannot be reached is marked down; each kind needs one that answered."""
        query = {"query": np.array([b""], dtype=object)}
        infos = []
        for kind in protocol.SERVICE_KINDS:
            replicas, unreachable, answered = getattr(services, kind), [], len(infos)
            for replica in replicas.reachable():
                try:
                    answer = replica.client.infer(services.model(protocol.INFO), query)
                except ReplicaUnavailable as error:
                    if not services.lost(error):
                        raise
                    replicas.down(error.url)
                    unreachable.append(error)
                    continue
                info, served_kind = protocol.info_from_json(answer.as_numpy("info").reshape(-1)[0])
                if (info.name, served_kind) != (services.name, kind):
                    raise ModelUnavailable(f"{replica.address} serves the {served_kind} of {info.name!r}, "
                                           f"not the {kind} of {services.name!r}: check triton_endpoints")
                infos.append(info)
            if len(infos) == answered:  # no replica of this kind answered
                raise unreachable[0]
        return infos[-1]

    def models(self) -> list[ModelInfo]:
        return [self._get(name).info for name in list(self._worlds) if "@" not in name]

    def load_version(self, model: ModelVersion, catalog: ModelCatalog) -> ModelInfo:
        """Asks the name's three services to load the version (each fetches it from the catalog itself)."""
        if model.ref not in self._worlds:
            kinds = self._replicas.get(model.name)
            if kinds is None:
                raise ModelUnavailable(f"model {model.name!r} has no Triton endpoints; configured: "
                                       f"{', '.join(self._replicas) or 'none'}")
            # Renewed from the start: a service that loads it quickly must keep it while a slow one still loads.
            with self._holds:
                self._held.add(model.ref)
            try:
                self._control(kinds, "load", model.version)
            except BaseException:  # no longer renewed: whatever did load lapses after one lease
                with self._holds:
                    self._held.discard(model.ref)
                raise
            self._worlds.setdefault(model.ref, WorldServices(model.ref, **kinds, version=model.version))
        return self._get(model.ref).info

    def unload_version(self, key: str) -> None:
        with self._holds:  # after this, no renewal of it is sent: the unload below comes last
            services = self._worlds.pop(key, None)
            self._held.discard(key)
        if services is not None and services.version is not None:
            self._control(self._replicas[split_key(key)[0]], "unload", services.version)

    def _renew_holds(self) -> None:
        """Re-sends this gateway's holds every triton_hold_renew_s without waiting for the answers: a service busy
        loading another version answers late, and the other services' leases must not wait for it."""
        while not self._closed.wait(self._settings.triton_hold_renew_s):
            with self._holds:  # never after an unload of the same version
                for key in self._held:
                    name, version = split_key(key)
                    command = self._control_inputs("load", version)
                    for replicas in self._replicas[name].values():
                        for replica in replicas.reachable():
                            try:
                                replica.client.submit(protocol.CONTROL, [command])
                            except Exception as error:  # noqa: BLE001 - the renewer must live on; it retries
                                log.warning("renewing this gateway's hold on %s at %s failed: %s", key,
                                            replica.address, error)

    def _control_inputs(self, action: str, version: int) -> dict[str, np.ndarray]:
        return {"command": np.array([protocol.control_command(action, version, self._holder)], dtype=object)}

    def _control(self, kinds: dict[str, ReplicaSet], action: str, version: int) -> None:
        """One control request per replica of each service, in parallel: each loads its part of the version
        (seconds). A replica that cannot be reached is marked down; each kind needs one that answered."""
        command = self._control_inputs(action, version)
        targets = [(replicas, replica) for replicas in kinds.values() for replica in replicas.reachable()]

        def send(target: tuple[ReplicaSet, Replica]) -> ServiceDown | None:
            replicas, replica = target
            try:
                answer = replica.client.infer(protocol.CONTROL, command, timeout_s=protocol.CONTROL_TIMEOUT_S)
            except ServiceDown as error:
                replicas.down(error.url)
                return error
            json.loads(answer.as_numpy("loaded").reshape(-1)[0])  # a well-formed answer
            return None

        with ThreadPoolExecutor(len(targets)) as pool:
            errors = list(pool.map(send, targets))
        for replicas in kinds.values():
            failed = [error for (owner, _), error in zip(targets, errors) if owner is replicas]
            if all(failed):
                raise failed[0]

    def _reloaded(self, services: WorldServices, error: ModelUnavailable) -> bool:
        """Whether a --catalog service that answered without this version (it restarted since it loaded it) has
        loaded it again now: the version is immutable, so reloading it restores exactly what was served."""
        if services.version is None or not isinstance(error, ModelMissing):
            return False
        try:
            self._control(self._replicas[split_key(services.name)[0]], "load", services.version)
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
        inputs = {"frames": np.ascontiguousarray(frames)}

        def encode() -> np.ndarray:  # on any live replica: encoding keeps no world state
            replica = services.tokenizer.any()
            return replica.client.infer(services.model(protocol.TOKENIZER_ENCODE), inputs).as_numpy("tokens")

        return self._once_more_after_reload(services, lambda: _failing_over(services, services.tokenizer, encode))

    def infer_actions(self, model: str, frames: np.ndarray) -> np.ndarray:
        services = self._get(model)
        inputs = {"frames": np.ascontiguousarray(frames)}
        result = _failing_over(services, services.lam, lambda: services.lam.any().client.infer(
            services.model(protocol.LAM_LABEL), inputs))
        return result.as_numpy("actions")

    def start_world(self, model: str, world_id: str, tokens: np.ndarray, actions: np.ndarray,
                    first_position: int = 0) -> np.ndarray:
        services = self._get(model)
        tokens = np.asarray(tokens, dtype=np.int64)
        position = np.array([first_position], dtype=np.int64)

        dynamics_inputs = {"world_id": ids_column(world_id, rows=False), "tokens": tokens.reshape(len(tokens), -1),
                           "actions": np.asarray(actions, dtype=np.int64), "first_position": position}
        tokenizer_inputs = {"world_id": ids_column(world_id, rows=False), "tokens": tokens, "first_position": position}

        def start_on(replicas: ReplicaSet, model: str, inputs: dict[str, np.ndarray]):
            """On the world's replica (pinned now if the world is new or moved), or the one it moves to."""
            return _failing_over(services, replicas, lambda: replicas.route([world_id])[0].client.infer(
                services.model(model), inputs))

        def start() -> np.ndarray:
            start_on(services.dynamics, protocol.DYNAMICS_START, dynamics_inputs)
            return start_on(services.tokenizer, protocol.TOKENIZER_START, tokenizer_inputs).as_numpy("frames")

        frames = self._once_more_after_reload(services, start)
        services.dynamics.started(world_id)
        services.tokenizer.started(world_id)
        return frames

    def step_worlds(self, model: str, steps: Sequence[WorldStep]) -> list[StepResult]:
        """Step on the dynamics service, then decode on the tokenizer service: each world on its replicas, all
        replicas' requests in flight at once, so each service's dynamic batcher runs them (and other gateways')
        together.

        A failure never half-applies: both services keep the step index each world expects next, so a world
        that advanced in one service before the batch failed answers "not cached" on its retry (same index)
        and is rebuilt from the caller's history instead of playing from a cache a frame ahead."""
        services = self._get(model)
        moved = services.moved([step.world_id for step in steps])
        if moved:  # re-pinned off a replica that went down; nothing sent yet, so the retry steps every world once
            raise WorldsNotCached(moved)
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
        def request(rows: Sequence[int]) -> dict[str, np.ndarray]:
            chunk = [steps[row] for row in rows]
            return {"world_id": _column([step.world_id.encode("utf-8") for step in chunk], object),
                    "action": _column([step.action for step in chunk], np.int64),
                    "seed": _column([step.seed for step in chunk], np.int64),
                    "step_index": _column([step.step_index for step in chunk], np.int64),
                    "num_maskgit_steps": _column([step.num_maskgit_steps for step in chunk], np.int32),
                    "temperature": _column([step.temperature for step in chunk], np.float32)} | guidance(chunk)

        def guidance(chunk: list[WorldStep]) -> dict[str, np.ndarray]:
            """The optional input, for models with an action pointer; float64, as the in-process engine uses it."""
            default = services.info.default_action_guidance
            if default is None:
                return {}
            return {"action_guidance": _column([default if step.action_guidance is None else step.action_guidance
                                                for step in chunk], np.float64)}

        return self._per_replica(services, services.dynamics, steps, services.model(protocol.DYNAMICS_STEP),
                                 request, "tokens")  # [B, S]

    def _decode(self, services: WorldServices, steps: Sequence[WorldStep], tokens: np.ndarray) -> np.ndarray:
        def request(rows: Sequence[int]) -> dict[str, np.ndarray]:
            return {"world_id": _column([steps[row].world_id.encode("utf-8") for row in rows], object),
                    "tokens": tokens[list(rows)],
                    "step_index": _column([steps[row].step_index for row in rows], np.int64)}

        return self._per_replica(services, services.tokenizer, steps, services.model(protocol.TOKENIZER_DECODE),
                                 request, "frames")  # [B, H, W, 3]

    def _per_replica(self, services: WorldServices, replicas: ReplicaSet, steps: Sequence[WorldStep], model: str,
                     request: Callable[[Sequence[int]], dict[str, np.ndarray]], output: str) -> np.ndarray:
        """Each replica gets its own worlds' rows (a request per chunk), all in flight at once; the answers come
        back in the order of steps. A replica that cannot be reached or hangs hands its worlds to live replicas,
        and then every world of the batch is rebuilt: those on healthy replicas may have advanced already."""
        groups: dict[Replica, list[int]] = {}
        for row, replica in enumerate(replicas.route([step.world_id for step in steps])):
            groups.setdefault(replica, []).append(row)
        sent = [(replica, rows, replica.client.submit(model, [request(chunk) for chunk in _chunks(rows)]))
                for replica, rows in groups.items()]
        results, errors = [], []
        for replica, _, futures in sent:
            try:
                results.extend(replica.client.gather(futures))
            except (BackendError, ValueError) as error:
                errors.append(error)
        lost = [error for error in errors if services.lost(error)]
        if lost:
            if all([replicas.down(error.url, error) for error in lost]):
                raise WorldsNotCached([step.world_id for step in steps]) from lost[0]
            raise lost[0]
        if errors:
            raise errors[0]
        order = [row for _, rows, _ in sent for row in rows]
        self._check([steps[row] for row in order], _statuses(results), replicas.kind)
        return np.concatenate([result.as_numpy(output) for result in results])[np.argsort(order)]

    @staticmethod
    def _check(steps: Sequence[WorldStep], statuses: list[Status], kind: str) -> None:
        invalid = [step.world_id for step, status in zip(steps, statuses) if status == Status.INVALID]
        if invalid:
            raise ValueError(f"the {kind} service refused the steps of worlds {invalid}: action, step count, "
                             f"temperature or action guidance out of range, or a world twice in one batch")
        if any(status == Status.NOT_CACHED for status in statuses):
            # The gateway retries the whole batch after rebuilding, so every world in it must be rebuilt:
            # the others may already have advanced in this or the other service.
            raise WorldsNotCached([step.world_id for step in steps])

    def end_world(self, model: str, world_id: str) -> None:
        self._end(self._get(model), world_id)

    @staticmethod
    def _end(services: WorldServices, world_id: str) -> None:
        """On the world's replica; a world this gateway never pinned (another gateway played it) on every one.
        A replica that cannot be reached is marked down: the world's cache went with it."""
        ids = {"world_id": ids_column(world_id, rows=False)}
        ends = ((services.dynamics, protocol.DYNAMICS_END), (services.tokenizer, protocol.TOKENIZER_END))
        for replicas, model in ends:
            pinned = replicas.pinned(world_id)
            try:
                for replica in [pinned] if pinned is not None else replicas.reachable():
                    try:
                        replica.client.infer(services.model(model), ids)
                    except ReplicaUnavailable as error:
                        if not services.lost(error):
                            raise
                        replicas.down(error.url, error)
            finally:
                replicas.forget(world_id)

    def close(self) -> None:
        """Lets go of this gateway's versions in the services (other gateways' holds keep theirs loaded)."""
        self._closed.set()
        self._renewer.join()
        self._refresher.close()
        for key in [key for key, services in list(self._worlds.items()) if services.version is not None]:
            try:
                self.unload_version(key)
            except (BackendError, ValueError) as error:  # a service that is down has nothing loaded to free
                log.warning("releasing %s in the model services failed: %s", key, error)
        for kinds in self._replicas.values():
            for replicas in kinds.values():
                for client in replicas.clients():
                    client.close()
