"""The replicas of each Triton model service and which world is pinned to which: the triton backend's routing.

A world's KV caches live in one replica of the dynamics and one of the tokenizer service, so every call of the
world goes there; the worlds of a replica that went down or away move to live replicas and are rebuilt there.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from services.backends.base import ModelUnavailable
from services.backends.discovery import Discovery
from services.metrics import ReplicaMetrics
from services.triton.client import ServiceClient

log = logging.getLogger(__name__)


@dataclass(eq=False)  # compared and hashed by identity: a replica that leaves and returns is a new one
class Replica:
    address: str
    client: ServiceClient
    live: bool = True  # False after a call could not reach it or timed out, until its process answers a probe
    worlds: set[str] = field(default_factory=set)


class ReplicaSet:
    """The replicas of one service kind of one model as discovery finds them, and the worlds pinned to each.

    A new world is pinned to the live replica with the fewest worlds, so a replica that joined or came back
    takes the next worlds. The worlds of a replica marked down (or dropped by discovery) are re-pinned at once
    and stay `moved` until they are started on their new replica: the backend asks the gateway to rebuild
    them from its history before it sends anything of theirs."""

    def __init__(self, model: str, kind: str, endpoint: str, discovery: Discovery,
                 connect: Callable[[str], ServiceClient], metrics: ReplicaMetrics, wake: Callable[[], None]):
        self.model, self.kind, self.endpoint = model, kind, endpoint
        self._discovery, self._connect, self._metrics, self._wake = discovery, connect, metrics, wake
        self._lock = threading.Lock()
        self._replicas: dict[str, Replica] = {}
        self._pins: dict[str, Replica] = {}  # world id -> the replica holding its caches
        self._moved: set[str] = set()  # re-pinned worlds not started on their new replica yet
        self._retired: list[ServiceClient] = []  # clients of dropped replicas: calls may still be in flight
        self._turn = itertools.count()
        self.refresh()

    def refresh(self) -> None:
        """Re-reads discovery (keeping the known replicas when names cannot be looked up now), then probes
        the replicas marked down with a request their own process must answer (Triton's health says ready while
        that process hangs). A malformed endpoint raises ValueError."""
        try:
            self._update(self._discovery.resolve(self.endpoint))
        except OSError as error:
            log.warning("discovering the %s replicas of %s at %r failed (keeping %d known): %s",
                        self.kind, self.model, self.endpoint, len(self._replicas), error)
        with self._lock:
            down = [replica for replica in self._replicas.values() if not replica.live]
        for replica in down:
            if replica.client.answers():
                with self._lock:
                    replica.live = True
                    self._publish()
                log.info("%s replica %s of %s is back; it takes new worlds", self.kind, replica.address, self.model)

    def _update(self, addresses: Sequence[str]) -> None:
        with self._lock:
            for address in addresses:
                if address not in self._replicas:
                    self._replicas[address] = Replica(address, self._connect(address))
                    log.info("%s replica %s of %s joined", self.kind, address, self.model)
            for gone in [replica for address, replica in self._replicas.items() if address not in addresses]:
                log.warning("%s replica %s of %s left discovery", self.kind, gone.address, self.model)
                del self._replicas[gone.address]
                with contextlib.suppress(KeyError):
                    self._metrics.worlds.remove(self.model, self.kind, gone.address)
                self._evacuate(gone, removed=True)
                self._retired.append(gone.client)
            self._publish()

    def route(self, world_ids: Sequence[str]) -> list[Replica]:
        """Each world's replica; a world seen for the first time is pinned now."""
        with self._lock:
            replicas = [self._pins.get(world_id) or self._pin(world_id) for world_id in world_ids]
            self._publish()
            return replicas

    def pinned(self, world_id: str) -> Replica | None:
        with self._lock:
            return self._pins.get(world_id)

    def _pin(self, world_id: str) -> Replica:
        replica = min(self._reachable(), key=lambda candidate: (len(candidate.worlds), candidate.address))
        self._pins[world_id] = replica
        replica.worlds.add(world_id)
        return replica

    def moved(self, world_ids: Sequence[str]) -> list[str]:
        with self._lock:
            return [world_id for world_id in world_ids if world_id in self._moved]

    def started(self, world_id: str) -> None:
        with self._lock:
            self._moved.discard(world_id)

    def forget(self, world_id: str) -> None:
        with self._lock:
            replica = self._pins.pop(world_id, None)
            if replica is not None:
                replica.worlds.discard(world_id)
            self._moved.discard(world_id)
            self._publish()

    def reachable(self) -> list[Replica]:
        with self._lock:
            return self._reachable()

    def _reachable(self) -> list[Replica]:
        """The live replicas; if none is, all known ones (a lone service that restarts is used again)."""
        known = sorted(self._replicas.values(), key=lambda replica: replica.address)
        if not known:
            raise ModelUnavailable(f"no replica of the {self.kind} service of {self.model!r} is known: discovery "
                                   f"finds none at {self.endpoint!r}")
        return [replica for replica in known if replica.live] or known

    def any(self) -> Replica:
        """A replica for a call that keeps no world state (encode, label actions): live ones in turn."""
        with self._lock:
            candidates = self._reachable()
            return candidates[next(self._turn) % len(candidates)]

    def down(self, address: str, why: object = "a call could not reach it") -> bool:
        """Marks the replica at address down (a call could not reach it, or got no answer before the deadline) and
        re-pins its worlds to live replicas. -> whether a live replica is left to take over; if not, the worlds
        stay (the replica may come back)."""
        with self._lock:
            replica = self._replicas.get(address)
            if replica is not None:
                if replica.live:
                    log.warning("%s replica %s of %s is down (%s); moving its %d worlds", self.kind, address,
                                self.model, why, len(replica.worlds))
                replica.live = False
                self._evacuate(replica, removed=False)
                self._publish()
            taken_over = any(candidate.live for candidate in self._replicas.values())
        self._wake()  # re-discover now: the replica may have been replaced under a new address
        return taken_over

    def _evacuate(self, replica: Replica, removed: bool) -> None:
        targets = [candidate for candidate in self._replicas.values() if candidate.live and candidate is not replica]
        if not targets and not removed:
            return
        for world_id in sorted(replica.worlds):
            del self._pins[world_id]
            self._moved.add(world_id)
            if targets:
                target = min(targets, key=lambda candidate: (len(candidate.worlds), candidate.address))
                self._pins[world_id] = target
                target.worlds.add(world_id)
            self._metrics.repins.labels(self.model, self.kind).inc()
        replica.worlds.clear()

    def _publish(self) -> None:
        labels = (self.model, self.kind)
        self._metrics.known.labels(*labels).set(len(self._replicas))
        self._metrics.live.labels(*labels).set(sum(replica.live for replica in self._replicas.values()))
        for replica in self._replicas.values():
            self._metrics.worlds.labels(*labels, replica.address).set(len(replica.worlds))

    def clients(self) -> list[ServiceClient]:
        with self._lock:
            return [replica.client for replica in self._replicas.values()] + self._retired


class Refresher:
    """Re-discovers every replica set each interval, and at once after a replica was found down."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.sets: list[ReplicaSet] = []
        self._wake = threading.Event()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="replica-refresher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._closed:
                return
            for replicas in list(self.sets):
                try:
                    replicas.refresh()
                except Exception as error:  # noqa: BLE001 - the refresher must live on; it retries next round
                    log.warning("refreshing the %s replicas of %s failed: %s", replicas.kind, replicas.model, error)

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join()
