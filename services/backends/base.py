"""The model backend contract the gateway codes against; `inprocess` and `triton` both implement it.

All arrays are numpy: uint8 frames [T, H, W, 3] at the model's image size, int tokens [T, h, w].
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from services.stores.catalog import ModelCatalog, ModelVersion


@dataclass(frozen=True)
class ModelInfo:
    name: str
    num_actions: int
    image_size: int
    grid_size: int  # tokens per side of a frame
    history_frames: int  # frames of token history a world's next step depends on (receptive field, pointer memory)
    default_maskgit_steps: int
    default_temperature: float
    window_frames: int = 0  # frames the dynamics model attends to at once (0: not reported)
    # How strongly a latent action steers the frame by default (the action pointer's scale, DynamicsConfig);
    # None: the model has no action pointer, so guidance does not apply to it.
    default_action_guidance: float | None = None


@dataclass(frozen=True)
class WorldStep:
    world_id: str
    action: int
    seed: int
    step_index: int  # index of the frame being generated: with the seed it fixes the sampling noise
    num_maskgit_steps: int
    temperature: float
    action_guidance: float | None = None  # None: the model's own (ModelInfo.default_action_guidance)


@dataclass(frozen=True)
class StepResult:
    tokens: np.ndarray  # [h, w]
    frame: np.ndarray  # uint8 [H, W, 3]


class BackendError(RuntimeError):
    """Base of backend failures the gateway maps to gRPC statuses."""


class ModelUnavailable(BackendError):
    """A model service cannot be reached or is not ready (maps to UNAVAILABLE)."""


class WorldsNotCached(BackendError):
    """The backend lost (or never had) these worlds' caches: restart them from history, then retry."""

    def __init__(self, world_ids: Sequence[str]):
        super().__init__(f"no cached state for worlds {list(world_ids)}")
        self.world_ids = list(world_ids)


class ModelBackend(Protocol):
    """Every call names the model by its key: the bare name of a fixed model (settings), or `name@N` for a
    published version loaded with load_version. A plugin is built as Backend(settings, metrics) with the
    gateway's GatewaySettings and GatewayMetrics."""

    def models(self) -> list[ModelInfo]:
        """The fixed models, loaded at start-up."""

    def load_version(self, model: ModelVersion, catalog: ModelCatalog) -> ModelInfo:
        """Make a published version servable under the key model.ref (idempotent); its info's name is that key."""

    def unload_version(self, key: str) -> None:
        """Free a published version no world plays any more (unknown keys are fine)."""

    def encode(self, model: str, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [T, H, W, 3] -> tokens [T, h, w]."""

    def infer_actions(self, model: str, frames: np.ndarray) -> np.ndarray:
        """uint8 frames [T, H, W, 3] -> latent action per transition [T-1]."""

    def start_world(self, model: str, world_id: str, tokens: np.ndarray, actions: np.ndarray,
                    first_position: int = 0) -> np.ndarray:
        """(Re)build a world's caches from its history (tokens [T, h, w], actions [T] leading into each
        frame; the first is num_actions, meaning "no action"); returns the history decoded [T, H, W, 3].
        first_position: the world's frame index of tokens[0], so a rebuild from the last frames of a long
        world continues bit-identically."""

    def step_worlds(self, model: str, steps: Sequence[WorldStep]) -> list[StepResult]:
        """Advance several worlds of one model in one batch; raises WorldsNotCached for lost caches."""

    def end_world(self, model: str, world_id: str) -> None: ...

    def close(self) -> None: ...
