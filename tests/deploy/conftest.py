"""Fixtures of the deploy tests: the parsed Compose and Prometheus files and the rendered overlays (once per
session). No Docker engine or cluster is used: files are parsed, rendered and validated offline."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from tests.deploy.helpers import DEPLOY, OVERLAYS, ROOT, merge_compose, render
from tests.deploy.tools import tool


@pytest.fixture(scope="session")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def compose_tls(compose) -> dict:
    """docker-compose.yml with docker-compose.tls.yml over it, as `docker compose -f ... -f ...` merges them."""
    return merge_compose(compose, yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text()))


@pytest.fixture(scope="session")
def dev_certificates(tmp_path_factory) -> dict[str, Path]:
    """profile (compose, k8s) -> the folder deploy/tls/make-dev-certs.sh filled for it."""
    tool("openssl")
    folders = {}
    for profile in ("compose", "k8s"):
        folders[profile] = tmp_path_factory.mktemp("tls") / profile
        subprocess.run([str(DEPLOY / "tls/make-dev-certs.sh"), profile, str(folders[profile])], check=True,
                       capture_output=True, timeout=120)
    return folders


@pytest.fixture(scope="session")
def prometheus_config() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """overlay -> its rendered objects."""
    return {overlay: render(overlay) for overlay in OVERLAYS}
