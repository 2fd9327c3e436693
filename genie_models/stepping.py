"""Token-level engines that step many sessions (worlds) together against their temporal KV caches.

`DynamicsEngine` samples each session's next frame tokens; `FrameDecoder` turns them into pixels.
Both keep one cache slot per session, so the in-process World and the model services share this code.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Sequence
from dataclasses import dataclass

import torch

from genie_models.dynamics import DynamicsModel, maskgit_sample
from genie_models.st_transformer import CacheView, STTransformer
from genie_models.tokenizer import VideoTokenizer


class UnknownSession(KeyError):
    """The session has no cache here (never started, ended, or evicted): start it again from history."""


class SessionSlots:
    """One slot per session in a temporal KV cache; the least recently used session is evicted when full.

    A model without temporal attention (a per-frame decoder) keeps no cache, only which sessions it knows,
    so the "unknown session -> rebuild from history" contract is the same for every model.
    """

    def __init__(self, transformer: STTransformer, tokens_per_frame: int, max_sessions: int,
                 device: torch.device | str, dtype: torch.dtype, evict_when_full: bool):
        self.cache = (transformer.new_cache(max_sessions, tokens_per_frame, device, dtype)
                      if transformer.config.is_temporal else None)
        self.num_slots, self.device = max_sessions, torch.device(device)
        self.evict_when_full = evict_when_full
        self._slots: OrderedDict[Hashable, int] = OrderedDict()
        self._free = list(range(max_sessions - 1, -1, -1))

    def open(self, key: Hashable, first_position: int = 0) -> torch.Tensor:
        """A cleared slot for `key` whose next frame will be at position first_position."""
        if key in self._slots:
            slot = self._slots.pop(key)
        elif self._free:
            slot = self._free.pop()
        elif self.evict_when_full:
            _, slot = self._slots.popitem(last=False)
        else:
            raise RuntimeError(f"all {self.num_slots} session slots are in use")
        self._slots[key] = slot
        slots = torch.tensor([slot], device=self.device)
        if self.cache is not None:
            self.cache.reset(slots)
            self.cache.next_position[slots] = first_position
        return slots

    def slots(self, keys: Sequence[Hashable]) -> torch.Tensor:
        missing = [key for key in keys if key not in self._slots]
        if missing:
            raise UnknownSession(missing)
        for key in keys:
            self._slots.move_to_end(key)
        return torch.tensor([self._slots[key] for key in keys], device=self.device)

    def view(self, slots: torch.Tensor, commit: bool = False) -> CacheView | None:
        return self.cache.view(slots, commit) if self.cache is not None else None

    def close(self, key: Hashable) -> None:
        slot = self._slots.pop(key, None)
        if slot is not None:
            self._free.append(slot)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)


@dataclass(frozen=True)
class StepRequest:
    session: Hashable
    action: int
    seed: int
    step_index: int  # the frame's index in its world: with the seed it fixes the sampling noise
    num_steps: int
    temperature: float
    action_guidance: float | None = None  # the action pointer's scale for this world (None: the model's own)


def step_noise(seed: int, step_index: int, num_steps: int, tokens_per_frame: int) -> torch.Tensor:
    """Uniform noise [num_steps, S] for one world's step, a pure function of (seed, step_index), so a
    world replays identically whatever batch it is in and after its cache is rebuilt."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step_index) % (2**63))
    return torch.rand(num_steps, tokens_per_frame, generator=generator)


