"""The gateway's domain facade: create, step, describe and close worlds against one model backend.

Plain Python (no gRPC): server.py translates messages to these calls and errors to status codes.
Each world's truth is its record in the world store; a step is committed there (compare-and-set on
the step number) only after the backend produced it, so a failed step never half-applies and a
retried one is answered from the record instead of stepping twice.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

from genie_models.prompts import prepare_prompt
from services.backends.base import ModelBackend, ModelInfo, StepResult, WorldStep
from services.gateway.batcher import PendingStep, StepBatcher
from services.gateway.errors import (Aborted, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound,
                                     ResourceExhausted)
from services.gateway.limits import quote
from services.gateway.prompts import ImageLimits
from services.gateway.versions import ModelListing, ModelVersions
from services.gateway.worlds import Reaper, Sampling, World, WorldRegistry, idle_seconds
from services.metrics import GatewayMetrics
from services.settings import GatewaySettings
from services.stores.catalog import ModelCatalog
from services.worldstore.base import WorldRecord, WorldStore

log = logging.getLogger(__name__)
NO_ACTION = -1  # last_action of a world that has not stepped yet
# Beyond ~10 the pointer's bias saturates its softmax (one offset certain); far past it only overflow waits.
MAX_ACTION_GUIDANCE = 100.0


@dataclass(frozen=True)
class SamplingRequest:
    seed: int = 0
    num_maskgit_steps: int = 0  # 0: the model's default
    temperature: float | None = None  # None: the model's default
    action_guidance: float | None = None  # None: the model's default


@dataclass(frozen=True)
class Frame:
    world_id: str
    step: int  # 0 for the prompt frame, then 1, 2, ...
    pixels: np.ndarray  # uint8 [H, W, 3]
    output_format: int = 0  # the world's default genie.v1 FrameFormat
    timings: dict[str, float] | None = None  # seconds per hop of a step: queue, backend, commit


def _not_found(world_id: str) -> NotFound:
    return NotFound(f"no open world with id {quote(world_id)}: it was never created, was closed, "
                    "was idle too long, or belongs to another API key (create a new one)")


class Gateway:
    def __init__(self, settings: GatewaySettings, backend: ModelBackend, metrics: GatewayMetrics,
                 store: WorldStore, catalog: ModelCatalog | None = None):
        self.settings, self.backend, self.metrics, self.store = settings, backend, metrics, store
        self.image_limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self.versions = ModelVersions(backend, catalog, settings.catalog_models, metrics)
        self.worlds = WorldRegistry(settings.max_worlds)  # each world held here holds its model version
        self._batchers: dict[str, StepBatcher] = {}  # model key -> its batcher, made on the key's first step
        self._batchers_lock = threading.Lock()
        self.versions.unloaded.append(self._drop_batcher)
        metrics.track_active_worlds(lambda: len(self.worlds))
        self._reaper = Reaper(self.evict_idle, interval_s=min(5.0, settings.idle_timeout_s / 4))
        self._reaper.start()
        self._poller = None
        if settings.catalog_models:
            self.versions.poll()  # serve the latest versions from the start
            self._poller = Reaper(self.versions.poll, settings.catalog_poll_s, name="catalog-poller")
            self._poller.start()

    def models(self) -> list[ModelListing]:
        return self.versions.listing()

    def model(self, ref: str) -> ModelInfo:
        """The model CreateWorld would start ref (a name or name@version) on; NotFound or InvalidArgument if none."""
        return self.versions.peek(ref)

    def _batcher(self, key: str) -> StepBatcher:
        with self._batchers_lock:
            if key not in self._batchers:
                self._batchers[key] = StepBatcher(key, self.backend, self.settings.batch_window_ms / 1000,
                                                  self.settings.max_batch, self.metrics.batch_size.observe)
            return self._batchers[key]

    def _drop_batcher(self, key: str) -> None:
        """After a version was unloaded: no world plays it, so its batcher has nothing queued."""
        with self._batchers_lock:
            batcher = self._batchers.pop(key, None)
        if batcher is not None:
            batcher.stop()

    def create_world(self, owner: str, model: str, image: np.ndarray, sampling: SamplingRequest,
                     output_format: int = 0) -> tuple[World, Frame]:
        """Starts a world from one image (uint8 [H, W, 3], any size) -> (world, its prompt frame).
        model is a name (its latest version now) or name@version; the world records the resolved key."""
        self.model(model)  # an unknown or malformed model is reported before anything is reserved
        per_key = self.settings.max_worlds_per_key
        if self.settings.auth == "api-key" and self.store.count(owner) >= per_key:
            raise ResourceExhausted(f"this API key already has its maximum of {per_key} open worlds: "
                                    "close worlds you no longer play")
        world_id = self.worlds.reserve()
        info = None
        try:
            info = self.versions.acquire(model)  # held from here until the world leaves this gateway
            key, resolved = info.name, self._resolve_sampling(info, sampling)
            frames = prepare_prompt(image, info.image_size)  # [1, S, S, 3]
            tokens = self.backend.encode(key, frames)
            actions = np.array([info.num_actions], dtype=np.int64)  # "no action" led into the first frame
            decoded = self.backend.start_world(key, world_id, tokens, actions)
            record = WorldRecord(world_id, owner, key, resolved.seed, resolved.num_maskgit_steps,
                                 resolved.temperature, output_format, step=0, tokens=np.asarray(tokens[-1:]),
                                 actions=actions, last_frame=decoded[-1], last_action=NO_ACTION,
                                 action_guidance=resolved.action_guidance)
            self.store.create(record)
        except BaseException:
            self.worlds.release()
            if info is not None:
                self.versions.release(info.name)
            raise
        world = World(record, history_frames=info.history_frames)
        self.worlds.add(world)
        log.info("world created", extra={"world_id": world_id, "model": key, "seed": resolved.seed})
        return world, Frame(world_id, 0, decoded[-1], output_format)

    @staticmethod
    def _resolve_sampling(info: ModelInfo, sampling: SamplingRequest) -> Sampling:
        temperature = info.default_temperature if sampling.temperature is None else sampling.temperature
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
        if sampling.num_maskgit_steps > 1000:
            raise InvalidArgument(f"num_maskgit_steps must be at most 1000, got {sampling.num_maskgit_steps}")
        guidance = sampling.action_guidance
        if guidance is not None and info.default_action_guidance is None:
            raise InvalidArgument(f"model {quote(info.name)} has no action pointer, so action_guidance does not "
                                  "apply to it: leave it unset (ListModels: has_action_guidance)")
        if guidance is not None and not (math.isfinite(guidance) and 0 <= guidance <= MAX_ACTION_GUIDANCE):
            raise InvalidArgument(f"action_guidance must be a number from 0 to {MAX_ACTION_GUIDANCE:g} (1 = as "
                                  f"trained, the model's default is {info.default_action_guidance:g}), got {guidance}")
        return Sampling(sampling.seed, sampling.num_maskgit_steps or info.default_maskgit_steps, temperature,
                        info.default_action_guidance if guidance is None else guidance)

    def _world(self, owner: str, world_id: str) -> World:
        """The caller's world: held here, or loaded from the store (then its caches are rebuilt first)."""
        world = self.worlds.get(world_id)
        if world is None:
            record = self.store.load(world_id)
            if record is None or record.owner != owner:
                raise _not_found(world_id)
            try:
                info = self.versions.acquire(record.model)  # loads the world's version if this gateway has not
            except NotFound as error:
                raise NotFound(f"world {quote(world_id)} plays model {quote(record.model)}, which this gateway "
                               f"does not serve ({error}): use a gateway that does") from error
            loaded = World(record, history_frames=info.history_frames, needs_rebuild=True)
            try:
                world = self.worlds.adopt(loaded)
            except BaseException:
                self.versions.release(info.name)
                raise
            if world is not loaded:  # another call adopted it first and holds the version for it
                self.versions.release(info.name)
        if world.owner != owner:
            raise _not_found(world_id)
        return world

    def step_world(self, owner: str, world_id: str, action: int, expected_step: int | None = None,
                   timeout_s: float | None = None) -> Frame:
        """Advances one world and waits for its frame, at most timeout_s (capped by settings.step_deadline_s)."""
        deadline = min(self.settings.step_deadline_s, math.inf if timeout_s is None else timeout_s)
        future = self.submit_step(owner, world_id, action, expected_step)
        try:
            return future.result(timeout=deadline)
        except TimeoutError as error:
            raise DeadlineExceeded("the step did not finish before the deadline; it may still complete: retry "
                                   "with expected_step set to get its frame without stepping twice") from error

    def submit_step(self, owner: str, world_id: str, action: int, expected_step: int | None = None) -> Future:
        """Queues a step behind the world's earlier ones -> a future Frame. Never blocks on the model.

        expected_step is the step number the caller wants produced (None: the next one); if the world
        is already there with the same action, its recorded frame is the answer."""
        started = time.perf_counter()
        world = self._world(owner, world_id)
        info = self.versions.peek(world.model)  # loaded: the world holds it
        if not 0 <= action < info.num_actions:
            raise InvalidArgument(f"action {action} is out of range: model {quote(info.name)} has actions "
                                  f"0..{info.num_actions - 1}")
        result: Future = Future()
        result.set_running_or_notify_cancel()  # a caller giving up cannot cancel a step that may be applied
        world.chain(result, lambda: self._start_step(world, action, expected_step, result, started))
        return result

    def _start_step(self, world: World, action: int, expected_step: int | None, result: Future,
                    started: float) -> None:
        """Runs when the world's earlier steps are done: answers a retry, or hands the step to the batcher."""
        try:
            if world.closed:
                raise _not_found(world.world_id)
            if expected_step is not None and expected_step != world.step_count + 1:
                self._refresh(world)  # another gateway may have stepped it
            if expected_step is not None and expected_step != world.step_count + 1:
                result.set_result(self._replay(world, action, expected_step))
                return
            record = world.record
            step = WorldStep(world.world_id, action, record.seed, record.step, record.num_maskgit_steps,
                             record.temperature, record.action_guidance)
            pending = PendingStep(step, world.needs_rebuild, rebuild=lambda: self._rebuild(world),
                                  commit=lambda output: self._commit(world, action, output, started, pending),
                                  on_failure=lambda error: self._failed(world))
        except BaseException as error:  # noqa: BLE001 - delivered to the caller through its future
            result.set_exception(error)
            return
        pending.future.add_done_callback(lambda done: _copy_outcome(done, result))
        self._batcher(world.model).submit(pending)

    @staticmethod
    def _replay(world: World, action: int, expected_step: int) -> Frame:
        record = world.record
        if expected_step == record.step and record.step > 0 and action == record.last_action:
            return Frame(world.world_id, record.step, record.last_frame, record.output_format)
        detail = (f"; step {record.step} was made with action {record.last_action}, not {action}"
                  if expected_step == record.step and record.step > 0 else "")
        raise FailedPrecondition(f"expected_step {expected_step} does not fit world {quote(world.world_id)}, "
                                 f"which is at step {record.step}{detail}: send expected_step {record.step + 1} "
                                 "for its next step (or leave it unset)")

    def _let_go(self, world_id: str) -> World | None:
        """Stops holding a world here (without closing it) and its hold on its model version."""
        world = self.worlds.remove(world_id)
        if world is not None:
            self.versions.release(world.model)
        return world

    def _refresh(self, world: World) -> None:
        record = self.store.load(world.world_id)
        if record is None:
            world.closed = True
            self._let_go(world.world_id)
            raise _not_found(world.world_id)
        if record.step != world.record.step:
            world.record, world.needs_rebuild = record, True

    def _commit(self, world: World, action: int, output: StepResult, started: float, pending: PendingStep) -> Frame:
        """Runs on the batcher thread after the backend produced the step: store first, then this process."""
        previous = world.record
        record = world.advanced(output.tokens, action, output.frame)
        if not self.store.commit(record, previous.step):
            self._refresh(world)
            raise Aborted(f"world {quote(world.world_id)} was stepped by another gateway at the same time and is "
                          f"now at step {world.step_count}; nothing was applied: retry with expected_step")
        world.record = record
        self.metrics.steps.labels(world.model).inc()
        committed = time.perf_counter()
        self.metrics.step_latency.labels(world.model).observe(committed - started)
        timings = {"queue": pending.started_at - pending.queued_at, "backend": pending.finished_at - pending.started_at,
                   "commit": committed - pending.finished_at, "total": committed - started}
        for phase in ("queue", "backend", "commit"):
            self.metrics.step_phase.labels(phase).observe(timings[phase])
        return Frame(world.world_id, record.step, output.frame, record.output_format, timings)

    @staticmethod
    def _failed(world: World) -> None:
        world.needs_rebuild = True  # the backend may hold this world one frame ahead of its record

    def _rebuild(self, world: World) -> None:
        if world.closed:
            return  # a closed world stays gone; its step then fails as not cached
        tokens, actions = world.history()
        # The prompt is frame 0 and step n made frame n: the history's first frame sits at n + 1 - T.
        first_position = world.step_count + 1 - len(tokens)
        self.backend.start_world(world.model, world.world_id, tokens, actions, first_position)
        world.needs_rebuild = False

    def get_world(self, owner: str, world_id: str) -> WorldRecord:
        record = self.store.load(world_id)  # the truth: another gateway may have stepped it
        if record is None or record.owner != owner:
            raise _not_found(world_id)
        return record

    def list_worlds(self, owner: str) -> list[WorldRecord]:
        return self.store.list(owner)

    def close_world(self, owner: str, world_id: str, reason: str = "closed") -> None:
        record = self.get_world(owner, world_id)
        world = self.worlds.remove(world_id)
        try:
            if world is not None:
                world.closed = True
                # Wait for an in-flight step, so the backend never rebuilds a world after it was ended.
                world.wait_idle(self.settings.step_deadline_s)
            if not self.store.delete(world_id, owner):
                raise _not_found(world_id)
            if world is not None or self.versions.serves(record.model):  # else: no caches of it here
                self.backend.end_world(record.model, world_id)
        finally:
            if world is not None:  # after end_world: the version may be unloaded once released
                self.versions.release(world.model)
        log.info("world %s", reason, extra={"world_id": world_id, "model": record.model, "steps": record.step})

    def evict_idle(self) -> None:
        """Closes held worlds idle longer than settings.idle_timeout_s (skipping any with a step in flight).
        A world another gateway stepped meanwhile is only let go here, not closed."""
        for world in self.worlds.idle(self.settings.idle_timeout_s):
            if world.tail is not None and not world.tail.done():
                continue
            try:
                stored = self.store.load(world.world_id)
                if stored is None or idle_seconds(stored) < self.settings.idle_timeout_s:
                    self._let_go(world.world_id)
                    continue
                self.close_world(world.owner, world.world_id, reason="evicted after idle timeout")
            except NotFound:
                continue  # closed by its client meanwhile
            except Exception as error:  # noqa: BLE001 - the reaper must live on; it retries next round
                log.warning("evicting world %s failed: %s", world.world_id, error)

    def close(self) -> None:
        """Stops the reaper and batchers (finishing queued steps); backend and store are closed by their owner."""
        self._reaper.stop()
        if self._poller is not None:  # a version load in flight (up to minutes) must not hold up a shutdown
            self._poller.stop(timeout_s=1.0)
        with self._batchers_lock:
            batchers = list(self._batchers.values())
        for batcher in batchers:
            batcher.stop()


def _copy_outcome(source: Future, target: Future) -> None:
    error = source.exception()
    if error is not None:
        target.set_exception(error)
    else:
        target.set_result(source.result())
