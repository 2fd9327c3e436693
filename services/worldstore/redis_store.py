"""The `redis` world store: records in Redis, shared by every gateway pointed at it.

One hash per world (meta JSON, step, tokens, actions, frame) with the idle timeout as its TTL, and one
set of world ids per owner. A step commits with a Lua compare-and-set on the stored step number.
"""

from __future__ import annotations

import redis

from services.settings import GatewaySettings
from services.worldstore.base import WorldRecord, WorldStoreUnavailable

# KEYS[1] world hash; ARGV: previous step, new step, meta, tokens, actions, frame, ttl seconds.
_COMMIT = """
if redis.call('HGET', KEYS[1], 'step') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'step', ARGV[2], 'meta', ARGV[3], 'tokens', ARGV[4], 'actions', ARGV[5], 'frame', ARGV[6])
redis.call('EXPIRE', KEYS[1], ARGV[7])
return 1
"""


class RedisWorldStore:
    """Implements services.worldstore.base.WorldStore on a Redis server (settings.redis_url)."""

    def __init__(self, settings: GatewaySettings):
        self._redis = redis.Redis.from_url(settings.redis_url.get_secret_value(), socket_timeout=settings.redis_timeout_s,
                                           socket_connect_timeout=settings.redis_timeout_s)
        self._prefix = settings.world_store_prefix
        self._ttl_s = max(1, int(settings.idle_timeout_s + 0.999))
        self._commit = self._redis.register_script(_COMMIT)

    def _world_key(self, world_id: str) -> str:
        return f"{self._prefix}world:{world_id}"

    def _owner_key(self, owner: str) -> str:
        return f"{self._prefix}owner:{owner}"

    def _fields(self, record: WorldRecord) -> dict[str, bytes | str | int]:
        return {"step": record.step, "meta": record.meta_json(), **record.array_bytes()}

    def create(self, record: WorldRecord) -> None:
        key = self._world_key(record.world_id)
        with _unavailable_on_error():
            pipe = self._redis.pipeline(transaction=True)
            pipe.hset(key, mapping=self._fields(record)).expire(key, self._ttl_s)
            pipe.sadd(self._owner_key(record.owner), record.world_id)
            pipe.execute()

    def load(self, world_id: str) -> WorldRecord | None:
        with _unavailable_on_error():
            values = self._redis.hmget(self._world_key(world_id), ["meta", "tokens", "actions", "frame"])
        return None if values[0] is None else WorldRecord.from_parts(*values)

    def commit(self, record: WorldRecord, previous_step: int) -> bool:
        fields = self._fields(record)
        with _unavailable_on_error():
            done = self._commit(keys=[self._world_key(record.world_id)],
                                args=[str(previous_step), str(record.step), fields["meta"], fields["tokens"],
                                      fields["actions"], fields["frame"], self._ttl_s])
        return bool(done)

    def delete(self, world_id: str, owner: str) -> bool:
        with _unavailable_on_error():
            pipe = self._redis.pipeline(transaction=True)
            pipe.delete(self._world_key(world_id)).srem(self._owner_key(owner), world_id)
            deleted, _ = pipe.execute()
        return bool(deleted)

    def _live_ids(self, owner: str) -> list[str]:
        """The owner's world ids whose hashes still exist (expired ones are pruned from the set)."""
        owner_key = self._owner_key(owner)
        ids = sorted(member.decode() for member in self._redis.smembers(owner_key))
        pipe = self._redis.pipeline(transaction=False)
        for world_id in ids:
            pipe.exists(self._world_key(world_id))
        alive = pipe.execute()
        expired = [world_id for world_id, exists in zip(ids, alive) if not exists]
        if expired:
            self._redis.srem(owner_key, *expired)
        return [world_id for world_id, exists in zip(ids, alive) if exists]

    def list(self, owner: str) -> list[WorldRecord]:
        with _unavailable_on_error():
            records = [self.load(world_id) for world_id in self._live_ids(owner)]
        return sorted((record for record in records if record is not None), key=lambda r: r.created_at)

    def count(self, owner: str) -> int:
        with _unavailable_on_error():
            return len(self._live_ids(owner))

    def close(self) -> None:
        self._redis.close()


class _unavailable_on_error:
    """Turns Redis connection failures into WorldStoreUnavailable (without the URL: it may hold a password)."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, error, traceback) -> bool:
        if isinstance(error, redis.RedisError):
            raise WorldStoreUnavailable(f"the world store (Redis) failed: {type(error).__name__}: "
                                        f"{str(error)[:200]}") from error
        return False
