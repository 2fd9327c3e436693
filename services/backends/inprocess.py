"""The `inprocess` model backend: torch models in the gateway's own process (the embedded default).

Each model (a fixed one, or a published version loaded from the catalog at run time) gets a DynamicsEngine
and a FrameDecoder with one cache slot per world. All torch work runs on one compute thread (why:
services/compute_thread.py), which also serializes the models' use.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genie_models.stepping import DynamicsEngine, FrameDecoder, StepRequest
from genie_models.world_model import WorldModel
from services.backends.base import ModelInfo, ModelUnavailable, StepResult, WorldsNotCached, WorldStep
from services.compute_thread import ComputeThread
from services.metrics import GatewayMetrics
from services.settings import GatewaySettings
from services.stores.catalog import ModelCatalog, ModelVersion


def model_info(world: WorldModel, name: str) -> ModelInfo:
    """What a backend reports about a loaded world; `history_frames` is the history the gateway must
    keep to rebuild a world's caches exactly (the models' receptive field in frames), `window_frames`
    the dynamics model's own temporal window."""
    dynamics, tokenizer = world.dynamics.config, world.tokenizer.config
    return ModelInfo(name=name, num_actions=world.num_actions, image_size=world.image_size,
                     grid_size=tokenizer.grid_size, history_frames=world.history_frames(),
                     default_maskgit_steps=dynamics.num_maskgit_steps, default_temperature=dynamics.temperature,
                     window_frames=dynamics.context_frames,
                     default_action_guidance=dynamics.action_guidance if dynamics.action_pointer else None)


@dataclass
class LoadedModel:
    info: ModelInfo
    world: WorldModel
    dynamics: DynamicsEngine
    decoder: FrameDecoder


def _load(name: str, directory: Path, max_worlds: int, device: str) -> LoadedModel:
    world = WorldModel.load(directory, device=device)
    info = model_info(world, name)
    # Evicting the least recently used world when full keeps a leaked slot from blocking new worlds;
    # an evicted world is rebuilt from its history by the gateway (WorldsNotCached).
    return LoadedModel(info, world,
                       DynamicsEngine(world.dynamics, max_worlds, device, evict_when_full=True),
                       FrameDecoder(world.tokenizer, max_worlds, device, evict_when_full=True))


class InProcessBackend:
    """Implements services.backends.base.ModelBackend with torch in this process."""

    def __init__(self, settings: GatewaySettings, metrics: GatewayMetrics | None = None):
        """metrics: unused here (this backend has no replicas to report)."""
        self.device = torch.device(settings.device)
        self.max_worlds = settings.max_worlds
        self._compute = ComputeThread()
        self._models = {name: self._compute.run(_load, name, Path(directory), settings.max_worlds, settings.device)
                        for name, directory in settings.models.items()}
        self._fixed = list(self._models)

    def models(self) -> list[ModelInfo]:
        return [self._models[name].info for name in self._fixed]

    def load_version(self, model: ModelVersion, catalog: ModelCatalog) -> ModelInfo:
        loaded = self._models.get(model.ref)
        if loaded is None:
            _, directory = catalog.load(model.ref)  # downloads once, verifies every sha256 (not on the compute thread)
            built = self._compute.run(_load, model.ref, directory, self.max_worlds, str(self.device))
            loaded = self._models.setdefault(model.ref, built)
        return loaded.info

    def unload_version(self, key: str) -> None:
        if key not in self._fixed:
            self._models.pop(key, None)

    def _get(self, model: str) -> LoadedModel:
        loaded = self._models.get(model)
        if loaded is None:
            raise ModelUnavailable(f"model {model!r} is not loaded; loaded: {', '.join(self._models) or 'none'}")
        return loaded

    def encode(self, model: str, frames: np.ndarray) -> np.ndarray:
        return self._on_frames(model, frames, lambda world, clip: world.tokenizer.encode(clip))

    def infer_actions(self, model: str, frames: np.ndarray) -> np.ndarray:
        return self._on_frames(model, frames, lambda world, clip: world.lam.infer_actions(clip))

    def _on_frames(self, model: str, frames: np.ndarray,
                   run: Callable[[WorldModel, torch.Tensor], torch.Tensor]) -> np.ndarray:
        """Run a model on frames [T, H, W, 3] as one clip."""
        loaded = self._get(model)

        @torch.no_grad()
        def on_clip() -> np.ndarray:
            clip = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device)[None]
            return run(loaded.world, clip)[0].cpu().numpy()
        return self._compute.run(on_clip)

    def start_world(self, model: str, world_id: str, tokens: np.ndarray, actions: np.ndarray,
                    first_position: int = 0) -> np.ndarray:
        loaded = self._get(model)

        def start() -> np.ndarray:
            token_tensor = torch.as_tensor(np.asarray(tokens), dtype=torch.long, device=self.device)
            action_tensor = torch.as_tensor(np.asarray(actions), dtype=torch.long, device=self.device)
            loaded.dynamics.start(world_id, token_tensor.flatten(1), action_tensor, first_position)
            return loaded.decoder.start(world_id, token_tensor, first_position).cpu().numpy()
        return self._compute.run(start)

    def step_worlds(self, model: str, steps: Sequence[WorldStep]) -> list[StepResult]:
        loaded = self._get(model)
        ids = [step.world_id for step in steps]
        requests = [StepRequest(step.world_id, step.action, step.seed, step.step_index,
                                step.num_maskgit_steps, step.temperature, step.action_guidance) for step in steps]
        grid = loaded.info.grid_size

        def step() -> tuple[np.ndarray, np.ndarray]:
            # Check both caches before touching either, so a failed batch advances no world.
            missing = [i for i in ids if i not in loaded.dynamics.sessions or i not in loaded.decoder.sessions]
            if missing:
                raise WorldsNotCached(missing)
            tokens = loaded.dynamics.step(requests).reshape(len(steps), grid, grid)
            return tokens.cpu().numpy(), loaded.decoder.decode(ids, tokens).cpu().numpy()
        tokens_out, frames = self._compute.run(step)
        return [StepResult(tokens=tokens_out[i], frame=frames[i]) for i in range(len(steps))]

    def end_world(self, model: str, world_id: str) -> None:
        loaded = self._get(model)

        def end() -> None:
            loaded.dynamics.end(world_id)
            loaded.decoder.end(world_id)
        self._compute.run(end)

    def close(self) -> None:
        self._models.clear()
        self._compute.close()
