"""The worker's stage process hears training progress through the training functions' `make_progress` hook
(no monkeypatching): each step reaches its JSON file, and only the reporting rank writes it."""

import json
from functools import partial

import numpy as np
import pytest

from genie_models.data.shards import EpisodeDataset, EpisodeWriter
from genie_models.tokenizer import TokenizerConfig
from genie_models.training.common import TrainConfig
from genie_models.training.tokenizer import train_tokenizer
from services.worker.stage_process import FileProgress

pytestmark = pytest.mark.slow


def test_training_reports_every_step_through_the_file_progress_factory(tmp_path):
    with EpisodeWriter(tmp_path / "data", source="test", frame_size=16) as writer:
        writer.add_episode(np.random.default_rng(0).integers(0, 256, (6, 16, 16, 3), dtype=np.uint8),
                           np.zeros(5, dtype=np.int16), "train")
    config = TokenizerConfig(image_size=16, patch_size=4, d_model=16, num_heads=2, encoder_layers=1, decoder_layers=1,
                             num_codes=16, code_dim=4, context_frames=1)
    progress = tmp_path / "tokenizer.progress.json"
    written = []

    class Recording(FileProgress):
        def _write(self, state):
            written.append(state["step"])
            super()._write(state)

    train_tokenizer(EpisodeDataset.open(tmp_path / "data"), config,
                    TrainConfig(steps=3, batch_size=2, clip_length=1, learning_rate=1e-3, warmup_steps=1),
                    tmp_path / "run", "cpu", make_progress=partial(Recording, progress))
    state = json.loads(progress.read_text())
    assert state["step"] == state["total_steps"] == 3 and state["resumed_from_step"] == 0
    assert {"loss", "psnr", "codes_used"} <= state["metrics"].keys() and state["frames_per_second"] > 0
    assert written[0] == 0 and written[-1] == 3

    silent = tmp_path / "other-rank.json"
    FileProgress(silent, "tokenizer", 0, 3, 2, enabled=False).update({"loss": 1.0})
    assert not silent.exists()
