"""Which models and versions the gateway serves: the fixed models of its settings, and published versions from the
model catalog (the latest of each name, plus older ones while worlds still play them).

A world's model key, stored in its record and passed to the backend, is a fixed model's name or `name@N` for a
published version, so a world keeps its version until it closes, also across gateway restarts.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from services.backends.base import ModelBackend, ModelInfo
from services.gateway.errors import InvalidArgument, NotFound, Unavailable
from services.gateway.limits import quote
from services.metrics import GatewayMetrics
from services.stores.base import StoreError
from services.stores.catalog import ModelCatalog, ModelVersion, UnknownModel, parse_ref, split_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelListing:
    info: ModelInfo  # of the fixed model, or of the latest version (named by the bare name)
    versions: list[int]  # published versions (empty for a fixed model)
    latest: int  # 0 for a fixed model
    loaded: list[int]


class ModelVersions:
    """Resolves what CreateWorld asks for, holds a version while worlds play it, follows the catalog's latest.

    Polling the catalog's `latest` pointer (poll(), every catalog_poll_s) rather than loading at CreateWorld keeps
    downloads and model loading off the players' calls, and moves new worlds to a version only once every part
    of it is loaded. An older version asked for by name@N (or by a world resumed from the world store) loads on
    demand. A version that is not the latest is unloaded, in the background, when its last world lets go.
    """

    def __init__(self, backend: ModelBackend, catalog: ModelCatalog | None, names: Sequence[str],
                 metrics: GatewayMetrics):
        self.backend, self.catalog, self.names, self.metrics = backend, catalog, list(names), metrics
        self._fixed = {info.name: info for info in backend.models()}
        if self.names and catalog is None:
            raise ValueError("catalog_models needs a model catalog (GENIE_STORE_*)")
        if both := set(self._fixed) & set(self.names):
            raise ValueError(f"{sorted(both)} are both fixed models and catalog models: configure each name once")
        self._loaded: dict[str, ModelInfo] = {}  # key name@N -> info
        self._latest: dict[str, int] = {}
        self._holds: Counter[str] = Counter()  # key -> worlds (and creates in flight) playing it
        # Keys no world may take any more whose backend unload has not finished: still listed as loaded, because
        # their models still exist in the backend (on Triton, until every service answered the unload).
        self._unloading: set[str] = set()
        self._lock = threading.Lock()  # guards the four above
        self._loading = threading.Lock()  # one load or unload at a time, so a version loads once
        self.unloaded: list[Callable[[str], None]] = []  # called with each key after it was unloaded

    # --- what worlds play ---

    def acquire(self, ref: str) -> ModelInfo:
        """The model a world plays (ref: a name, name@N, or a world's stored key), loaded and held until
        release(info.name); info.name is the world's model key."""
        if ref in self._fixed:
            return self._fixed[ref]
        while True:
            info = self._published(ref)
            with self._lock:
                if info.name in self._loaded:  # not unloaded between the lookup and now
                    self._holds[info.name] += 1
                    return info

    def release(self, key: str) -> None:
        if key in self._fixed:
            return
        with self._lock:
            self._holds[key] -= 1
            idle = self._holds[key] <= 0
        if idle:
            threading.Thread(target=self._unload_if_unused, args=(key,), name="unload-version", daemon=True).start()

    def peek(self, ref: str) -> ModelInfo:
        """What acquire(ref) would give, without holding it (CreateWorld's early check)."""
        return self._fixed.get(ref) or self._published(ref)

    def _published(self, ref: str) -> ModelInfo:
        name, pinned = self._parse(ref)
        version = pinned if pinned is not None else self._latest.get(name)
        if version is None:
            raise Unavailable(f"model {quote(name)} has no version loaded yet: publish one, or retry in a few seconds")
        info = self._loaded.get(f"{name}@{version}")
        if info is not None:
            return info
        try:
            return self._load(self.catalog.resolve(f"{name}@{version}"))
        except UnknownModel as error:
            raise NotFound(str(error)) from error
        except StoreError as error:
            raise Unavailable(f"the model catalog cannot be read: {error}") from error

    def _parse(self, ref: str) -> tuple[str, int | None]:
        name, at, _ = ref.partition("@")
        if not at:
            if name not in self.names:
                served = ", ".join(self.served_names()) or "none"
                raise NotFound(f"no model named {quote(name)} on this gateway; models: {served}")
            return name, None
        try:
            name, version = parse_ref(ref)
            if version is None:
                raise ValueError(f"invalid version in {ref!r}: write name@N with N >= 1, or just the name")
        except ValueError as error:
            raise InvalidArgument(f"malformed model reference {quote(ref)}: {error}") from error
        if name not in self.names:
            detail = (" is served without versions: use its bare name" if name in self._fixed
                      else f" is not served by this gateway; versioned models: {', '.join(self.names) or 'none'}")
            raise NotFound(f"model {quote(name)}{detail}")
        return name, version

    # --- loading and unloading ---

    def _load(self, model: ModelVersion) -> ModelInfo:
        with self._loading:
            info = self._loaded.get(model.ref)
            if info is None:
                info = self.backend.load_version(model, self.catalog)
                with self._lock:
                    self._loaded[model.ref] = info
                self.metrics.model_version_loaded.labels(model.name, str(model.version)).set(1)
                log.info("model version loaded", extra={"model": model.ref})
        return info

    def _unload_if_unused(self, key: str) -> None:
        name, version = split_key(key)
        with self._loading:
            with self._lock:
                if self._holds[key] > 0 or self._latest.get(name) == version or key not in self._loaded:
                    return
                del self._loaded[key], self._holds[key]
                self._unloading.add(key)
            try:
                self.backend.unload_version(key)
            except Exception as error:  # noqa: BLE001 - no world plays it; the services free it when they restart
                log.warning("unloading %s failed: %s", key, error)
            self.metrics.model_version_loaded.remove(name, str(version))
            with self._lock:  # listed as loaded, and in the metric, until here: its models are gone now
                self._unloading.discard(key)
            log.info("model version unloaded", extra={"model": key})
        for callback in self.unloaded:
            callback(key)

    def poll(self) -> None:
        """Moves each catalog name to its latest published version, once that version is loaded."""
        for name in self.names:
            try:
                self._follow_latest(name)
            except UnknownModel:
                log.debug("no published version of %s yet", name)
            except Exception as error:  # noqa: BLE001 - the poller must live on; it tries again next round
                log.warning("following the latest version of %s failed: %s", name, error)

    def _follow_latest(self, name: str) -> None:
        current = self._latest.get(name)
        pointer = self.catalog.pointer(name)
        if pointer is not None and pointer == current:
            return
        model = self.catalog.resolve(name)  # the pointer, checked against the complete versions
        if model.version == current:
            return
        # When the poll saw the version: the start of its load (how long that takes is read from these lines).
        log.info("a new version is published; loading it", extra={"model": model.ref, "previous": current})
        self._load(model)
        with self._lock:
            self._latest[name] = model.version
        self.metrics.model_latest_version.labels(name).set(model.version)
        log.info("new worlds get the new version", extra={"model": model.ref, "previous": current})
        if current is not None:
            self._unload_if_unused(f"{name}@{current}")

    # --- what ListModels shows ---

    def listing(self) -> list[ModelListing]:
        listings = [ModelListing(info, [], 0, []) for info in self._fixed.values()]
        with self._lock:
            latest, loaded = dict(self._latest), [*self._loaded, *self._unloading]
        for name in self.names:
            if name not in latest:
                continue  # nothing servable yet
            try:
                versions = self.catalog.versions(name)
            except StoreError as error:
                log.warning("listing the versions of %s failed: %s", name, error)
                versions = []
            mine = sorted(version for key in loaded for key_name, version in [split_key(key)] if key_name == name)
            info = replace(self._loaded[f"{name}@{latest[name]}"], name=name)
            listings.append(ModelListing(info, versions, latest[name], mine))
        return listings

    def served_names(self) -> list[str]:
        return [*self._fixed, *self.names]

    def serves(self, key: str) -> bool:
        return key in self._fixed or key in self._loaded

    def loaded_keys(self) -> list[str]:
        with self._lock:
            return sorted([*self._loaded, *self._unloading])