class DynamicsEngine:
    """Samples the next frame's tokens for many sessions at once (one frame of compute per MaskGIT pass)."""

    def __init__(self, model: DynamicsModel, max_sessions: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, evict_when_full: bool = False):
        self.model, self.device = model, torch.device(device)
        self.config = model.config
        self.sessions = SessionSlots(model.transformer, self.config.frame_length, max_sessions,
                                     device, dtype, evict_when_full)
        # Each session's newest frames (oldest first; mask_id: none yet) and the actions that led into them: the
        # last is the predecessor of the frame being sampled (copy bonus), the rest the pointer's memory.
        frames = max(1, self.config.pointer_memory)
        self.recent_tokens = torch.full((max_sessions, frames, self.config.tokens_per_frame), self.config.mask_id,
                                        dtype=torch.long, device=self.device)
        self.recent_actions = torch.full((max_sessions, frames), self.config.no_action_id, dtype=torch.long,
                                         device=self.device)

    @torch.no_grad()
    def start(self, session: Hashable, tokens: torch.Tensor, actions: torch.Tensor, first_position: int = 0) -> None:
        """(Re)build a session's cache from its history: tokens [T, S], actions [T] leading into each frame.

        first_position: the world's frame index of tokens[0]. A rebuild from the last frames of a long world
        must place them where they were, so rotary angles (and their rounding) match bit for bit.
        """
        slots = self.sessions.open(session, first_position)
        view = self.sessions.view(slots, commit=True)
        self.model.append(tokens[None].to(self.device), actions[None].to(self.device), view)
        kept = min(len(tokens), self.recent_tokens.shape[1])
        self.recent_tokens[slots] = self.config.mask_id
        self.recent_tokens[slots, -kept:] = tokens[-kept:].to(self.device)
        self.recent_actions[slots] = self.config.no_action_id
        self.recent_actions[slots, -kept:] = actions[-kept:].to(self.device)

    @torch.no_grad()
    def step(self, requests: Sequence[StepRequest]) -> torch.Tensor:
        """-> next-frame tokens [B, S] in request order. Requests are grouped by MaskGIT step count."""
        out = torch.empty(len(requests), self.config.tokens_per_frame, dtype=torch.long, device=self.device)
        by_steps: dict[int, list[int]] = {}
        for index, request in enumerate(requests):
            by_steps.setdefault(request.num_steps, []).append(index)
        for num_steps, indices in by_steps.items():
            out[indices] = self._step_group([requests[i] for i in indices], num_steps)
        return out

    def _step_group(self, requests: Sequence[StepRequest], num_steps: int) -> torch.Tensor:
        slots = self.sessions.slots([r.session for r in requests])
        actions = torch.tensor([[r.action] for r in requests], device=self.device)
        temperature = torch.tensor([r.temperature for r in requests], device=self.device)
        default = self.config.action_guidance
        guidance = torch.tensor([default if r.action_guidance is None else r.action_guidance for r in requests],
                                dtype=torch.float64, device=self.device)
        uniforms = torch.stack([step_noise(r.seed, r.step_index, num_steps, self.config.tokens_per_frame)
                                for r in requests]).to(self.device)
        view = self.sessions.view(slots)
        recent, recent_actions = self.recent_tokens[slots], self.recent_actions[slots]
        previous = recent[:, -1:]  # [B, 1, S]
        sources = self.model.pointer_sources(recent, recent_actions)
        sources = None if sources is None else sources[:, None]
        tokens = maskgit_sample(
            lambda new: self.model.sampling_logits(new[:, None], actions, view, previous, sources,
                                                   guidance=guidance)[:, 0],
            self.config.mask_id, num_steps, temperature, uniforms)
        self.model.append(tokens[:, None], actions, view.committing())
        self.recent_tokens[slots] = torch.cat([recent[:, 1:], tokens[:, None]], dim=1)
        self.recent_actions[slots] = torch.cat([recent_actions[:, 1:], actions], dim=1)
        return tokens

    def end(self, session: Hashable) -> None:
        self.sessions.close(session)


class FrameDecoder:
    """Decodes each session's newest frame tokens to pixels against the tokenizer decoder's cache."""

    def __init__(self, tokenizer: VideoTokenizer, max_sessions: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32, evict_when_full: bool = False):
        self.tokenizer, self.device = tokenizer, torch.device(device)
        self.sessions = SessionSlots(tokenizer.decoder, tokenizer.config.tokens_per_frame, max_sessions,
                                     device, dtype, evict_when_full)

    @torch.no_grad()
    def start(self, session: Hashable, tokens: torch.Tensor, first_position: int = 0) -> torch.Tensor:
        """(Re)build a session's cache from its frame tokens [T, h, w] (tokens[0] is frame first_position);
        returns those frames decoded."""
        view = self.sessions.view(self.sessions.open(session, first_position), commit=True)
        return self.tokenizer.decode_step(tokens[None].to(self.device), view)[0]

    @torch.no_grad()
    def decode(self, sessions: Sequence[Hashable], tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, h, w] of each session's next frame -> uint8 frames [B, H, W, 3]."""
        view = self.sessions.view(self.sessions.slots(sessions), commit=True)
        return self.tokenizer.decode_step(tokens[:, None].to(self.device), view)[:, 0]

    def end(self, session: Hashable) -> None:
        self.sessions.close(session)
