"""The dynamics model: a MaskGIT transformer predicting the next frame's tokens from past tokens and an action.

Training keeps a random prefix of frames visible and masks the rest at a rate drawn from U(mask_rate_min, 1),
scoring the masked positions; sampling fills a fully masked frame in confident-first passes (cosine schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn

from genie_models.metrics import maskgit_mask_schedule
from genie_models.st_transformer import CacheView, STConfig, STTransformer


@dataclass(frozen=True)
class DynamicsConfig:
    num_codes: int = 1024  # tokenizer vocabulary
    code_dim: int = 32  # the tokenizer's code vectors (expected-code decoding)
    tokens_per_frame: int = 256
    num_actions: int = 8
    d_model: int = 512
    num_heads: int = 8
    num_layers: int = 12
    context_frames: int = 16
    mask_rate_min: float = 0.5
    num_maskgit_steps: int = 25
    temperature: float = 1.0
    # Jasmine (arXiv 2510.27002) found a per-frame action token, rather than the paper's action embedding
    # added to every token, essential for faithful CoinRun rollouts; measured here too (README).
    action_as_token: bool = True
    # MaskGIT's head: logits are scores against the token embeddings, so "copy the token at this position
    # in the previous frame" is an identity to learn rather than a 1024-way mapping.
    tie_embeddings: bool = True
    # A learned bonus on the logit of the token the previous frame had at the same position, starting at
    # even odds against the rest of the vocabulary (log num_codes): the untrained model already plays
    # "nothing changes" (the tokenized-copy baseline) and its capacity goes to what does change.
    copy_previous_token: bool = True
    # With copy_previous_token: a pointer over the previous frame's tokens within (rows, columns) of each
    # position, mixed with the generated distribution (pointer-generator). (0, 0): a logit bonus for the
    # same position only. A scrolling scene moves tokens to neighbouring positions; a pointer learns
    # which neighbour from the action quickly, where generating the moved token means learning it anew.
    copy_window: tuple[int, int] = (0, 0)
    # With the pointer: True, an offset that falls outside the frame points at nothing and its share goes to
    # generate, so the rows a scroll brings in are generated; False, it is clamped to the edge, so a scroll
    # copies the edge row inward. Long play then smears the scene into vertical streaks; but the tiny model's
    # generated rows are flat averages that wash it out as fast, and cost 0.7 dB of ΔtPSNR (README: measured),
    # so tiny keeps the clamp. A model that generates well should not.
    pointer_within_frame: bool = False
    # With the pointer: a learned per-action bias on its choice of offset, read straight from the action
    # rather than through the transformer. A latent action that means "the scene scrolls up" then points
    # every position at the token one row below from the first steps of training (README: measured).
    action_pointer: bool = False
    # With the action pointer, play only: an offset past the frame's edge reads that place from the newest of
    # the world's last `pointer_memory` frames that showed it, each frame placed by the scroll its action's
    # pointer bias favours most, rather than the edge (or nothing, with pointer_within_frame): a view that
    # scrolls back shows what it left instead of repeating its edge. 0 or 1: the previous frame alone.
    # On a demo world it lifted t = 16 above the raw copy; long play unchanged (README, "Is it a world yet?").
    pointer_memory: int = 0
    # Sampling only: the action pointer's bias is multiplied by this (1: as trained). Like classifier-free
    # guidance it amplifies what the action says; training's cross-entropy keeps the bias hedged, while a
    # world played from it should commit to the move (README, "Is it a world yet?": measured).
    action_guidance: float = 1.0
    # Sampling picks, per position, the code nearest the probability-weighted mean of the code vectors
    # (a minimum-expected-distance choice) instead of the single likeliest code: a model unsure *which*
    # moved code comes next, but sure that the patch moves, then moves it instead of repeating the
    # likeliest single code (the old one). Needs the tokenizer's code vectors (use_codebook).
    expected_code_decoding: bool = False

    @property
    def mask_id(self) -> int:
        return self.num_codes

    @property
    def frame_length(self) -> int:
        """Positions per frame inside the transformer: the frame's tokens, plus its action token if any."""
        return self.tokens_per_frame + int(self.action_as_token)

    @property
    def no_action_id(self) -> int:
        """The action fed with a world's first frame, which no action led to."""
        return self.num_actions

    def transformer_config(self) -> STConfig:
        return STConfig(self.num_layers, self.d_model, self.num_heads, self.context_frames)


