"""A model service started with --catalog: published versions of its world model bound and unbound at run time.

Each version's Triton models get versioned names (`dynamics_step_v3`, protocol.versioned), so worlds on an old
version keep playing beside new ones in the same process. Gateways ask through the `control` model; the work
(download, load, bind) runs on the service's main thread, which also watches that Triton stays alive.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
from pytriton.client.utils import create_client_from_url
from pytriton.exceptions import PyTritonBadParameterError
from pytriton.model_config import Tensor
from pytriton.proxy.types import Request
from pytriton.triton import Triton
from tritonclient.utils import InferenceServerException

from services.triton import protocol
from services.triton.batching import UNBATCHED, Binding

logger = logging.getLogger("genie.triton")


class ControlQueue:
    """Hands control requests from PyTriton's threads to the main thread and waits for their answers."""

    def __init__(self):
        self._commands: queue.SimpleQueue[tuple[Callable[[], object], Future]] = queue.SimpleQueue()

    def call(self, work: Callable[[], object]) -> object:
        done: Future = Future()
        self._commands.put((work, done))
        return done.result(timeout=protocol.CONTROL_TIMEOUT_S)

    def run_next(self, timeout_s: float) -> None:
        """Runs one queued request, or returns after timeout_s without one."""
        try:
            work, done = self._commands.get(timeout=timeout_s)
        except queue.Empty:
            return
        try:
            done.set_result(work())
        except Exception as error:  # noqa: BLE001 - the caller gets it as its request's error
            done.set_exception(error)


class VersionHost:
    """The loaded versions of one service kind and who holds them, each hold a lease of lease_s renewed by loading
    again. Called on the main thread only.

    load_bindings(version) -> the version's Bindings (it fetches the version from the catalog and loads it)."""

    def __init__(self, kind: str, triton: Triton, load_bindings: Callable[[int], list[Binding]],
                 lease_s: float = protocol.HOLD_LEASE_S, clock: Callable[[], float] = time.monotonic):
        self.kind, self.triton, self.load_bindings = kind, triton, load_bindings
        self.lease_s, self.clock = lease_s, clock
        self.bound: dict[int, list[str]] = {}  # version -> its Triton model names
        self.holders: dict[int, dict[str, float]] = {}  # version -> holder -> when its lease lapses

    def load(self, version: int, holder: str) -> None:
        if version not in self.bound:
            named = {protocol.versioned(binding.name, version): binding for binding in self.load_bindings(version)}
            bound: list[str] = []
            try:
                # One after another: bound at once, PyTriton forked each model's proxy while other binds' threads
                # were inside gRPC, and a service aborted (epoll_wait: bad file descriptor) in 2 of 4 test runs;
                # on 2 busy cores the parallel binds had measured no faster anyway.
                for name, binding in named.items():
                    bind(self.triton, name, binding)
                    bound.append(name)
                wait_until_ready(self.triton, bound, ready=True)
            except BaseException:  # all or nothing, so a retried load binds the same names again
                unbind_all(self.triton, bound)
                raise
            self.bound[version] = bound
            logger.info("%s service loaded version %d", self.kind, version)
        self.holders.setdefault(version, {})[holder] = self.clock() + self.lease_s

    def unload(self, version: int, holder: str) -> None:
        """Unbinds the version once no holder is left."""
        self.holders.get(version, {}).pop(holder, None)
        self._unbind_if_unheld(version)

    def release_lapsed(self) -> None:
        """Drops holds whose lease lapsed (their gateway stopped renewing: it died) and unbinds what nobody holds."""
        now = self.clock()
        for version, holders in list(self.holders.items()):
            lapsed = [holder for holder, until in holders.items() if until <= now]
            for holder in lapsed:
                del holders[holder]
                logger.warning("%s service: %s's hold on version %d lapsed (not renewed for %g s)",
                               self.kind, holder, version, self.lease_s)
            if lapsed:
                try:
                    self._unbind_if_unheld(version)
                except Exception:  # noqa: BLE001 - the serving loop must live on; nobody asked for this unload
                    logger.exception("%s service: unloading unheld version %d failed; it stays loaded", self.kind,
                                     version)

    def _unbind_if_unheld(self, version: int) -> None:
        if self.holders.get(version) or version not in self.bound:
            return
        unbind_all(self.triton, self.bound.pop(version))
        self.holders.pop(version, None)
        logger.info("%s service unloaded version %d", self.kind, version)

    def apply(self, command: dict) -> list[int]:
        action, version, holder = command.get("action"), command.get("version"), command.get("holder")
        if action not in ("load", "unload") or not isinstance(version, int) or version < 1 or not holder:
            raise PyTritonBadParameterError('control takes {"action": "load"|"unload", "version": N >= 1, '
                                            f'"holder": ID}}, got {command}')
        started = self.clock()
        (self.load if action == "load" else self.unload)(version, str(holder))
        # Renewals cannot reach us while a load or unload runs (one control request at a time): that time is
        # added to every lease, so a lease only runs down while renewals can be heard.
        busy_s = self.clock() - started
        for holders in self.holders.values():
            for other in holders:
                holders[other] += busy_s
        return sorted(self.bound)


