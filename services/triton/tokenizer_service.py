"""The tokenizer service's Triton models: encode frames to tokens, and decode each world's newest frame.

Decoding is stateful (a temporal KV cache per world, LRU-bounded), so `tokenizer_start` (re)builds a
world's cache and the dynamically batched `tokenizer_decode` decodes many worlds' frames in one pass.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from pytriton.exceptions import PyTritonBadParameterError
from pytriton.model_config import ModelConfig, Tensor
from pytriton.proxy.types import Request

from genie_models.stepping import FrameDecoder
from genie_models.tokenizer import VideoTokenizer
from services.triton import protocol
from services.triton.batching import (FIRST_POSITION, UNBATCHED, Binding, StepLedger, end_sessions, gather_rows,
                                     repeated_rows, split_rows, world_ids)
from services.triton.protocol import Status


class TokenizerService:
    def __init__(self, tokenizer: VideoTokenizer, max_worlds: int, device: torch.device | str):
        self.tokenizer, self.device = tokenizer, torch.device(device)
        self.config = tokenizer.config
        self.decoder = FrameDecoder(tokenizer, max_worlds, device, evict_when_full=True)
        self.ledger = StepLedger(max_worlds)
        # start/decode/end run on separate PyTriton threads but share the decoder's cache slots.
        self.lock = threading.Lock()

    def _check_tokens(self, tokens: np.ndarray) -> None:
        if len(tokens) == 0:
            raise PyTritonBadParameterError("a world's history needs at least one frame of tokens")
        if not (0 <= tokens.min() and tokens.max() < self.config.num_codes):
            raise PyTritonBadParameterError(f"token ids must lie in 0..{self.config.num_codes - 1}")

    def encode(self, requests: list[Request]) -> list[dict[str, np.ndarray]]:
        results = []
        for request in requests:
            frames = torch.from_numpy(request["frames"]).to(self.device)  # uint8 [T, H, W, 3]
            tokens = self.tokenizer.encode(frames[None])[0]
            results.append({"tokens": tokens.cpu().numpy().astype(np.int64)})
        return results

    def start(self, requests: list[Request]) -> list[dict[str, np.ndarray]]:
        results = []
        for request in requests:
            [world_id] = world_ids(request["world_id"])
            self._check_tokens(request["tokens"])
            tokens = torch.from_numpy(request["tokens"].astype(np.int64))  # [T, h, w]
            with self.lock:
                frames = self.decoder.start(world_id, tokens, int(request["first_position"][0]))
                self.ledger.started(world_id, self.decoder.sessions.__contains__)
            results.append({"frames": frames.cpu().numpy()})
        return results

    def decode(self, requests: list[Request]) -> list[dict[str, np.ndarray]]:
        """A dynamic batch of worlds' next-frame tokens -> frames, with a status per row."""
        inputs, counts = gather_rows(requests, ["world_id", "tokens", "step_index"])
        ids, tokens = world_ids(inputs["world_id"]), inputs["tokens"].astype(np.int64)  # [N, h, w]
        step_indices = inputs["step_index"].reshape(-1).tolist()
        status = np.full((len(ids), 1), Status.OK, dtype=np.int8)
        frames = np.zeros((len(ids), self.config.image_size, self.config.image_size, 3), dtype=np.uint8)
        in_range = (tokens >= 0).all(axis=(1, 2)) & (tokens < self.config.num_codes).all(axis=(1, 2))
        repeated = repeated_rows(ids)
        with self.lock:
            for row, world_id in enumerate(ids):
                if not in_range[row] or row in repeated:
                    status[row] = Status.INVALID
                elif world_id not in self.decoder.sessions or not self.ledger.fits(world_id, step_indices[row]):
                    status[row] = Status.NOT_CACHED
            rows = np.flatnonzero(status[:, 0] == Status.OK)
            if len(rows):
                try:
                    decoded = self.decoder.decode([ids[row] for row in rows], torch.from_numpy(tokens[rows]))
                except BaseException:  # a cache may be half-committed: the retry must rebuild, not play on
                    for row in rows:
                        self._end(ids[row])
                    raise
                frames[rows] = decoded.cpu().numpy()
                for row in rows:
                    self.ledger.applied(ids[row], step_indices[row])
        return split_rows({"frames": frames, "status": status}, counts)

    def end(self, requests: list[Request]) -> list[dict[str, np.ndarray]]:
        return end_sessions(requests, self.lock, self._end)

    def _end(self, world_id: str) -> None:
        self.decoder.end(world_id)
        self.ledger.ended(world_id)

    def bindings(self, batcher: ModelConfig) -> list[Binding]:
        size, grid = self.config.image_size, self.config.grid_size
        world_id = Tensor(name="world_id", dtype=bytes, shape=(1,))
        status = Tensor(name="status", dtype=np.int8, shape=(1,))
        frames = Tensor(name="frames", dtype=np.uint8, shape=(-1, size, size, 3))
        clip_tokens = Tensor(name="tokens", dtype=np.int64, shape=(-1, grid, grid))
        return [
            Binding(protocol.TOKENIZER_ENCODE, self.encode, [frames], [clip_tokens], UNBATCHED),
            Binding(protocol.TOKENIZER_START, self.start, [world_id, clip_tokens, FIRST_POSITION], [frames], UNBATCHED),
            Binding(protocol.TOKENIZER_DECODE, self.decode,
                    [world_id, Tensor(name="tokens", dtype=np.int64, shape=(grid, grid)),
                     Tensor(name="step_index", dtype=np.int64, shape=(1,))],
                    [Tensor(name="frames", dtype=np.uint8, shape=(size, size, 3)), status], batcher),
            Binding(protocol.TOKENIZER_END, self.end, [world_id], [status], UNBATCHED),
        ]

