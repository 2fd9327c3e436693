"""Playable worlds in process: many worlds step together as one batch, each with its own context,
KV caches, step count and seed; worlds join and leave freely. `World` is the one-world convenience.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from genie_models.prompts import prepare_prompt
from genie_models.stepping import DynamicsEngine, FrameDecoder, StepRequest
from genie_models.world_model import WorldModel


@dataclass
class WorldState:
    seed: int
    num_maskgit_steps: int
    temperature: float
    action_guidance: float | None = None  # the action pointer's scale (None: the model's own)
    step_count: int = 0  # frames generated so far


class WorldPool:
    """Owns the dynamics and decoder caches for up to `max_worlds` worlds on one device."""

    def __init__(self, model: WorldModel, max_worlds: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.model, self.device = model, torch.device(device)
        self.dynamics = DynamicsEngine(model.dynamics, max_worlds, device, dtype)
        self.decoder = FrameDecoder(model.tokenizer, max_worlds, device, dtype)
        self.worlds: dict[int, WorldState] = {}
        self._ids = itertools.count()

    @property
    def max_worlds(self) -> int:
        return self.dynamics.sessions.num_slots

    @torch.no_grad()
    def create(self, prompt, seed: int = 0, num_maskgit_steps: int | None = None, temperature: float | None = None,
               action_guidance: float | None = None) -> tuple[int, np.ndarray]:
        """Start a world from prompt image(s); returns (world id, the prompt's last frame as the model sees it).
        None: the model's default for that sampling setting."""
        if len(self.worlds) >= self.max_worlds:
            raise RuntimeError(f"this pool already holds its maximum of {self.max_worlds} worlds")
        config = self.model.dynamics.config
        if num_maskgit_steps is not None and num_maskgit_steps < 0:
            raise ValueError(f"num_maskgit_steps must be >= 0 (0: this world's {config.num_maskgit_steps}), "
                             f"got {num_maskgit_steps}")
        if temperature is not None and not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
        if action_guidance is not None and not config.action_pointer:
            raise ValueError("this world's dynamics model has no action pointer, so action guidance does not apply")
        if action_guidance is not None and not (math.isfinite(action_guidance) and action_guidance >= 0):
            raise ValueError(f"action guidance must be a finite number >= 0 (1 = as trained, this world's default "
                             f"is {config.action_guidance:g}), got {action_guidance}")
        frames = torch.from_numpy(prepare_prompt(prompt, self.model.image_size)).to(self.device)
        tokens = self.model.tokenizer.encode(frames[None])[0]  # [T, h, w]
        world_id = next(self._ids)
        self.dynamics.start(world_id, tokens.flatten(1), self._prompt_actions(frames))
        decoded = self.decoder.start(world_id, tokens)
        self.worlds[world_id] = WorldState(seed, num_maskgit_steps or config.num_maskgit_steps,
                                           config.temperature if temperature is None else temperature,
                                           action_guidance)
        return world_id, decoded[-1].cpu().numpy()

    def _prompt_actions(self, frames: torch.Tensor) -> torch.Tensor:
        """Actions leading into each prompt frame: none for the first, the LAM's labels for the rest."""
        first = torch.tensor([self.model.dynamics.config.no_action_id], device=self.device)
        if frames.shape[0] == 1:
            return first
        return torch.cat([first, self.model.lam.infer_actions(frames[None])[0]])

    @torch.no_grad()
    def step(self, actions: Mapping[int, int]) -> dict[int, np.ndarray]:
        """Advance each named world by its action in one batch -> {world id: uint8 frame [H, W, 3]}."""
        return {world_id: frame for world_id, (frame, _) in self.step_with_tokens(actions).items()}

    @torch.no_grad()
    def step_with_tokens(self, actions: Mapping[int, int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        """Like step, also returning each world's new frame tokens: {world id: (frame, tokens [h, w])}."""
        for world_id, action in actions.items():
            self._check(world_id, action)
        ids = list(actions)
        states = [self.worlds[world_id] for world_id in ids]
        requests = [StepRequest(world_id, actions[world_id], state.seed, state.step_count, state.num_maskgit_steps,
                                state.temperature, state.action_guidance) for world_id, state in zip(ids, states)]
        grid = self.model.tokenizer.config.grid_size
        tokens = self.dynamics.step(requests).reshape(len(ids), grid, grid)
        frames = self.decoder.decode(ids, tokens).cpu().numpy()
        for world_id in ids:
            self.worlds[world_id].step_count += 1
        return {world_id: (frame, token) for world_id, frame, token in zip(ids, frames, tokens.cpu().numpy())}

    def _check(self, world_id: int, action: int) -> None:
        if world_id not in self.worlds:
            raise KeyError(f"no world with id {world_id}")
        if not 0 <= action < self.model.num_actions:
            raise ValueError(f"action {action} is out of range: this world has actions 0..{self.model.num_actions - 1}")

    def close(self, world_id: int) -> None:
        self.worlds.pop(world_id, None)
        self.dynamics.end(world_id)
        self.decoder.end(world_id)


class World:
    """One playable world: `reset(prompt) -> frame`, then `step(action) -> frame`, deterministic per seed."""

    def __init__(self, model: WorldModel, seed: int = 0, num_maskgit_steps: int | None = None,
                 temperature: float | None = None, device: torch.device | str = "cpu",
                 action_guidance: float | None = None):
        self.pool = WorldPool(model, max_worlds=1, device=device)
        self.sampling = {"seed": seed, "num_maskgit_steps": num_maskgit_steps, "temperature": temperature,
                         "action_guidance": action_guidance}
        self.world_id: int | None = None

    def reset(self, prompt) -> np.ndarray:
        if self.world_id is not None:
            self.pool.close(self.world_id)
        self.world_id, frame = self.pool.create(prompt, **self.sampling)
        return frame

    def step(self, action: int) -> np.ndarray:
        if self.world_id is None:
            raise RuntimeError("call reset(prompt) before step(action)")
        return self.pool.step({self.world_id: action})[self.world_id]


@dataclass
class Rollout:
    frames: np.ndarray  # uint8 [B, t, H, W, 3] generated frames
    tokens: np.ndarray  # int64 [B, t, h, w] their tokens


@torch.no_grad()
def rollout(model: WorldModel, prompts: np.ndarray, actions: torch.Tensor, seed: int = 0,
            num_maskgit_steps: int | None = None) -> Rollout:
    """Play one world per prompt frame [B, H, W, 3] through actions [B, t], all in one batch;
    world i uses seed + i."""
    pool = WorldPool(model, max_worlds=len(prompts), device=next(model.dynamics.parameters()).device)
    ids = [pool.create(prompt, seed=seed + index, num_maskgit_steps=num_maskgit_steps)[0]
           for index, prompt in enumerate(prompts)]
    frames, tokens = [], []
    for step in range(actions.shape[1]):
        out = pool.step_with_tokens({world_id: int(actions[i, step]) for i, world_id in enumerate(ids)})
        frames.append(np.stack([out[world_id][0] for world_id in ids]))
        tokens.append(np.stack([out[world_id][1] for world_id in ids]))
    return Rollout(np.stack(frames, axis=1), np.stack(tokens, axis=1))


def rollout_actions(model: WorldModel, prompts: np.ndarray, actions: torch.Tensor, seed: int = 0) -> np.ndarray:
    """The frames of `rollout`: uint8 [B, t, H, W, 3]."""
    return rollout(model, prompts, actions, seed).frames
