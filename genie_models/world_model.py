"""A trained world: the tokenizer, latent action model and dynamics model, saved and loaded together.

Checkpoints are safetensors groups ("tokenizer", "lam", "dynamics") plus a manifest holding each
model's config, so a world directory is self-describing and never unpickled.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from genie_models.checkpoints import CheckpointError, latest_checkpoint, load_checkpoint, save_checkpoint
from genie_models.dynamics import DYNAMICS_PRESETS, DynamicsConfig, DynamicsModel
from genie_models.lam import LAM_PRESETS, LAMConfig, LatentActionModel
from genie_models.tokenizer import TOKENIZER_PRESETS, TokenizerConfig, VideoTokenizer

WORLD_KIND = "genie-world"


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint directory itself, or the latest checkpoint of a training run directory."""
    path = Path(path)
    if (path / "manifest.json").exists():
        return path
    latest = latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(f"{path} is neither a checkpoint (no manifest.json) nor a run directory with one")
    return latest


# Fields added after checkpoints were first written: a checkpoint without them was trained with the
# behaviour these values select, which is not always today's default.
_LEGACY_DEFAULTS: dict[type, dict[str, Any]] = {LAMConfig: {"predict_residual": False}, DynamicsConfig: {"action_as_token": False, "tie_embeddings": False,
                                                     "copy_previous_token": False}}


def config_from_dict(config_type: type, values: dict[str, Any]):
    """Rebuild a config dataclass, refusing unknown keys so a mismatched checkpoint fails loudly."""
    known = {f.name for f in fields(config_type)}
    unknown = set(values) - known
    if unknown:
        raise CheckpointError(f"unknown {config_type.__name__} fields in checkpoint: {sorted(unknown)}")
    # JSON stores tuples as lists; frozen configs must stay hashable and compare equal to the presets.
    values = {key: tuple(value) if isinstance(value, list) else value for key, value in values.items()}
    return config_type(**(_LEGACY_DEFAULTS.get(config_type, {}) | values))


def dynamics_config_for(tokenizer: TokenizerConfig, lam: LAMConfig, base: DynamicsConfig) -> DynamicsConfig:
    """The dynamics model's vocabulary, frame size and action count follow the other two models."""
    values = asdict(base) | {"num_codes": tokenizer.num_codes, "code_dim": tokenizer.code_dim,
                             "tokens_per_frame": tokenizer.tokens_per_frame, "num_actions": lam.num_actions}
    return DynamicsConfig(**values)


@dataclass
class WorldModel:
    tokenizer: VideoTokenizer
    lam: LatentActionModel
    dynamics: DynamicsModel

    @classmethod
    def from_preset(cls, name: str, context_frames: int | None = None) -> "WorldModel":
        """Untrained models of a preset; context_frames, if given, replaces every model's temporal window."""
        configs = TOKENIZER_PRESETS[name], LAM_PRESETS[name], DYNAMICS_PRESETS[name]
        if context_frames is not None:
            # Per-frame models (a window of one frame) stay per-frame.
            configs = tuple(replace(config, context_frames=context_frames) if config.context_frames > 1 else config
                            for config in configs)
        tokenizer_config, lam_config, base = configs
        dynamics_config = dynamics_config_for(tokenizer_config, lam_config, base)
        return cls(VideoTokenizer(tokenizer_config), LatentActionModel(lam_config), DynamicsModel(dynamics_config))

    @property
    def image_size(self) -> int:
        return self.tokenizer.config.image_size

    @property
    def num_actions(self) -> int:
        return self.dynamics.config.num_actions

    def history_frames(self) -> int:
        """Frames of token history that fix a world's cached state (dynamics and decoder caches, the pointer's
        memory): rebuilding them from this many frames restores them exactly."""
        return max(self.dynamics.config.transformer_config().receptive_frames,
                   self.tokenizer.config.decoder_config().receptive_frames, self.dynamics.config.pointer_memory)

    def modules(self) -> dict[str, nn.Module]:
        return {"tokenizer": self.tokenizer, "lam": self.lam, "dynamics": self.dynamics}

    def configs(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(module.config) for name, module in self.modules().items()}

    def to(self, device: torch.device | str) -> "WorldModel":
        for module in self.modules().values():
            module.to(device)
        return self

    def eval(self) -> "WorldModel":
        for module in self.modules().values():
            module.eval()
        return self

    def save(self, directory: Path, step: int, metrics: dict[str, float] | None = None) -> None:
        tensors = {name: {key: value.detach().contiguous() for key, value in module.state_dict().items()}
                   for name, module in self.modules().items()}
        save_checkpoint(directory, tensors, self.configs(), step, metrics=metrics, kind=WORLD_KIND)

    @classmethod
    def load(cls, directory: Path, device: torch.device | str = "cpu") -> "WorldModel":
        checkpoint = load_checkpoint(resolve_checkpoint(directory), map_location=device)
        if checkpoint.manifest.kind != WORLD_KIND:
            raise CheckpointError(f"{directory} holds a {checkpoint.manifest.kind!r} checkpoint, "
                                  f"not a trained world ({WORLD_KIND!r})")
        config = checkpoint.manifest.config
        model = cls(VideoTokenizer(config_from_dict(TokenizerConfig, config["tokenizer"])),
                    LatentActionModel(config_from_dict(LAMConfig, config["lam"])),
                    DynamicsModel(config_from_dict(DynamicsConfig, config["dynamics"])))
        for name, module in model.modules().items():
            module.load_state_dict(checkpoint.tensors(name))
        return model.to(device).eval()
