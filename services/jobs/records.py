"""Job records in Redis: one JSON document per job (`genie:job:<id>`), time-ordered indexes (all jobs, and each
owner's), and per-job leases.

Every change goes through `update`, a WATCH/MULTI transaction, so the worker's progress reports and a
CancelJob never overwrite each other; `revision` counts changes so WatchJob streams each one once.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import redis

STAGES = ("data", "tokenizer", "dynamics", "eval", "publish")
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = (SUCCEEDED, FAILED, CANCELLED)
_PREFIX = "genie:job:"
_INDEX = "genie:jobs"
_OWNER_INDEX = "genie:jobs:owner:"  # + owner name: that owner's jobs, time-ordered


class JobNotFound(LookupError):
    pass


@dataclass
class JobRecord:
    job_id: str
    dataset: str
    preset: str
    model_name: str
    overrides: dict[str, int] = field(default_factory=dict)
    # The name of the API key that submitted the job (never the key); "anonymous" with auth off. Records
    # written before jobs had owners read as "": they belong to no key (services/jobs/service.py).
    owner: str = ""
    state: str = QUEUED
    stage: str = STAGES[0]
    step: int = 0
    total_steps: int = 0
    losses: dict[str, float] = field(default_factory=dict)
    frames_per_second: float = 0.0
    eta_seconds: float = 0.0
    last_checkpoint: str = ""
    error: str = ""
    message: str = ""
    model_version: int = 0
    eval_metrics: dict[str, float] = field(default_factory=dict)
    attempt: int = 0
    resumed_from_step: int = 0
    created_at: float = 0.0
    updated_at: float = 0.0
    cancel_requested_at: float = 0.0
    stopped_at: float = 0.0
    revision: int = 0

    @property
    def finished(self) -> bool:
        return self.state in TERMINAL

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: bytes | str) -> JobRecord:
        return cls(**json.loads(text))


class JobRecords:
    def __init__(self, client: redis.Redis):
        self.redis = client

    @classmethod
    def from_url(cls, url: str) -> JobRecords:
        return cls(redis.Redis.from_url(url))

    def create(self, dataset: str, preset: str, model_name: str, overrides: dict[str, int], owner: str) -> JobRecord:
        now = time.time()
        record = JobRecord(job_id="job-" + uuid.uuid4().hex[:12], dataset=dataset, preset=preset,
                           model_name=model_name, overrides=dict(overrides), owner=owner, created_at=now,
                           updated_at=now, message="queued", revision=1)
        pipe = self.redis.pipeline()
        pipe.set(_PREFIX + record.job_id, record.to_json())
        pipe.zadd(_INDEX, {record.job_id: now})
        pipe.zadd(_OWNER_INDEX + owner, {record.job_id: now})
        pipe.execute()
        return record

    def get(self, job_id: str) -> JobRecord:
        raw = self.redis.get(_PREFIX + job_id)
        if raw is None:
            raise JobNotFound(f"no job {job_id!r}; list jobs with `genie jobs list`")
        return JobRecord.from_json(raw)

    def list(self, limit: int = 100, owner: str | None = None) -> list[JobRecord]:
        """The newest `limit` jobs, of `owner` only when given."""
        index = _INDEX if owner is None else _OWNER_INDEX + owner
        ids = [raw.decode() for raw in self.redis.zrevrange(index, 0, limit - 1)]
        values = self.redis.mget([_PREFIX + job_id for job_id in ids]) if ids else []
        return [JobRecord.from_json(raw) for raw in values if raw is not None]

    def all_states(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for record in self.list(limit=10_000):
            counts[record.state] = counts.get(record.state, 0) + 1
        return counts

    def update(self, job_id: str, change: Callable[[JobRecord], bool | None]) -> JobRecord:
        """Apply change (which may return False to leave the record as is) atomically; returns the result."""
        key = _PREFIX + job_id
        with self.redis.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    if raw is None:
                        raise JobNotFound(f"no job {job_id!r}")
                    record = JobRecord.from_json(raw)
                    if change(record) is False:
                        pipe.unwatch()
                        return record
                    record.revision += 1
                    record.updated_at = time.time()
                    pipe.multi()
                    pipe.set(key, record.to_json())
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue

    def cancel(self, job_id: str) -> JobRecord:
        def change(record: JobRecord) -> bool:
            if record.finished:
                return False
            was_running = record.state == RUNNING
            record.state, record.cancel_requested_at = CANCELLED, time.time()
            record.message = "cancelled; stopping the stage process" if was_running else "cancelled before it ran"
            if not was_running:
                record.stopped_at = record.cancel_requested_at
            return True
        return self.update(job_id, change)

    # Leases: one worker at a time runs a job's stage; a dead worker's lease expires after its TTL.
    def acquire_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        return bool(self.redis.set(f"{_PREFIX}{job_id}:lease", token, nx=True, px=int(ttl_s * 1000)))

    def renew_lease(self, job_id: str, token: str, ttl_s: float) -> bool:
        return bool(self.redis.eval(_RENEW, 1, f"{_PREFIX}{job_id}:lease", token, int(ttl_s * 1000)))

    def release_lease(self, job_id: str, token: str) -> None:
        self.redis.eval(_RELEASE, 1, f"{_PREFIX}{job_id}:lease", token)

    def lock(self, name: str, timeout_s: float = 60.0):
        return self.redis.lock(f"genie:lock:{name}", timeout=timeout_s, blocking_timeout=timeout_s)


_RENEW = ("if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) "
          "else return 0 end")
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
