"""Fixtures of the deploy tests: the parsed Compose and Prometheus files and the rendered overlays (once per
session). No Docker engine or cluster is used: files are parsed, rendered and validated offline."""

from __future__ import annotations

import pytest
import yaml

from tests.deploy.helpers import DEPLOY, OVERLAYS, ROOT, render


@pytest.fixture(scope="session")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="session")
def prometheus_config() -> dict:
    return yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict]]:
    """overlay -> its rendered objects."""
    return {overlay: render(overlay) for overlay in OVERLAYS}
