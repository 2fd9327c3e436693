"""Real servers for the job and store tests: a private Redis and a SeaweedFS S3 server on free loopback ports.

Imported by the tests that need them (`from tests.services.jobs_servers import ...`); nothing here mocks.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.services.helpers import free_port

WEED = shutil.which("weed") or str(Path(sys.executable).parent / "weed")


def free_ports(count: int) -> list[int]:
    ports: set[int] = set()
    while len(ports) < count:
        ports.add(free_port())
    return sorted(ports)


def redis_server_binary() -> str:
    """redis-server, installed with apt-get on a fresh machine (never skipped)."""
    found = shutil.which("redis-server")
    if found:
        return found
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    subprocess.run([*prefix, "apt-get", "install", "-y", "redis-server"], check=True, stdout=subprocess.DEVNULL,
                   env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    return shutil.which("redis-server") or "/usr/sbin/redis-server"


@dataclass
class RedisServer:
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    import redis

    port = free_port()
    process = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                "--appendonly", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield RedisServer(port, process)
    process.terminate()
    process.wait(10)


@dataclass
class S3Server:
    """A SeaweedFS `weed mini` with S3 on `port`; stop()/start() restart it on the same ports and data."""

    directory: Path
    ports: list[int]
    access_key: str
    secret_key: str
    process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        return self.ports[0]

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self, bucket: str = "genie", **overrides: str) -> dict[str, str]:
        """GENIE_STORE_* for a process that should use this server."""
        values = {"GENIE_STORE_KIND": "s3", "GENIE_STORE_S3_ENDPOINT": self.endpoint,
                  "GENIE_STORE_S3_BUCKET": bucket, "GENIE_STORE_S3_ACCESS_KEY": self.access_key,
                  "GENIE_STORE_S3_SECRET_KEY": self.secret_key}
        return values | overrides

    def start(self) -> None:
        s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc, admin, admin_grpc, webdav, \
            metrics = self.ports
        config = self.directory / "s3.json"
        config.write_text(json.dumps({"identities": [{"name": "genie", "credentials": [
            {"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        args = [WEED, "mini", f"-dir={self.directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                "-master.telemetry=false", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
                "-s3.port.iceberg=0", "-s3.port.lance=0", f"-master.port={master}",
                f"-master.port.grpc={master_grpc}", f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
                f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}", f"-admin.port={admin}",
                f"-admin.port.grpc={admin_grpc}", f"-webdav.port={webdav}", f"-metricsPort={metrics}"]
        (self.directory / "data").mkdir(parents=True, exist_ok=True)
        log = (self.directory / "weed.log").open("ab")
        self.process = subprocess.Popen(["nice", "-n", "19", *args], stdout=log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        self._wait_ready()

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        from minio import Minio

        client = Minio(self.endpoint, self.access_key, self.secret_key, secure=False)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited with {self.process.returncode}; see {self.directory / 'weed.log'}")
            try:
                client.list_buckets()
                return
            except Exception:  # noqa: BLE001 - any failure means "not ready yet"
                time.sleep(0.3)
        raise RuntimeError(f"SeaweedFS S3 on {self.endpoint} not ready after {timeout_s} s")

    def stop(self, kill: bool = False) -> None:
        """SIGKILL (kill=True, a crash) or SIGTERM then SIGKILL after 10 s (its clean shutdown takes 25-40 s)."""
        if self.process is None:
            return
        os.killpg(self.process.pid, signal.SIGKILL if kill else signal.SIGTERM)
        try:
            self.process.wait(0.5 if kill else 10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("seaweedfs"), free_ports(12), "genie-test-" + secrets.token_hex(4),
                      secrets.token_hex(16))
    server.start()
    yield server
    server.stop(kill=True)  # its data is a temporary folder; a clean shutdown would take 25-40 s