def bind(triton: Triton, name: str, binding: Binding) -> None:
    """Serves binding as Triton model `name` (returns once Triton has loaded it and started its stub)."""
    triton.bind(model_name=name, infer_func=binding.infer, inputs=binding.inputs, outputs=binding.outputs,
                config=binding.config, strict=True)


def unbind_all(triton: Triton, names: list[str]) -> None:
    """Unbinds the models all at once and returns when Triton reports none of them ready. Each unbind waits for
    its model's proxy threads and Triton's stub to stop, seconds on a loaded machine: one after another, a
    version's five tokenizer models took 45 s on a loaded machine (measured) while it stayed listed as loaded."""
    if names:
        with ThreadPoolExecutor(len(names), thread_name_prefix="unbind") as pool:
            list(pool.map(lambda name: unbind(triton, name), names))
    wait_until_ready(triton, names, ready=False)


def unbind(triton: Triton, name: str) -> None:
    """Unloads one bound model. PyTriton has no public unbind: this does what its own shutdown does for each model
    (forget it first, so the serving loop's liveness check skips it; stop its proxy; unload it in the server)."""
    manager = triton._model_manager  # noqa: SLF001 - see the docstring
    model = next(model for key, model in list(manager._models.items()) if key[0] == name.lower())  # noqa: SLF001
    manager._models.pop((name.lower(), model.model_version))  # noqa: SLF001
    model.clean()
    with contextlib.closing(create_client_from_url(manager._triton_url)) as client:  # noqa: SLF001
        client.unload_model(name, headers=manager._headers)  # noqa: SLF001 - PyTriton's access token


# How long Triton may take to report a bound model ready, or an unloaded one not ready (both well under a second on
# an idle machine): within one control request's time.
READINESS_TIMEOUT_S = protocol.CONTROL_TIMEOUT_S / 4


def wait_until_ready(triton: Triton, names: list[str], ready: bool) -> None:
    """Returns once Triton reports every one of names ready (ready=True) or none of them (ready=False), so a control
    answer means what it says: gateways route worlds to a version only after its load was answered, and list it as
    unloaded only after its unload was. Triton answers an unload request at once and unloads in the background; a
    model stops being ready at once, its stub process stops a second or two later (measured). The repository
    index would show the unloading state, but it lists no model that PyTriton loaded through the API (tried)."""
    manager = triton._model_manager  # noqa: SLF001 - PyTriton's server URL and access token, as in unbind
    deadline = time.monotonic() + READINESS_TIMEOUT_S
    with contextlib.closing(create_client_from_url(manager._triton_url)) as client:  # noqa: SLF001
        for name in names:
            while model_ready(client, name, manager._headers) != ready:  # noqa: SLF001
                if time.monotonic() > deadline:
                    state = "ready" if ready else "unloaded"
                    raise TimeoutError(f"Triton did not report model {name} {state} within {READINESS_TIMEOUT_S:g} s")
                time.sleep(0.05)


def model_ready(client, name: str, headers: dict | None) -> bool:
    try:
        return client.is_model_ready(name, headers=headers)
    except InferenceServerException:  # a model Triton does not know: not ready
        return False


def control_binding(controls: ControlQueue, host: VersionHost) -> Binding:
    def answer(requests: list[Request]) -> list[dict[str, np.ndarray]]:
        results = []
        for request in requests:
            try:
                command = json.loads(bytes(request["command"].reshape(-1)[0]))
            except ValueError as error:
                raise PyTritonBadParameterError(f"control command is not JSON: {error}") from error
            loaded = controls.call(lambda: host.apply(command))
            results.append({"loaded": np.array([json.dumps({"loaded": loaded}).encode()], dtype=object)})
        return results

    return Binding(protocol.CONTROL, answer, [Tensor(name="command", dtype=bytes, shape=(1,))],
                   [Tensor(name="loaded", dtype=bytes, shape=(1,))], UNBATCHED)
