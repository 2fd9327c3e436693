"""The dynamics service's Triton models: start a world from its token history, step many worlds, end one.

World caches (a temporal KV cache slot per world, LRU-bounded) live in this process, keyed by world id;
`dynamics_step` is dynamically batched so concurrent sessions' steps share one MaskGIT pass.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import torch
from pytriton.exceptions import PyTritonBadParameterError
from pytriton.model_config import ModelConfig, Tensor
from pytriton.proxy.types import Request

from genie_models.dynamics import DynamicsModel
from genie_models.stepping import DynamicsEngine, StepRequest
from services.triton import protocol
from services.triton.batching import (FIRST_POSITION, UNBATCHED, Binding, StepLedger, end_sessions, gather_rows,
                                     repeated_rows, split_rows, world_ids)
from services.triton.protocol import Status

STEP_INPUTS = ("world_id", "action", "seed", "step_index", "num_maskgit_steps", "temperature")
GUIDANCE = "action_guidance"  # optional input (float64 per row); a request without it plays the model's own
MAX_MASKGIT_STEPS = 256  # far above any useful count; bounds the work one request can ask for


class DynamicsService:
    def __init__(self, model: DynamicsModel, max_worlds: int, device: torch.device | str):
        self.config = model.config
        self.engine = DynamicsEngine(model, max_worlds, device, evict_when_full=True)
        self.ledger = StepLedger(max_worlds)
        # start/step/end run on separate PyTriton threads but share the engine's cache slots.
        self.lock = threading.Lock()

    def start(self, requests: list[Request]) -> list[dict[str, np.ndarray]]:
        results = []
        for request in requests:
            [world_id] = world_ids(request["world_id"])
            tokens, actions = request["tokens"].astype(np.int64), request["actions"].astype(np.int64)
            self._check_history(tokens, actions)
            with self.lock:
                self.engine.start(world_id, torch.from_numpy(tokens), torch.from_numpy(actions),
                                  int(request["first_position"][0]))
                self.ledger.started(world_id, self.engine.sessions.__contains__)
            results.append({"status": np.array([Status.OK], dtype=np.int8)})
        return results

    def _check_history(self, tokens: np.ndarray, actions: np.ndarray) -> None:
        if len(tokens) == 0 or len(tokens) != len(actions):
            raise PyTritonBadParameterError(f"a history needs >= 1 frame and one action per frame; "
                                            f"got {len(tokens)} frames and {len(actions)} actions")
        if not (tokens.min() >= 0 and tokens.max() < self.config.num_codes):
            raise PyTritonBadParameterError(f"token ids must lie in 0..{self.config.num_codes - 1}")
        if not (actions.min() >= 0 and actions.max() <= self.config.no_action_id):
            raise PyTritonBadParameterError(f"actions must lie in 0..{self.config.num_actions} "
                                            f"({self.config.num_actions} = no action)")

    def _valid_step(self, action: int, num_steps: int, temperature: float, guidance: float | None) -> bool:
        return (0 <= action < self.config.num_actions and 1 <= num_steps <= MAX_MASKGIT_STEPS
                and math.isfinite(temperature) and temperature >= 0
                and (guidance is None or math.isfinite(guidance) and guidance >= 0))

    @staticmethod
    def _guidance(requests: list[Request]) -> list[float | None]:
        """Each row's action guidance, None for the rows of requests that did not send one."""
        return [value for request in requests for value in (
            request[GUIDANCE].reshape(-1).tolist() if GUIDANCE in request else [None] * len(request["world_id"]))]

    def step(self, requests: list[Request]) -> list[dict[str, np.ndarray]]:
        """A dynamic batch of world steps -> next-frame tokens [S] and a status per row."""
        inputs, counts = gather_rows(requests, STEP_INPUTS)
        ids = world_ids(inputs["world_id"])
        columns = {name: inputs[name].reshape(-1).tolist() for name in STEP_INPUTS[1:]}
        guidance = self._guidance(requests)
        status = np.full((len(ids), 1), Status.OK, dtype=np.int8)
        tokens = np.zeros((len(ids), self.config.tokens_per_frame), dtype=np.int64)
        repeated = repeated_rows(ids)
        steps = {}
        with self.lock:
            for row, world_id in enumerate(ids):
                action, seed, step_index, num_steps, temperature = (columns[name][row] for name in STEP_INPUTS[1:])
                if row in repeated or not self._valid_step(action, num_steps, temperature, guidance[row]):
                    status[row] = Status.INVALID
                elif world_id not in self.engine.sessions or not self.ledger.fits(world_id, step_index):
                    status[row] = Status.NOT_CACHED
                else:
                    steps[row] = StepRequest(world_id, action, seed, step_index, num_steps, temperature,
                                             guidance[row])
            if steps:
                try:
                    tokens[list(steps)] = self.engine.step(list(steps.values())).cpu().numpy()
                except BaseException:  # a cache may be half-committed: the retry must rebuild, not play on
                    for request in steps.values():
                        self._end(request.session)
                    raise
                for request in steps.values():
                    self.ledger.applied(request.session, request.step_index)
        return split_rows({"tokens": tokens, "status": status}, counts)

    def end(self, requests: list[Request]) -> list[dict[str, np.ndarray]]:
        return end_sessions(requests, self.lock, self._end)

    def _end(self, world_id: str) -> None:
        self.engine.end(world_id)
        self.ledger.ended(world_id)

    def bindings(self, batcher: ModelConfig) -> list[Binding]:
        world_id = Tensor(name="world_id", dtype=bytes, shape=(1,))
        status = Tensor(name="status", dtype=np.int8, shape=(1,))
        start_inputs = [world_id, Tensor(name="tokens", dtype=np.int64, shape=(-1, self.config.tokens_per_frame)),
                        Tensor(name="actions", dtype=np.int64, shape=(-1,)), FIRST_POSITION]
        step_inputs = [world_id, Tensor(name="action", dtype=np.int64, shape=(1,)),
                       Tensor(name="seed", dtype=np.int64, shape=(1,)),
                       Tensor(name="step_index", dtype=np.int64, shape=(1,)),
                       Tensor(name="num_maskgit_steps", dtype=np.int32, shape=(1,)),
                       Tensor(name="temperature", dtype=np.float32, shape=(1,)),
                       Tensor(name=GUIDANCE, dtype=np.float64, shape=(1,), optional=True)]
        step_outputs = [Tensor(name="tokens", dtype=np.int64, shape=(self.config.tokens_per_frame,)), status]
        return [
            Binding(protocol.DYNAMICS_START, self.start, start_inputs, [status], UNBATCHED),
            Binding(protocol.DYNAMICS_STEP, self.step, step_inputs, step_outputs, batcher),
            Binding(protocol.DYNAMICS_END, self.end, [world_id], [status], UNBATCHED),
        ]
