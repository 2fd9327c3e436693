"""The store plugins (`local`, `s3` on a real SeaweedFS server), the versioned model catalog and run sync."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from genie_models.checkpoints import CheckpointError, save_checkpoint, save_run_checkpoint
from services.settings import StoreSettings
from services.stores import ObjectNotFound, StoreAccessDenied, StoreUnavailable, open_store
from services.stores.catalog import ModelCatalog, UnknownModel
from services.stores.runs import RunSync
from services.stores.transfer import get_checkpoint
from tests.services.jobs_servers import s3_server  # noqa: F401 - fixture

pytestmark = [pytest.mark.integration]


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return open_store(StoreSettings(kind="local", root=str(tmp_path / "store")))
    server = request.getfixturevalue("s3_server")
    bucket = "t-" + request.node.name.split("[")[0].replace("_", "-")[-40:].strip("-")
    return open_store(StoreSettings(**{key.removeprefix("GENIE_STORE_").lower(): value
                                       for key, value in server.env(bucket=bucket).items()}, retry_s=5))


def checkpoint(directory: Path, seed: int, step: int = 1) -> Path:
    generator = torch.Generator().manual_seed(seed)
    save_checkpoint(directory, {"model": {"weight": torch.randn(64, 64, generator=generator)}},
                    {"seed": seed}, step=step, kind="genie-world")
    return directory


def test_put_list_get_and_delete_round_trip(store, tmp_path):
    store.put_bytes("a/one.txt", b"1")
    store.put_file("a/b/two.bin", _write(tmp_path / "two.bin", b"\x00\x01"))
    assert store.list("a/") == ["a/b/two.bin", "a/one.txt"]
    store.get_file("a/b/two.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == b"\x00\x01"
    store.delete("a/one.txt")
    assert not store.exists("a/one.txt") and store.exists("a/b/two.bin")
    with pytest.raises(ObjectNotFound, match="a/one.txt not found"):
        store.get_bytes("a/one.txt")


def test_keys_outside_the_store_are_refused(store):
    with pytest.raises(ValueError, match="invalid store key"):
        store.put_bytes("../escape", b"x")


def test_published_versions_count_up_and_latest_moves(store, tmp_path):
    catalog = ModelCatalog(store, tmp_path / "cache")
    first = catalog.publish("coinrun", checkpoint(tmp_path / "w1", seed=1))
    second = catalog.publish("coinrun", checkpoint(tmp_path / "w2", seed=2))
    assert (first.version, second.version) == (1, 2)
    assert catalog.versions("coinrun") == [1, 2] and catalog.models() == ["coinrun"]
    assert catalog.resolve("coinrun").version == 2 and catalog.resolve("coinrun@1").version == 1
    model, local = catalog.load("coinrun@1")
    assert (local / "model.safetensors").read_bytes() == (tmp_path / "w1" / "model.safetensors").read_bytes()
    with pytest.raises(UnknownModel, match="versions: 1, 2"):
        catalog.resolve("coinrun@7")


def test_republishing_the_same_version_keeps_one_version(store, tmp_path):
    catalog = ModelCatalog(store)
    catalog.publish("m", checkpoint(tmp_path / "w", seed=1), version=1)
    catalog.publish("m", checkpoint(tmp_path / "w", seed=1), version=1)
    assert catalog.versions("m") == [1]


def test_half_uploaded_version_is_never_listed_or_loaded(store, tmp_path):
    catalog = ModelCatalog(store, tmp_path / "cache")
    catalog.publish("m", checkpoint(tmp_path / "w1", seed=1))
    # A publisher that died after the tensor files, before the manifest.
    store.put_file("models/m/2/model.safetensors", checkpoint(tmp_path / "w2", seed=2) / "model.safetensors")
    assert catalog.versions("m") == [1]
    assert catalog.resolve("m").version == 1
    assert catalog.next_version("m") == 3  # never reuses the half-written folder


def test_corrupted_object_is_refused_on_load_by_checksum(store, tmp_path):
    catalog = ModelCatalog(store, tmp_path / "cache")
    catalog.publish("m", checkpoint(tmp_path / "w1", seed=1))
    original = store.get_bytes("models/m/1/model.safetensors")
    store.put_bytes("models/m/1/model.safetensors", original[:-4] + b"\xff\xff\xff\xff")
    with pytest.raises(CheckpointError, match="checksum mismatch"):
        catalog.load("m@1")
    assert not (tmp_path / "cache" / "m" / "1").exists()


def test_a_finished_download_never_swaps_a_version_out_from_under_its_readers(store, tmp_path):
    catalog = ModelCatalog(store, tmp_path / "cache")
    catalog.publish("m", checkpoint(tmp_path / "w1", seed=1))
    _, local = catalog.load("m@1")
    in_use = local.stat().st_ino  # what a process reading the cached copy has open
    # A second process's download of the same version, finishing after the first: kept out of the way.
    get_checkpoint(store, "models/m/1", local, immutable=True)
    assert local.stat().st_ino == in_use and not list(local.parent.glob(".1.*"))
    get_checkpoint(store, "models/m/1", local)  # a mutable checkpoint (a run's) is replaced
    assert local.stat().st_ino != in_use


def test_deleting_the_latest_version_moves_latest_back(store, tmp_path):
    catalog = ModelCatalog(store)
    for seed in (1, 2):
        catalog.publish("m", checkpoint(tmp_path / f"w{seed}", seed=seed))
    catalog.delete("m@2")
    assert catalog.versions("m") == [1] and catalog.resolve("m").version == 1
    assert store.list("models/m/2/") == []


def test_run_checkpoints_resume_from_the_store_on_another_machine(store, tmp_path):
    sync = RunSync(store, tmp_path / "worker-a", "jobs/j1/runs/tokenizer", keep=2)
    for step in (5, 10, 15):
        save_run_checkpoint(tmp_path / "worker-a", {"model": {"w": torch.full((4,), float(step))}}, {}, step)
        assert sync.push() == f"jobs/j1/runs/tokenizer/step-{step:08d}"
    assert sync.stored_steps() == ["step-00000010", "step-00000015"]
    elsewhere = RunSync(store, tmp_path / "worker-b", "jobs/j1/runs/tokenizer")
    assert elsewhere.pull() == 15
    assert (tmp_path / "worker-b" / "step-00000015" / "manifest.json").is_file()


def test_wrong_credentials_name_the_cause(s3_server):
    settings = StoreSettings(kind="s3", s3_endpoint=s3_server.endpoint, s3_access_key=s3_server.access_key,
                             s3_secret_key="not-the-secret", retry_s=1)
    with pytest.raises(StoreAccessDenied, match="refused the credentials"):
        open_store(settings).list("datasets/")


def test_unreachable_store_names_the_endpoint(tmp_path):
    from tests.services.helpers import free_port

    endpoint = f"127.0.0.1:{free_port()}"
    settings = StoreSettings(kind="s3", s3_endpoint=endpoint, s3_access_key="a", s3_secret_key="b", retry_s=0.5)
    with pytest.raises(StoreUnavailable, match=f"{endpoint}.*unreachable"):
        open_store(settings).list("datasets/")


def test_credentials_come_from_a_secret_file(s3_server, tmp_path):
    secret = tmp_path / "s3.json"
    secret.write_text(f'{{"access_key": "{s3_server.access_key}", "secret_key": "{s3_server.secret_key}"}}')
    store = open_store(StoreSettings(kind="s3", s3_endpoint=s3_server.endpoint, s3_bucket="secret-file",
                                     s3_credentials_file=secret))
    store.put_bytes("k", b"v")
    assert store.get_bytes("k") == b"v" and s3_server.secret_key not in store.description


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_the_job_api_needs_no_torch_and_its_copied_constants_match_genie_models():
    import subprocess
    import sys

    code = ("import sys, services.jobs.server, services.stores.catalog, services.stores.datasets; "
            "print('torch' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"
    from genie_models.checkpoints import MANIFEST_NAME
    from genie_models.data.video_folder import VIDEO_SUFFIXES
    from services.stores import base, datasets

    assert base.MANIFEST_NAME == MANIFEST_NAME and datasets.VIDEO_SUFFIXES == VIDEO_SUFFIXES
