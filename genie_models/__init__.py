"""Genie in pure PyTorch: video tokenizer, latent action model, MaskGIT dynamics, and playable worlds."""

from genie_models.dynamics import DYNAMICS_PRESETS, DynamicsConfig, DynamicsModel
from genie_models.lam import LAM_PRESETS, LAMConfig, LatentActionModel
from genie_models.tokenizer import TOKENIZER_PRESETS, TokenizerConfig, VideoTokenizer
from genie_models.world import World, WorldPool, prepare_prompt
from genie_models.world_model import WorldModel

__all__ = [
    "DYNAMICS_PRESETS", "DynamicsConfig", "DynamicsModel", "LAM_PRESETS", "LAMConfig", "LatentActionModel",
    "TOKENIZER_PRESETS", "TokenizerConfig", "VideoTokenizer", "World", "WorldModel", "WorldPool",
    "prepare_prompt",
]
