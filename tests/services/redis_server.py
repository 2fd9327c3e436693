"""A private redis-server for a test session: started on a free loopback port, installed if missing."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import redis

from tests.services.helpers import free_port


def _redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:  # a fresh machine: install it rather than skip (needs root, as CI has)
        subprocess.run(["apt-get", "install", "-y", "redis-server"], check=True, capture_output=True)
        found = shutil.which("redis-server") or "/usr/bin/redis-server"
    return found


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """Yields the URL of a fresh redis-server (no persistence) that lives as long as the context."""
    port = free_port()
    process = subprocess.Popen([_redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1",
                                "--save", "", "--appendonly", "no", "--dir", str(directory)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        client, deadline = redis.Redis.from_url(url), time.monotonic() + 20
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise
                time.sleep(0.05)
        client.close()
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)
