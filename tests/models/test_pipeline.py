"""The training recipe end to end on real CoinRun episodes with toy-sized models: both stages, resume,
evaluation, and the demo's pictures (every code path `make demo` takes, in seconds)."""

from dataclasses import replace

import json
import numpy as np
import pytest
import torch

from genie_models.checkpoints import latest_checkpoint
from genie_models.data import generate_coinrun, iterate_heldout
from genie_models.dynamics import DynamicsConfig
from genie_models.evaluation import EvalConfig, evaluate_world, long_play, write_metrics
from genie_models.lam import LAMConfig
from genie_models.render import action_grid_frames, reconstruction_image, save_gif, save_mp4
from genie_models.tokenizer import TokenizerConfig
from genie_models.training.common import TrainConfig
from genie_models.training.dynamics import train_dynamics
from genie_models.training.tokenizer import load_tokenizer, train_tokenizer
from genie_models.world_model import WorldModel

pytestmark = pytest.mark.slow

TOKENIZER = TokenizerConfig(image_size=64, patch_size=8, d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1,
                            num_codes=32, code_dim=8, context_frames=4)
LAM = LAMConfig(image_size=64, patch_size=16, d_model=32, num_heads=2, encoder_layers=1, decoder_layers=1,
                num_actions=4, latent_dim=8, context_frames=4)
DYNAMICS = DynamicsConfig(d_model=32, num_heads=2, num_layers=1, context_frames=4, num_maskgit_steps=2)
TRAIN = TrainConfig(steps=6, batch_size=2, clip_length=4, learning_rate=1e-3, warmup_steps=2, checkpoint_every=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return generate_coinrun(tmp_path_factory.mktemp("coinrun"), num_episodes=12, steps_per_episode=20,
                            heldout_fraction=0.25, seed=0, progress=False)


def test_both_stages_train_resume_evaluate_and_render(dataset, tmp_path):
    tokenizer = train_tokenizer(dataset, TOKENIZER, replace(TRAIN, steps=4), tmp_path / "tokenizer", "cpu",
                                progress=False).tokenizer
    assert latest_checkpoint(tmp_path / "tokenizer").name == "step-00000004"
    resumed = train_tokenizer(dataset, TOKENIZER, TRAIN, tmp_path / "tokenizer", "cpu", progress=False)
    assert latest_checkpoint(tmp_path / "tokenizer").name == "step-00000006"
    reloaded = load_tokenizer(tmp_path / "tokenizer")
    frames = torch.from_numpy(np.array(dataset.frames(0)[:2]))[None]
    assert torch.equal(reloaded.encode(frames), resumed.tokenizer.encode(frames))

    run = train_dynamics(dataset, tokenizer, LAM, DYNAMICS, TRAIN, tmp_path / "world", "cpu", progress=False)
    assert np.isfinite(run.metrics["dynamics_loss"]) and run.metrics["dynamics_loss"] > 0
    world = WorldModel.load(tmp_path / "world")  # a run directory resolves to its latest checkpoint
    assert world.num_actions == 4 and world.dynamics.config.num_codes == TOKENIZER.num_codes

    metrics = evaluate_world(world, dataset, EvalConfig(num_clips=3, horizon=2, delta_t_horizons=(2,), batch_size=2))
    names = ["reconstruction_psnr", "reconstruction_ssim", "delta_t_psnr_t2", "delta_t_psnr_t2_stderr", "action_nmi",
             "token_change_rate_generated", "token_change_rate_real"]
    names += [f"{series}_t{t}" for t in (1, 2) for series in
              ("generation_psnr", "copy_prompt_psnr", "copy_tokenized_prompt_psnr", "generation_ssim")]
    for name in names:
        assert np.isfinite(metrics[name]), name
    assert metrics["num_clips"] == 3 and "delta_t_psnr_t4" not in metrics  # beyond the horizon
    table = write_metrics(metrics, tmp_path / "metrics.json")
    assert "delta_t_psnr_t2" in table and "copy tokenized" in table
    assert json.loads((tmp_path / "metrics.json").read_text()) == metrics

    prompts = next(iterate_heldout(dataset, 1, 2, batch_size=2)).frames[:, 0].numpy()
    grid = action_grid_frames(world, prompts, num_steps=3)
    assert len(grid) == 4 and grid[0].shape[0] == 4 * 64 * 2  # a row per action, frames doubled
    save_gif(grid, tmp_path / "grid.gif")
    save_mp4(grid, tmp_path / "grid.mp4")
    assert (tmp_path / "grid.gif").stat().st_size > 0 and (tmp_path / "grid.mp4").stat().st_size > 0
    picture = reconstruction_image(world, prompts)
    assert picture.size == (2 * 64 * 2, 2 * 64 * 2)
    played, long_metrics = long_play(world, prompts, num_steps=8)
    assert played.frames.shape == (2, 8, 64, 64, 3)
    for name in ("token_change_rate_first_quarter", "vertical_repeat_prompt", "vertical_repeat_last_quarter"):
        assert 0 <= long_metrics[f"long_play_{name}"] <= 1, name  # shares
    assert np.isfinite(long_metrics["long_play_sharpness_ratio_last_quarter"])


def test_a_lam_first_recipe_trains_the_lam_alone_then_keeps_it_frozen(dataset, tmp_path):
    from genie_models.checkpoints import load_checkpoint
    from genie_models.tokenizer import VideoTokenizer
    tokenizer = VideoTokenizer(replace(TOKENIZER, context_frames=1))
    lam_first = replace(TRAIN, steps=4, checkpoint_every=4)
    run = train_dynamics(dataset, tokenizer, LAM, DYNAMICS, TRAIN, tmp_path / "world", "cpu", progress=False,
                         lam_first=lam_first)
    assert set(run.metrics) >= {"dynamics_loss", "token_accuracy"} and "lam_loss" not in run.metrics
    lam_checkpoint = load_checkpoint(latest_checkpoint(tmp_path / "world" / "lam"))
    assert lam_checkpoint.manifest.step == 4 and lam_checkpoint.manifest.kind == "genie-lam"
    for name, tensor in lam_checkpoint.tensors("lam").items():  # dynamics training left the LAM as it was
        torch.testing.assert_close(run.world.lam.state_dict()[name], tensor)
    world = WorldModel.load(tmp_path / "world")
    assert world.dynamics.config.action_as_token and world.dynamics.config.copy_previous_token