DYNAMICS_PRESETS = {
    # Greedy decoding: a minutes-old CPU model's samples are mostly noise at temperature 1 (+2 dB PSNR).
    # Expected-code decoding and the pointer over neighbouring tokens: README, "Is it a world yet?".
    # 1 MaskGIT pass, not the paper's 25: greedy expected-code decoding draws each position from the pointer and
    # the context frames, barely from the frame's other new tokens, so refinement passes add nothing measurable.
    # On two demo worlds (64 held-out clips) 1 and 4 passes scored within 0.05 dB of each other at t = 1, 4, 8, 16
    # (ΔtPSNR t=4 +4.27 / +4.28 and +4.06 / +4.04 dB) and one world steps 1.9-2.6x faster (README, "Is it a world
    # yet?"). Sampling at a temperature wants more passes: SamplingParams.num_maskgit_steps sets them per world.
    # Action guidance 3: chosen on training-split clips of one demo world as the value at which generated play
    # changes as many tokens per step as real play (0.135 vs 0.133); ΔtPSNR t=4 there +1.7 at 1, +4.2 at 3.
    "tiny": DynamicsConfig(num_codes=512, d_model=128, num_heads=4, num_layers=4, context_frames=8,
                           num_maskgit_steps=1, temperature=0.0, copy_window=(2, 1), expected_code_decoding=True,
                           action_pointer=True, action_guidance=3.0, pointer_memory=16),
    "coinrun": DynamicsConfig(),
}


# The action pointer's table is scaled up so that its few entries move as fast as they must: Adam moves each
# parameter by about the learning rate per step, and 250 steps at 1e-3 left the biases within 0.2 of zero
# (measured) where pointing from "same position" to "one row below" takes ~3-5 nats.
ACTION_POINTER_GAIN = 50.0

# Cosine similarities to the expected code, scaled so MaskGIT's confidence (the softmax of these scores)
# commits first where the expectation sits close to one code.
EXPECTED_CODE_SHARPNESS = 50.0


@dataclass
class DynamicsLoss:
    loss: torch.Tensor
    accuracy: torch.Tensor  # share of masked tokens predicted exactly


