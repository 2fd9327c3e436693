"""Both world stores keep the same contract: create, load, compare-and-set commits, delete, per-owner lists."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest
import redis

from services.settings import GatewaySettings
from services.worldstore.base import WorldRecord
from services.worldstore.memory import MemoryWorldStore
from services.worldstore.redis_store import RedisWorldStore


def _record(world_id: str, owner: str = "alice", step: int = 0) -> WorldRecord:
    rng = np.random.default_rng(step)
    return WorldRecord(world_id, owner, "m", seed=7, num_maskgit_steps=4, temperature=0.5, output_format=2,
                       step=step, tokens=rng.integers(0, 1024, (3, 4, 4)), actions=np.array([4, 1, 2]),
                       last_frame=rng.integers(0, 256, (8, 8, 3), dtype=np.uint8), last_action=2,
                       action_guidance=2.5)


@pytest.fixture(params=["memory", "redis"])
def store(request):
    if request.param == "memory":
        yield MemoryWorldStore()
        return
    url = request.getfixturevalue("redis_url")
    settings = GatewaySettings(world_store="redis", redis_url=url, idle_timeout_s=60,
                               world_store_prefix=f"test{time.monotonic_ns()}:")
    store = RedisWorldStore(settings)
    yield store
    store.close()


def _assert_same(got: WorldRecord, want: WorldRecord) -> None:
    for field in dataclasses.fields(WorldRecord):
        np.testing.assert_array_equal(getattr(got, field.name), getattr(want, field.name), err_msg=field.name)


@pytest.mark.integration
def test_a_record_loads_back_equal_in_every_field(store):
    record = _record("w1")
    store.create(record)
    _assert_same(store.load("w1"), record)
    assert store.load("missing") is None


def test_a_record_written_before_action_guidance_existed_loads_without_one():
    record = _record("w1")
    meta = json.loads(record.meta_json())
    del meta["action_guidance"]
    parts = record.array_bytes()
    old = WorldRecord.from_parts(json.dumps(meta), parts["tokens"], parts["actions"], parts["frame"])
    _assert_same(old, dataclasses.replace(record, action_guidance=None))  # None: it plays its model's own


@pytest.mark.integration
def test_commit_applies_only_on_top_of_the_expected_step(store):
    store.create(_record("w1", step=0))
    assert store.commit(_record("w1", step=1), previous_step=0)
    assert not store.commit(_record("w1", step=1), previous_step=0)  # a second writer of the same step loses
    assert store.load("w1").step == 1
    assert not store.commit(_record("gone", step=1), previous_step=0)


@pytest.mark.integration
def test_lists_and_counts_are_per_owner_and_deletes_free_them(store):
    for world_id, owner in (("a1", "alice"), ("b1", "bob"), ("a2", "alice")):
        store.create(_record(world_id, owner))
    assert [r.world_id for r in store.list("alice")] == ["a1", "a2"] and store.count("bob") == 1
    assert store.delete("a1", "alice") and not store.delete("a1", "alice")
    assert store.count("alice") == 1 and store.load("a1") is None


@pytest.mark.integration
def test_redis_worlds_expire_after_the_idle_timeout(redis_url):
    settings = GatewaySettings(world_store="redis", redis_url=redis_url, idle_timeout_s=1, world_store_prefix="ttl:")
    store = RedisWorldStore(settings)
    store.create(_record("w1"))
    assert redis.Redis.from_url(redis_url).ttl("ttl:world:w1") in (1, 0)
    time.sleep(2.1)
    assert store.load("w1") is None and store.count("alice") == 0
    store.close()
