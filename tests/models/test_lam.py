"""The latent action model: one action per transition, and actions that carry what changed."""

import torch

from genie_models.lam import LatentActionModel


def _moving_square(direction: int, frames: int = 3, size: int = 16) -> torch.Tensor:
    clip = torch.zeros(frames, size, size, 3, dtype=torch.uint8)
    for t in range(frames):
        x = 6 + direction * 2 * t
        clip[t, 6:10, x:x + 4] = 255
    return clip


def test_infer_actions_labels_every_transition(lam_config):
    lam = LatentActionModel(lam_config).eval()
    actions = lam.infer_actions(torch.randint(0, 256, (2, 4, 16, 16, 3), dtype=torch.uint8))
    assert actions.shape == (2, 3)
    assert int(actions.max()) < lam_config.num_actions


def test_lam_learns_distinct_actions_for_distinct_motions(lam_config):
    lam = LatentActionModel(lam_config)
    clips = torch.stack([_moving_square(-1), _moving_square(1)])  # left, right
    optimizer = torch.optim.AdamW(lam.parameters(), lr=2e-3)
    for _ in range(300):
        loss = lam(clips).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    actions = lam.eval().infer_actions(clips)
    # Both clips start from the same frame: only the action can tell the decoder which way it moved.
    assert actions[0, 0] != actions[1, 0]
    # Copying the previous frame scores 0.0625 here; only a model using the action gets far below.
    assert lam(clips).loss.item() < 0.03


def test_an_untrained_lam_predicts_that_nothing_changes(lam_config):
    lam = LatentActionModel(lam_config).eval()
    clip = torch.randint(0, 256, (1, 3, 16, 16, 3), dtype=torch.uint8)
    prediction = lam(clip).prediction  # frames 2..3, predicted from frames 1..2 and the actions
    torch.testing.assert_close(prediction, clip[:, :-1].float() / 255)
