"""Tests for safetensors + manifest checkpoints: round trips, integrity checks and atomic publishing.
Every corruption must be refused with an error that names the damaged file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from genie_models.checkpoints import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    CheckpointError,
    Manifest,
    latest_checkpoint,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state_to_tensors,
    prune_checkpoints,
    save_checkpoint,
    save_run_checkpoint,
)


def _sample_tensors() -> dict[str, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return {
        "tokenizer": {
            "encoder.weight": torch.randn(4, 8, generator=generator),
            "codebook": torch.randn(16, 4, generator=generator).to(torch.bfloat16),
            "half": torch.randn(3, generator=generator).to(torch.float16),
        },
        "extras": {
            "token_ids": torch.arange(10, dtype=torch.int64).reshape(2, 5),
            "mask": torch.tensor([True, False, True]),
            "scalar": torch.tensor(3.5),
        },
    }


def _save_sample(directory: Path, step: int = 7) -> None:
    save_checkpoint(directory, _sample_tensors(), {"dim": 8, "name": "tiny"}, step, metrics={"loss": 0.25})


def test_round_trip_preserves_tensors_dtypes_config_and_metrics(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    save_checkpoint(directory, _sample_tensors(), {"dim": 8, "nested": {"a": [1, 2]}}, 42,
                    metrics={"loss": 0.5, "psnr": 31.0}, kind="tokenizer")
    loaded = load_checkpoint(directory)
    assert loaded.manifest.step == 42
    assert loaded.manifest.kind == "tokenizer"
    assert loaded.manifest.config == {"dim": 8, "nested": {"a": [1, 2]}}
    assert loaded.manifest.metrics == {"loss": 0.5, "psnr": 31.0}
    assert loaded.manifest.format_version == FORMAT_VERSION
    assert loaded.groups == ["extras", "tokenizer"]
    for group, expected in _sample_tensors().items():
        actual = loaded.tensors(group)
        assert actual.keys() == expected.keys()
        for key, tensor in expected.items():
            assert actual[key].dtype == tensor.dtype
            assert torch.equal(actual[key], tensor)


def test_manifest_lists_size_and_sha256_of_every_file(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    _save_sample(directory)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    assert set(manifest["files"]) == {"tokenizer.safetensors", "extras.safetensors"}
    for name, entry in manifest["files"].items():
        assert entry["size_bytes"] == (directory / name).stat().st_size
        assert len(entry["sha256"]) == 64
    assert manifest["created_at"]


def test_manifest_json_round_trip() -> None:
    manifest = Manifest(kind="lam", config={"a": 1}, step=3, metrics={"loss": 1.5}, extra={"k": [1]})
    assert Manifest.from_json(manifest.to_json()) == manifest


def test_unknown_tensor_group_is_refused_with_available_groups(tmp_path: Path) -> None:
    _save_sample(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="no tensor group 'dynamics'.*tokenizer"):
        load_checkpoint(tmp_path / "ckpt").tensors("dynamics")


def test_adamw_state_round_trip_gives_identical_next_step(tmp_path: Path) -> None:
    def make() -> tuple[torch.nn.Module, torch.optim.AdamW]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)

    def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, seed: int) -> None:
        inputs = torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))
        optimizer.zero_grad()
        model(inputs).square().mean().backward()
        optimizer.step()

    model, optimizer = make()
    for seed in range(3):
        train_step(model, optimizer, seed)
    optimizer_tensors, optimizer_meta = optimizer_state_to_tensors(optimizer)
    save_checkpoint(tmp_path / "ckpt", {"model": model.state_dict(), "optimizer": optimizer_tensors},
                    {}, 3, extra={"optimizer": optimizer_meta})

    restored_model, restored_optimizer = make()
    loaded = load_checkpoint(tmp_path / "ckpt")
    restored_model.load_state_dict(loaded.tensors("model"))
    load_optimizer_state(restored_optimizer, loaded.tensors("optimizer"), loaded.manifest.extra["optimizer"])
    assert restored_optimizer.param_groups[0]["betas"] == (0.8, 0.95)

    train_step(model, optimizer, seed=99)
    train_step(restored_model, restored_optimizer, seed=99)
    for original, restored in zip(model.parameters(), restored_model.parameters(), strict=True):
        assert torch.equal(original, restored)


def test_flipped_byte_is_refused_as_checksum_mismatch_naming_the_file(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    _save_sample(directory)
    path = directory / "tokenizer.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tokenizer\.safetensors has a checksum mismatch"):
        load_checkpoint(directory)


def test_truncated_file_is_refused_as_size_mismatch_naming_the_file(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    _save_sample(directory)
    path = directory / "extras.safetensors"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CheckpointError, match=r"extras\.safetensors has a size mismatch"):
        load_checkpoint(directory)


def test_deleted_file_is_refused_as_missing(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    _save_sample(directory)
    (directory / "extras.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"extras\.safetensors is missing"):
        load_checkpoint(directory)


def test_verify_false_skips_hashing(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    _save_sample(directory)
    path = directory / "tokenizer.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    assert load_checkpoint(directory, verify=False).manifest.step == 7


@pytest.mark.parametrize(
    ("manifest_text", "message"),
    [
        ("{not json", "unreadable"),
        ("[]", "unreadable"),
        (json.dumps({"format_version": 99}), "unsupported format version 99"),
        (json.dumps({"format_version": FORMAT_VERSION, "kind": "x"}), "unreadable"),
    ],
)
def test_bad_manifest_is_refused(tmp_path: Path, manifest_text: str, message: str) -> None:
    directory = tmp_path / "ckpt"
    _save_sample(directory)
    (directory / MANIFEST_NAME).write_text(manifest_text)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(directory)


def test_manifest_listing_a_path_outside_the_checkpoint_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    _save_sample(directory)
    manifest = json.loads((directory / MANIFEST_NAME).read_text())
    manifest["files"]["../outside.safetensors"] = {"sha256": "0" * 64, "size_bytes": 1}
    (directory / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="invalid file name"):
        load_checkpoint(directory)


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    _save_sample(directory)
    (directory / MANIFEST_NAME).unlink()
    with pytest.raises(CheckpointError, match="manifest.json is missing"):
        load_checkpoint(directory)


def test_saving_over_an_existing_checkpoint_replaces_it_completely(tmp_path: Path) -> None:
    directory = tmp_path / "ckpt"
    _save_sample(directory)
    save_checkpoint(directory, {"only": {"x": torch.ones(2)}}, {}, 8)
    loaded = load_checkpoint(directory)
    assert loaded.manifest.step == 8
    assert sorted(path.name for path in directory.iterdir()) == [MANIFEST_NAME, "only.safetensors"]
    assert [path.name for path in tmp_path.iterdir()] == ["ckpt"]


def test_latest_points_at_newest_checkpoint_and_prune_keeps_newest(tmp_path: Path) -> None:
    for step in (100, 200, 300, 400):
        save_run_checkpoint(tmp_path, {"model": {"w": torch.full((2,), float(step))}}, {}, step)
    latest = latest_checkpoint(tmp_path)
    assert latest == tmp_path / "step-00000400"
    assert (tmp_path / "latest").read_text().strip() == "step-00000400"
    assert torch.equal(load_checkpoint(latest).tensors("model")["w"], torch.full((2,), 400.0))

    removed = prune_checkpoints(tmp_path, keep=2)
    assert sorted(path.name for path in removed) == ["step-00000100", "step-00000200"]
    assert sorted(path.name for path in tmp_path.glob("step-*")) == ["step-00000300", "step-00000400"]


def test_prune_never_removes_the_checkpoint_latest_names(tmp_path: Path) -> None:
    for step in (1, 2, 3):
        save_run_checkpoint(tmp_path, {"model": {"w": torch.zeros(1)}}, {}, step)
    (tmp_path / "latest").write_text("step-00000001\n")
    prune_checkpoints(tmp_path, keep=1)
    assert sorted(path.name for path in tmp_path.glob("step-*")) == ["step-00000001", "step-00000003"]


def test_latest_without_pointer_falls_back_to_newest_complete_checkpoint(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    save_run_checkpoint(tmp_path, {"model": {"w": torch.zeros(1)}}, {}, 5)
    save_run_checkpoint(tmp_path, {"model": {"w": torch.zeros(1)}}, {}, 9)
    (tmp_path / "latest").unlink()
    (tmp_path / "step-00000020").mkdir()  # an incomplete directory, without a manifest
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000009"


def test_crash_mid_save_leaves_no_partial_checkpoint_and_latest_intact(tmp_path: Path) -> None:
    save_run_checkpoint(tmp_path, {"model": {"w": torch.zeros(3)}}, {}, 1)
    before = sorted(path.name for path in tmp_path.iterdir())
    # The first group serialises fine; the second fails part-way through the save.
    broken = {"model": {"w": torch.ones(3)}, "optimizer": {"bad": "not a tensor"}}
    with pytest.raises(TypeError, match="not a Tensor"):
        save_run_checkpoint(tmp_path, broken, {}, 2)  # type: ignore[dict-item]
    assert sorted(path.name for path in tmp_path.iterdir()) == before
    assert latest_checkpoint(tmp_path) == tmp_path / "step-00000001"
    assert torch.equal(load_checkpoint(tmp_path / "step-00000001").tensors("model")["w"], torch.zeros(3))


def test_crash_while_replacing_a_checkpoint_keeps_the_old_one(tmp_path: Path, monkeypatch) -> None:
    import genie_models.checkpoints as checkpoints

    directory = tmp_path / "ckpt"
    _save_sample(directory, step=1)
    real_save_file = checkpoints.save_file
    calls = []

    def failing_save_file(tensors, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real_save_file(tensors, path)

    monkeypatch.setattr(checkpoints, "save_file", failing_save_file)
    with pytest.raises(OSError, match="disk full"):
        _save_sample(directory, step=2)
    assert [path.name for path in tmp_path.iterdir()] == ["ckpt"]
    assert load_checkpoint(directory).manifest.step == 1