class DynamicsModel(nn.Module):
    def __init__(self, config: DynamicsConfig):
        super().__init__()
        self.config = config
        self.token_embed = nn.Embedding(config.num_codes + 1, config.d_model)  # + the mask token
        self.action_embed = nn.Embedding(config.num_actions + 1, config.d_model)  # + "no action"
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.action_embed.weight, std=0.02)
        self.position = nn.Parameter(torch.randn(config.frame_length, config.d_model) * 0.02)
        self.transformer = STTransformer(config.transformer_config())
        self.head = None if config.tie_embeddings else nn.Linear(config.d_model, config.num_codes)
        self.head_bias = nn.Parameter(torch.zeros(config.num_codes)) if config.tie_embeddings else None
        if config.expected_code_decoding:  # filled from the tokenizer by use_codebook, saved with the model
            self.register_buffer("code_vectors", torch.zeros(config.num_codes, config.code_dim))
        else:
            self.code_vectors = None
        pointer = config.copy_previous_token and config.copy_window != (0, 0)
        self.copy_logit = (nn.Parameter(torch.tensor(math.log(config.num_codes)))
                           if config.copy_previous_token and not pointer else None)
        self.copy_offsets = _window_offsets(*config.copy_window) if pointer else None
        self.copy_head = nn.Linear(config.d_model, len(self.copy_offsets) + 1) if pointer else None
        self.action_pointer = (nn.Embedding(config.num_actions + 1, len(self.copy_offsets) + 1)
                               if pointer and config.action_pointer else None)
        if self.action_pointer is not None:
            nn.init.zeros_(self.action_pointer.weight)
        if config.pointer_memory > 1 and self.action_pointer is None:
            raise ValueError("pointer_memory needs the action pointer: each remembered frame is placed by the "
                             "scroll its action's pointer bias favours")
        # The pointer reads the previous frame padded by its reach (rows, columns) on every side: which cell each
        # offset of each position reads, and each padded cell's place, fixed by the config: built once.
        grid = (_PointerGrid.build(math.isqrt(config.tokens_per_frame), config.copy_window, self.copy_offsets)
                if pointer else None)
        for field in fields(_PointerGrid):
            self.register_buffer(f"pointer_{field.name}", getattr(grid, field.name, None), persistent=False)
        if self.copy_head is not None:
            # Starts near "copy the same position" (~1/2), "generate" (~1/5), each neighbour ~1/40.
            nn.init.zeros_(self.copy_head.weight)
            with torch.no_grad():
                self.copy_head.bias.zero_()
                self.copy_head.bias[self.copy_offsets.index((0, 0))] = 3.0
                self.copy_head.bias[-1] = 2.0

    def forward(self, tokens: torch.Tensor, actions: torch.Tensor, cache: CacheView | None = None,
                previous_tokens: torch.Tensor | None = None, guidance: float = 1.0,
                pointer_sources: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, T, S] (mask_id where unknown), actions [B, T] leading into each frame -> logits [B, T, S, V].

        previous_tokens [B, T, S]: each frame's predecessor's tokens for the copy bonus (mask_id: none);
        by default the input's own previous frames, and none for the first. guidance: the action
        pointer's scale (see DynamicsConfig.action_guidance). pointer_sources [B, T, P]: what the pointer
        reads (see pointer_sources; by default the previous frames without memory).
        """
        previous_tokens, pointer_sources = self._predecessor_inputs(tokens, previous_tokens, pointer_sources)
        return self._output(self._hidden(tokens, actions, cache), previous_tokens, self._neighbours(pointer_sources),
                            self._pointer_bias(actions, guidance))

    def _output(self, hidden: torch.Tensor, previous: torch.Tensor, neighbours: torch.Tensor | None,
                pointer_bias: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [..., V] from hidden states [..., D], given each position's predecessor token [...] and,
        for the pointer, the predecessor's tokens around it [..., O] and the action's bias on its choice
        [..., O + 1] (None: no bias); any leading shape, so training scores only the masked positions."""
        logits = self._head(hidden)
        if self.copy_head is not None:
            return self._pointer_mixture(self._pointer_choice(hidden, pointer_bias), logits, previous, neighbours)
        if self.copy_logit is None:
            return logits
        known = previous != self.config.mask_id
        bonus = (self.copy_logit * known).to(logits.dtype)
        return logits.scatter_add(-1, previous.clamp_max(self.config.num_codes - 1)[..., None], bonus[..., None])

    def _pointer_bias(self, actions: torch.Tensor, guidance: float | torch.Tensor = 1.0) -> torch.Tensor | None:
        """actions [B, T] -> the pointer's per-action bias [B, T, 1, O + 1] (None without one), scaled by
        `guidance` (sampling: config.action_guidance or each world's [B, 1, 1, 1]; training: 1)."""
        if self.action_pointer is None:
            return None
        bias = self.action_pointer(actions)[:, :, None, :]
        scale = ACTION_POINTER_GAIN * guidance  # in double, then rounded once, as a float guidance is
        return (scale.to(bias.dtype) if isinstance(scale, torch.Tensor) else scale) * bias

    def _pointer_choice(self, hidden: torch.Tensor, pointer_bias: torch.Tensor | None) -> torch.Tensor:
        """Log-probabilities [..., O + 1] of pointing at each offset, the last: generate."""
        scores = self.copy_head(hidden).float()
        return (scores if pointer_bias is None else scores + pointer_bias.float()).log_softmax(dim=-1)

    def _predecessor_inputs(self, tokens: torch.Tensor, previous_tokens: torch.Tensor | None,
                            pointer_sources: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """forward's defaults: each frame's predecessor within tokens, and what the pointer reads of it."""
        if previous_tokens is None:
            previous_tokens = self._predecessors(tokens)
        if pointer_sources is None:
            pointer_sources = self._previous_sources(previous_tokens)
        return previous_tokens, pointer_sources

    def _neighbours(self, sources: torch.Tensor | None) -> torch.Tensor | None:
        """What the pointer reads, padded frames [..., P] (see pointer_sources) -> its candidates [..., S, O]."""
        return None if sources is None else sources[..., self.pointer_neighbour_index]

    def _previous_sources(self, previous_tokens: torch.Tensor) -> torch.Tensor | None:
        """previous_tokens [B, T, S] -> each one padded for the pointer [B, T, P], without memory."""
        if self.copy_head is None:
            return None
        return self.pointer_sources(previous_tokens.flatten(0, 1)[:, None]).unflatten(0, previous_tokens.shape[:2])

    def pointer_sources(self, frames: torch.Tensor, actions: torch.Tensor | None = None) -> torch.Tensor | None:
        """What the pointer reads around the newest of frames [B, K, S] (oldest first; mask_id frames: none yet):
        that frame padded by the pointer's reach [B, P] (None without a pointer). Past its edges, with K > 1
        and actions [B, K] that led into each frame, a cell comes from the newest earlier frame that showed it;
        otherwise it repeats the edge, or is mask_id (nothing) with pointer_within_frame."""
        if self.copy_head is None:
            return None
        newest = frames[:, -1]
        sources = newest[:, self.pointer_edge_index]
        if self.config.pointer_within_frame:
            sources = sources.masked_fill(~self.pointer_inside, self.config.mask_id)
        if frames.shape[1] == 1:
            return sources
        remembered = self._remembered(frames, actions)
        return torch.where(self.pointer_inside | (remembered == self.config.mask_id), sources, remembered)

    def _remembered(self, frames: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """Each padded cell [B, P] from the newest of frames [B, K, S] that showed it, mask_id where none did."""
        grid = math.isqrt(frames.shape[-1])
        # Frame j's row q shows the newest frame's row q - (the scrolls of frames j+1..K-1): undo them.
        scrolls = self.action_scrolls()[actions[:, 1:]]  # [B, K - 1, 2]
        behind = torch.cat([scrolls.flip(1).cumsum(1).flip(1), torch.zeros_like(scrolls[:, :1])], dim=1)
        where = self.pointer_cells + behind[:, :, None, :]  # [B, K, P, 2]: each cell's place in each frame
        shown = ((where >= 0) & (where < grid)).all(-1) & (frames[:, :, :1] != self.config.mask_id)
        place = where[..., 0].clamp(0, grid - 1) * grid + where[..., 1].clamp(0, grid - 1)
        tokens = frames.gather(2, place)  # [B, K, P]
        order = torch.arange(1, frames.shape[1] + 1, device=frames.device)[:, None]
        newest_shown = (shown * order).argmax(dim=1, keepdim=True)  # [B, 1, P]
        found = tokens.gather(1, newest_shown)[:, 0]
        return torch.where(shown.any(dim=1), found, self.config.mask_id)

    def action_scrolls(self) -> torch.Tensor:
        """[num_actions + 1, 2]: the (row, column) offset each action's pointer bias favours, i.e. how far the
        action scrolls the view; (0, 0) for "no action"."""
        offsets = torch.tensor(self.copy_offsets, device=self.action_pointer.weight.device)
        scrolls = offsets[self.action_pointer.weight[:, :-1].argmax(dim=-1)]
        scrolls[self.config.no_action_id] = 0
        return scrolls

    def _pointer_weights(self, mix: torch.Tensor, neighbours: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mix [..., O + 1] (log-probabilities of each offset, the last: generate), neighbours [..., O] ->
        (generate's weight [..., 1], each offset's weight [..., O]): pointing at no token is generating."""
        weights = mix.exp()
        real = neighbours != self.config.mask_id
        pointed = weights[..., :-1] * real
        return weights[..., -1:] + (weights[..., :-1] - pointed).sum(-1, keepdim=True), pointed

    def use_codebook(self, code_vectors: torch.Tensor) -> None:
        """The tokenizer's code vectors [num_codes, code_dim], as its decoder sees them."""
        self.code_vectors.copy_(code_vectors.detach())

    def sampling_logits(self, tokens: torch.Tensor, actions: torch.Tensor, cache: CacheView | None = None,
                        previous_tokens: torch.Tensor | None = None,
                        pointer_sources: torch.Tensor | None = None, newest_only: bool = False,
                        guidance: torch.Tensor | None = None) -> torch.Tensor:
        """What sampling draws from: forward's logits, or with expected_code_decoding scores that rank
        codes by closeness to the expected code vector (argmax: the nearest code); both with the action
        pointer scaled by guidance [B] (each world's own; None: config.action_guidance for all). Arguments as
        for forward; newest_only: score only the last frame (a window run without a cache samples just that
        one) -> [B, 1, S, V]."""
        previous_tokens, pointer_sources = self._predecessor_inputs(tokens, previous_tokens, pointer_sources)
        hidden = self._hidden(tokens, actions, cache)
        if newest_only:
            hidden, previous_tokens, actions = hidden[:, -1:], previous_tokens[:, -1:], actions[:, -1:]
            pointer_sources = None if pointer_sources is None else pointer_sources[:, -1:]
        neighbours = self._neighbours(pointer_sources)
        pointer_bias = self._pointer_bias(actions, self.config.action_guidance if guidance is None
                                          else guidance[:, None, None, None])
        if self.code_vectors is None:
            return self._output(hidden, previous_tokens, neighbours, pointer_bias)
        if self.copy_head is None:
            expected = self._output(hidden, previous_tokens, None).float().softmax(dim=-1) @ self.code_vectors
        else:
            expected = self._expected_pointer_code(hidden, previous_tokens, neighbours, pointer_bias)
        return code_similarity_scores(expected, self.code_vectors)

    def _expected_pointer_code(self, hidden: torch.Tensor, previous: torch.Tensor, neighbours: torch.Tensor,
                               pointer_bias: torch.Tensor | None) -> torch.Tensor:
        """The pointer mixture's expected code vector [..., code_dim] (arguments as for _output), summed over its
        parts (each pointed-at neighbour, and generate) rather than over a mixed vocabulary-sized distribution:
        the same vector, without building and normalising [..., V] mixtures on every MaskGIT pass."""
        generate, pointer = self._pointer_weights(self._pointer_choice(hidden, pointer_bias), neighbours)
        generated = self._head(hidden).float().softmax(dim=-1) @ self.code_vectors
        pointed = (pointer[..., None] * self.code_vectors[neighbours.clamp_max(self.config.num_codes - 1)]).sum(-2)
        known = (previous != self.config.mask_id)[..., None]
        return torch.where(known, generate * generated + pointed, generated)

    def _predecessors(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, S] -> each frame's predecessor's tokens, mask_id (none) for the first frame."""
        return torch.cat([torch.full_like(tokens[:, :1], self.config.mask_id), tokens[:, :-1]], dim=1)

    @torch.no_grad()
    def append(self, tokens: torch.Tensor, actions: torch.Tensor, cache: CacheView) -> None:
        """Write known frames (tokens [B, T, S], actions [B, T]) into a committing cache view, without the
        output head: a world's history at a rebuild, or the frame a step just sampled."""
        self.transformer.write_cache(self._embed(tokens, actions), cache)

    def _hidden(self, tokens: torch.Tensor, actions: torch.Tensor, cache: CacheView | None) -> torch.Tensor:
        x = self.transformer(self._embed(tokens, actions), cache=cache)
        return x[:, :, 1:] if self.config.action_as_token else x  # [B, T, S, D]

    def _embed(self, tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """tokens [B, T, S], actions [B, T] -> the transformer's input [B, T, frame_length, D]."""
        x = self.token_embed(tokens)
        action = self.action_embed(actions)[:, :, None, :]  # [B, T, 1, D]
        x = torch.cat([action, x], dim=2) if self.config.action_as_token else x + action
        return x + self.position

    def _pointer_mixture(self, mix: torch.Tensor, logits: torch.Tensor, previous: torch.Tensor,
                         neighbours: torch.Tensor) -> torch.Tensor:
        """log p(token) = log(generate * softmax(logits) + sum over offsets of pointer(offset) * [token there]),
        mix [..., O + 1]: the log-probabilities of each offset, the last: generate."""
        known = (previous != self.config.mask_id)[..., None]
        generate, pointer = self._pointer_weights(mix, neighbours)
        pointed = torch.zeros_like(logits, dtype=torch.float32).scatter_add(
            -1, neighbours.clamp_max(self.config.num_codes - 1), pointer)
        generated = logits.float().log_softmax(dim=-1)
        mixed = torch.logaddexp(generate.log() + generated, pointed.clamp_min(1e-30).log())
        return torch.where(known, mixed, generated)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        if self.head is not None:
            return self.head(x)
        return x @ self.token_embed.weight[:self.config.num_codes].T + self.head_bias

    def loss(self, tokens: torch.Tensor, actions: torch.Tensor) -> DynamicsLoss:
        """tokens [B, T, S] of a clip, actions [B, T-1] per transition -> loss on the masked tokens."""
        batch, frames, _ = tokens.shape
        rate = torch.empty(batch, 1, 1, device=tokens.device).uniform_(self.config.mask_rate_min, 1.0)
        # Frames before a random first target stay fully visible, as the context is at play time; the
        # target and later frames are masked at rate U(mask_rate_min, 1). Frame 1 is never a target.
        first_target = torch.randint(1, frames, (batch, 1, 1), device=tokens.device)
        frame_index = torch.arange(frames, device=tokens.device)[None, :, None]
        masked = (torch.rand(tokens.shape, device=tokens.device) < rate) & (frame_index >= first_target)
        inputs = torch.where(masked, self.config.mask_id, tokens)
        no_action = torch.full((batch, 1), self.config.no_action_id, device=tokens.device, dtype=actions.dtype)
        # As at play time, a frame's predecessor is known when the frame is predicted (clean, not masked).
        previous = self._predecessors(tokens)
        neighbours = self._neighbours(self._previous_sources(previous))
        actions = torch.cat([no_action, actions], dim=1)
        hidden = self._hidden(inputs, actions, None)
        bias = self._pointer_bias(actions)
        logits = self._output(hidden[masked], previous[masked], None if neighbours is None else neighbours[masked],
                              None if bias is None else bias.expand(*masked.shape, -1)[masked])
        loss = F.cross_entropy(logits.float(), tokens[masked])
        accuracy = (logits.argmax(-1) == tokens[masked]).float().mean()
        return DynamicsLoss(loss, accuracy)


def expected_code_scores(logits: torch.Tensor, code_vectors: torch.Tensor) -> torch.Tensor:
    """logits [..., V] -> scores [..., V]: each code's cosine similarity to the probability-weighted mean
    code vector (code_vectors [V, D]), scaled by EXPECTED_CODE_SHARPNESS."""
    return code_similarity_scores(logits.float().softmax(dim=-1) @ code_vectors, code_vectors)


def code_similarity_scores(expected: torch.Tensor, code_vectors: torch.Tensor) -> torch.Tensor:
    """expected code vectors [..., D] -> each code's cosine similarity to them [..., V], scaled by
    EXPECTED_CODE_SHARPNESS."""
    return EXPECTED_CODE_SHARPNESS * F.normalize(expected, dim=-1) @ F.normalize(code_vectors, dim=-1).T


def _window_offsets(rows: int, columns: int) -> list[tuple[int, int]]:
    return [(dr, dc) for dr in range(-rows, rows + 1) for dc in range(-columns, columns + 1)]


@dataclass
class _PointerGrid:
    """A grid*grid frame padded by (rows, columns) on every side, the P cells the pointer can read."""

    cells: torch.Tensor  # [P, 2] each padded cell's (row, column) in the frame's coordinates
    inside: torch.Tensor  # [P] whether it lies inside the frame
    edge_index: torch.Tensor  # [P] the frame position it repeats without memory: clamped to the edge
    neighbour_index: torch.Tensor  # [S, O] the padded cell each offset of each position reads

    @classmethod
    def build(cls, grid: int, reach: tuple[int, int], offsets: list[tuple[int, int]]) -> "_PointerGrid":
        rows, columns = reach
        padded_rows = torch.arange(-rows, grid + rows)
        padded_columns = torch.arange(-columns, grid + columns)
        cells = torch.cartesian_prod(padded_rows, padded_columns)
        inside = ((cells >= 0) & (cells < grid)).all(-1)
        edge = cells.clamp(0, grid - 1)
        width = grid + 2 * columns
        position = torch.cartesian_prod(torch.arange(grid), torch.arange(grid))  # [S, 2]
        shifted = position[:, None, :] + torch.tensor(offsets)[None]  # [S, O, 2]
        neighbour_index = (shifted[..., 0] + rows) * width + shifted[..., 1] + columns
        return cls(cells, inside, edge[:, 0] * grid + edge[:, 1], neighbour_index)


def sample_tokens(logits: torch.Tensor, temperature: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per position by inverse CDF with caller-supplied noise, so each world's draws
    depend only on its own seed. logits [B, S, V], temperature [B] (0 = greedy), uniforms [B, S].
    Returns (ids [B, S], probability of each drawn id [B, S])."""
    greedy = temperature <= 0
    scaled = logits.float() / torch.where(greedy, 1.0, temperature)[:, None, None]
    probs = scaled.softmax(dim=-1)
    ids = probs.argmax(dim=-1)
    if not bool(greedy.all()):  # the inverse-CDF draw is only needed where some world samples
        cdf = probs.cumsum(dim=-1)
        drawn = torch.searchsorted(cdf, (uniforms * cdf[..., -1])[..., None].contiguous()).squeeze(-1)
        ids = torch.where(greedy[:, None], ids, drawn.clamp_max(logits.shape[-1] - 1))
    return ids, probs.gather(-1, ids[..., None]).squeeze(-1)


def maskgit_sample(predict: Callable[[torch.Tensor], torch.Tensor], mask_id: int, num_steps: int,
                   temperature: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Fill one fully masked frame per world by iterative confident-first decoding.

    predict maps the new frame's tokens [B, S] to logits [B, S, V]; uniforms [B, num_steps, S] is the
    per-world noise. After pass i the cosine schedule leaves floor(S * cos(pi/2 * (i+1)/n)) positions
    masked: the least confident of that pass's draws.
    """
    batch, _, tokens_per_frame = uniforms.shape
    tokens = torch.full((batch, tokens_per_frame), mask_id, dtype=torch.long, device=uniforms.device)
    masked = torch.ones_like(tokens, dtype=torch.bool)
    for step in range(num_steps):
        ids, probability = sample_tokens(predict(tokens), temperature, uniforms[:, step])
        confidence = torch.where(masked, probability, math.inf)
        still_masked = math.floor(tokens_per_frame * maskgit_mask_schedule(step + 1, num_steps))
        least_confident = confidence.argsort(dim=-1)[:, :still_masked]
        next_masked = torch.zeros_like(masked).scatter_(1, least_confident, True)
        tokens = torch.where(masked & ~next_masked, ids, tokens)
        masked = next_masked
    return tokens
