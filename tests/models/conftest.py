"""Tiny model configs shared by the model tests: small enough to train in seconds on 2 CPU cores."""

import pytest
import torch

from genie_models.dynamics import DynamicsConfig
from genie_models.lam import LAMConfig
from genie_models.tokenizer import TokenizerConfig


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


@pytest.fixture
def tokenizer_config() -> TokenizerConfig:
    return TokenizerConfig(image_size=16, patch_size=4, d_model=64, num_heads=2, encoder_layers=1,
                           decoder_layers=1, num_codes=64, code_dim=16, context_frames=4)


@pytest.fixture
def lam_config() -> LAMConfig:
    return LAMConfig(image_size=16, patch_size=8, d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1,
                     num_actions=4, latent_dim=8, context_frames=4)


@pytest.fixture
def dynamics_config() -> DynamicsConfig:
    return DynamicsConfig(num_codes=64, tokens_per_frame=16, num_actions=4, d_model=32, num_heads=2,
                          num_layers=2, context_frames=4, num_maskgit_steps=4)
