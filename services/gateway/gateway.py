"""The gateway's domain facade: create, step, describe and close worlds against one model backend.

Plain Python (no gRPC): server.py translates messages to these calls and errors to status codes.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import Future, TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from genie_models.world import prepare_prompt
from services.backends.base import ModelBackend, ModelInfo, StepResult, WorldStep
from services.gateway.batcher import PendingStep, StepBatcher
from services.gateway.errors import DeadlineExceeded, InvalidArgument, NotFound
from services.gateway.prompts import ImageLimits
from services.gateway.worlds import Reaper, Sampling, World, WorldRegistry
from services.metrics import GatewayMetrics
from services.settings import GatewaySettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingRequest:
    seed: int = 0
    num_maskgit_steps: int = 0  # 0: the model's default
    temperature: float | None = None  # None: the model's default


@dataclass(frozen=True)
class Frame:
    world_id: str
    step: int  # 0 for the prompt frame, then 1, 2, ...
    pixels: np.ndarray  # uint8 [H, W, 3]


class Gateway:
    def __init__(self, settings: GatewaySettings, backend: ModelBackend, metrics: GatewayMetrics):
        self.settings, self.backend, self.metrics = settings, backend, metrics
        self.image_limits = ImageLimits(settings.max_image_bytes, settings.max_image_pixels)
        self.worlds = WorldRegistry(settings.max_worlds)
        self._models = {info.name: info for info in backend.models()}
        self._batchers = {name: StepBatcher(name, backend, settings.batch_window_ms / 1000, settings.max_batch,
                                            metrics.batch_size.observe) for name in self._models}
        metrics.track_active_worlds(lambda: len(self.worlds))
        self._reaper = Reaper(self.evict_idle, interval_s=min(5.0, settings.idle_timeout_s / 4))
        self._reaper.start()

    def models(self) -> list[ModelInfo]:
        return list(self._models.values())

    def model(self, name: str) -> ModelInfo:
        info = self._models.get(name)
        if info is None:
            raise NotFound(f"no model named {name!r} on this gateway; models: {', '.join(self._models) or 'none'}")
        return info

    def create_world(self, model: str, image: np.ndarray, sampling: SamplingRequest,
                     output_format: int = 0) -> tuple[World, Frame]:
        """Starts a world from one image (uint8 [H, W, 3], any size) -> (world, its prompt frame)."""
        info = self.model(model)
        resolved = self._resolve_sampling(info, sampling)
        world_id = self.worlds.reserve()
        try:
            frames = prepare_prompt(image, info.image_size)  # [1, S, S, 3]
            tokens = self.backend.encode(model, frames)
            actions = np.array([info.num_actions], dtype=np.int64)  # "no action" led into the first frame
            decoded = self.backend.start_world(model, world_id, tokens, actions)
        except BaseException:
            self.worlds.release()
            raise
        world = World(world_id, model, resolved, output_format, history_frames=info.context_frames)
        world.remember(tokens[-1], int(actions[-1]))
        self.worlds.add(world)
        log.info("world created", extra={"world_id": world_id, "model": model, "seed": resolved.seed})
        return world, Frame(world_id, 0, decoded[-1])

    @staticmethod
    def _resolve_sampling(info: ModelInfo, sampling: SamplingRequest) -> Sampling:
        temperature = info.default_temperature if sampling.temperature is None else sampling.temperature
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidArgument(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
        if sampling.num_maskgit_steps > 1000:
            raise InvalidArgument(f"num_maskgit_steps must be at most 1000, got {sampling.num_maskgit_steps}")
        return Sampling(sampling.seed, sampling.num_maskgit_steps or info.default_maskgit_steps, temperature)

    def step_world(self, world_id: str, action: int, timeout_s: float | None = None) -> Frame:
        """Advances one world; waits at most timeout_s (capped by settings.step_deadline_s)."""
        started = time.monotonic()
        deadline = started + min(self.settings.step_deadline_s, math.inf if timeout_s is None else timeout_s)
        world = self.worlds.get(world_id)
        info = self._models[world.model]
        if not 0 <= action < info.num_actions:
            raise InvalidArgument(f"action {action} is out of range: model {info.name!r} has actions "
                                  f"0..{info.num_actions - 1}")
        if not world.step_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise DeadlineExceeded("the deadline passed while an earlier step of this world was still running")
        try:
            future, step_number = self._submit(world, action)
        except BaseException:
            world.step_lock.release()
            raise
        try:
            result: StepResult = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout as error:
            raise DeadlineExceeded("the step did not finish before the deadline; it still completes and "
                                   "advances the world (GetWorld shows its step count)") from error
        self.metrics.step_latency.labels(world.model).observe(time.monotonic() - started)
        return Frame(world_id, step_number, result.frame)

    def _submit(self, world: World, action: int) -> tuple[Future, int]:
        """Queues the world's next step -> (future result, its step number). The caller holds
        world.step_lock; the batcher releases it when the step ends."""
        if world.closed:
            raise NotFound(f"world {world.world_id!r} was closed")
        step = WorldStep(world.world_id, action, world.sampling.seed, world.step_count,
                         world.sampling.num_maskgit_steps, world.sampling.temperature)
        pending = PendingStep(step, rebuild=lambda: self._rebuild(world),
                              on_result=lambda result: self._commit(world, action, result),
                              on_done=world.step_lock.release)
        return self._batchers[world.model].submit(pending), world.step_count + 1

    def _commit(self, world: World, action: int, result: StepResult) -> None:
        world.remember(result.tokens, action)
        world.step_count += 1
        world.touch()
        self.metrics.steps.labels(world.model).inc()

    def _rebuild(self, world: World) -> None:
        if world.closed:
            return  # a closed world stays gone; its step then fails as not cached
        tokens, actions = world.history()
        self.backend.start_world(world.model, world.world_id, tokens, actions)

    def get_world(self, world_id: str) -> World:
        return self.worlds.get(world_id)

    def list_worlds(self) -> list[World]:
        return self.worlds.all()

    def close_world(self, world_id: str, reason: str = "closed") -> None:
        world = self.worlds.remove(world_id)
        # Wait for an in-flight step, so the backend never rebuilds a world after it was ended.
        acquired = world.step_lock.acquire(timeout=self.settings.step_deadline_s)
        world.closed = True
        if acquired:
            world.step_lock.release()
        self.backend.end_world(world.model, world_id)
        log.info("world %s", reason, extra={"world_id": world_id, "model": world.model, "steps": world.step_count})

    def evict_idle(self) -> None:
        """Closes worlds idle longer than settings.idle_timeout_s (skipping any with a step in flight)."""
        for world in self.worlds.idle(self.settings.idle_timeout_s):
            if world.step_lock.locked():
                continue
            try:
                self.close_world(world.world_id, reason="evicted after idle timeout")
            except NotFound:
                continue  # closed by its client meanwhile

    def close(self) -> None:
        """Stops the reaper and batchers (finishing queued steps); the backend is closed by its owner."""
        self._reaper.stop()
        for batcher in self._batchers.values():
            batcher.stop()
