"""The world store contract: one record per open world, written only after its step succeeded.

A record is everything needed to continue a world bit-identically on any gateway: owner, model,
sampling, step count, the token history its model caches are rebuilt from, and the last frame (so a
retried step can be answered without stepping again).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class WorldRecord:
    world_id: str
    owner: str  # id of the API key that created the world
    model: str
    seed: int
    num_maskgit_steps: int
    temperature: float
    output_format: int  # a genie.v1 FrameFormat value
    step: int  # frames generated so far
    tokens: np.ndarray  # int [T, h, w]: the last T <= history_frames frames' tokens
    actions: np.ndarray  # int [T]: the action that led into each of those frames
    last_frame: np.ndarray  # uint8 [H, W, 3]: frame number `step`
    last_action: int  # action that produced frame `step` (-1 for the prompt frame)
    # The action pointer's scale this world plays with (None: its model has none; records written before
    # the field existed load as None and play the model's own).
    action_guidance: float | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)

    def meta_json(self) -> str:
        """Every scalar field plus array shapes, as JSON (arrays travel separately as raw bytes)."""
        meta = {key: value for key, value in asdict(self).items()
                if key not in ("tokens", "actions", "last_frame")}
        meta |= {"tokens_shape": list(self.tokens.shape), "frame_shape": list(self.last_frame.shape)}
        return json.dumps(meta)

    def array_bytes(self) -> dict[str, bytes]:
        return {"tokens": np.ascontiguousarray(self.tokens, dtype=np.int32).tobytes(),
                "actions": np.ascontiguousarray(self.actions, dtype=np.int32).tobytes(),
                "frame": np.ascontiguousarray(self.last_frame, dtype=np.uint8).tobytes()}

    @classmethod
    def from_parts(cls, meta_json: str | bytes, tokens: bytes, actions: bytes, frame: bytes) -> "WorldRecord":
        meta = json.loads(meta_json)
        tokens_shape, frame_shape = meta.pop("tokens_shape"), meta.pop("frame_shape")
        return cls(**meta, tokens=np.frombuffer(tokens, dtype=np.int32).reshape(tokens_shape).astype(np.int64),
                   actions=np.frombuffer(actions, dtype=np.int32).astype(np.int64),
                   last_frame=np.frombuffer(frame, dtype=np.uint8).reshape(frame_shape))


class WorldStoreUnavailable(RuntimeError):
    """The store cannot be reached (maps to UNAVAILABLE); nothing was written."""


class WorldStore(Protocol):
    """Plugin kind `worlds` (entry point group genie.worlds); factories take GatewaySettings."""

    def create(self, record: WorldRecord) -> None:
        """Adds a new world."""

    def load(self, world_id: str) -> WorldRecord | None:
        """The world's record, or None if it was never created, was closed or expired."""

    def commit(self, record: WorldRecord, previous_step: int) -> bool:
        """Replaces the record only if the stored one is still at previous_step (compare-and-set);
        False if it moved on or is gone, so a world is never stepped twice for one request."""

    def delete(self, world_id: str, owner: str) -> bool:
        """Removes a world; False if it was not there."""

    def list(self, owner: str) -> list[WorldRecord]:
        """The owner's worlds, oldest first."""

    def count(self, owner: str) -> int:
        """How many worlds the owner has open."""

    def close(self) -> None: ...
