"""Genie in pure PyTorch: video tokenizer, latent action model, MaskGIT dynamics, and playable worlds.

The names below load on first use (PEP 562), so importing a torch-free module of the package (e.g.
`genie_models.prompts`, `genie_models.cli`) does not load torch.
"""

from importlib import import_module

_HOMES = {
    "DYNAMICS_PRESETS": "dynamics", "DynamicsConfig": "dynamics", "DynamicsModel": "dynamics",
    "LAM_PRESETS": "lam", "LAMConfig": "lam", "LatentActionModel": "lam",
    "TOKENIZER_PRESETS": "tokenizer", "TokenizerConfig": "tokenizer", "VideoTokenizer": "tokenizer",
    "World": "world", "WorldPool": "world", "prepare_prompt": "prompts", "WorldModel": "world_model",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'genie_models' has no attribute {name!r}")
    value = getattr(import_module(f"genie_models.{_HOMES[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
