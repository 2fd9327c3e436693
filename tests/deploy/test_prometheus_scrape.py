"""A real Prometheus (Debian's) runs the shipped prometheus.yml and alerts.yml, retargeted at loopback, and
scrapes the gateway's and the worker's metric registries served by the code's own serve_metrics."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import yaml

from services.metrics import GatewayMetrics, serve_metrics
from services.worker.metrics import WorkerMetrics
from tests.deploy.helpers import DEPLOY
from tests.deploy.tools import tool
from tests.services.helpers import free_port


def shipped_config_on_loopback(targets: dict[str, str]) -> dict:
    """prometheus.yml with each job's targets replaced by a loopback address; everything else as shipped."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"] |= {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    for job in config["scrape_configs"]:
        job.pop("dns_sd_configs", None)
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return config


def query(port: int, expression: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)["data"]["result"]


def wait_for(port: int, expression: str, process: subprocess.Popen, timeout_s: float = 45) -> list[dict]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, f"prometheus exited with {process.returncode}"
        try:
            if result := query(port, expression):
                return result
        except OSError:
            pass  # not listening yet
        time.sleep(0.3)
    raise AssertionError(f"{expression} never returned a series in {timeout_s} s")


def test_shipped_config_scrapes_the_services_metrics_and_loads_the_alerts(tmp_path: Path):
    gateway, worker = GatewayMetrics(), WorkerMetrics()
    gateway.steps.labels(model="world").inc(3)
    gateway.step_latency.labels(model="world").observe(0.02)
    gateway.rpc_errors.labels(method="StepWorld", code="UNAVAILABLE").inc()
    worker.training_steps.labels(stage="tokenizer").inc(5)
    servers = [serve_metrics(gateway.registry, 0, "127.0.0.1"), serve_metrics(worker.registry, 0, "127.0.0.1")]
    port = free_port()
    nothing = f"127.0.0.1:{free_port()}"  # model services and the job API are not running: their targets are down
    targets = {"gateway": f"127.0.0.1:{servers[0].port}", "worker": f"127.0.0.1:{servers[1].port}",
               "model-service": nothing, "jobs": nothing, "prometheus": f"127.0.0.1:{port}"}
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(shipped_config_on_loopback(targets)))
    process = subprocess.Popen([tool("prometheus"), f"--config.file={tmp_path / 'prometheus.yml'}",
                                f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(port, 'up{job="gateway"} == 1', process)
        assert wait_for(port, 'up{job="worker"} == 1', process)
        assert wait_for(port, 'up{job="model-service"} == 0', process)
        steps = wait_for(port, 'genie_steps_total{job="gateway", model="world"}', process)
        assert float(steps[0]["value"][1]) == 3
        assert wait_for(port, 'genie_rpc_errors_total{code="UNAVAILABLE"}', process)
        assert wait_for(port, 'genie_step_latency_seconds_bucket{le="0.025"}', process)
        assert wait_for(port, 'genie_training_steps_total{job="worker", stage="tokenizer"}', process)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=5) as response:
            groups = json.load(response)["data"]["groups"]
        shipped = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())["groups"]
        assert sum(len(group["rules"]) for group in groups) == sum(len(group["rules"]) for group in shipped) >= 12
    finally:
        process.terminate()
        process.wait(timeout=30)
        for server in servers:
            server.close()
