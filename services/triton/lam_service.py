"""The latent-action service's Triton model: label every transition of a clip with a latent action.

Stateless: used when a world starts from several prompt frames, to name the actions leading into them.
"""

from __future__ import annotations

import numpy as np
import torch
from pytriton.exceptions import PyTritonBadParameterError
from pytriton.model_config import Tensor
from pytriton.proxy.types import Request

from genie_models.lam import LatentActionModel
from services.triton import protocol
from services.triton.batching import UNBATCHED, Binding


class LatentActionService:
    def __init__(self, lam: LatentActionModel, device: torch.device | str):
        self.lam, self.device = lam, torch.device(device)

    def label(self, requests: list[Request]) -> list[dict[str, np.ndarray]]:
        results = []
        for request in requests:
            frames = request["frames"]  # uint8 [T, H, W, 3]
            if len(frames) < 2:
                raise PyTritonBadParameterError("labelling actions needs at least 2 frames")
            actions = self.lam.infer_actions(torch.from_numpy(frames).to(self.device)[None])[0]
            results.append({"actions": actions.cpu().numpy().astype(np.int64)})
        return results

    def bindings(self) -> list[Binding]:
        size = self.lam.config.image_size
        frames = Tensor(name="frames", dtype=np.uint8, shape=(-1, size, size, 3))
        actions = Tensor(name="actions", dtype=np.int64, shape=(-1,))
        return [Binding(protocol.LAM_LABEL, self.label, [frames], [actions], UNBATCHED)]
