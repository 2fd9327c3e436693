"""The Prometheus config, alert rules and Grafana dashboard: promtool accepts them, the alerts fire on
synthetic series (promtool test rules), every genie service is scraped on its metrics port, and every
metric they query is one the code (or Triton) exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from services.metrics import GatewayMetrics, StackMetrics
from services.settings import GatewaySettings, JobsSettings, WorkerSettings
from services.worker.metrics import WorkerMetrics
from tests.deploy.helpers import DEPLOY, ROOT
from tests.deploy.tools import run

PROMETHEUS = DEPLOY / "prometheus"
# Triton's per-model metrics (Triton docs, "Metrics"); durations in microseconds. Not checkable offline:
# the bundled libtritonserver stores these names compressed.
TRITON_METRICS = {"nv_inference_request_success", "nv_inference_request_failure", "nv_inference_count",
                  "nv_inference_exec_count", "nv_inference_pending_request_count", "nv_inference_request_duration_us",
                  "nv_inference_queue_duration_us", "nv_inference_compute_input_duration_us",
                  "nv_inference_compute_infer_duration_us", "nv_inference_compute_output_duration_us"}
PROMQL_WORDS = {"sum", "by", "rate", "increase", "delta", "histogram_quantile", "clamp_min", "count", "absent",
                "and", "unless", "on", "offset", "le", "model", "instance", "phase", "method", "code", "stage",
                "state", "reason", "job", "up", "service"}


def exported_metric_names() -> set[str]:
    """Every series name the genie services export, with the suffixes prometheus_client adds."""
    names = {"up"}
    for metrics in (GatewayMetrics(), StackMetrics(), WorkerMetrics()):
        for family in metrics.registry.collect():
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"),
                        "gauge": ("",)}[family.type]
            names |= {family.name + suffix for suffix in suffixes}
    # The job service's collector (services/jobs/server.py) builds its gauge at scrape time.
    jobs_source = (ROOT / "services/jobs/server.py").read_text()
    names |= set(re.findall(r'GaugeMetricFamily\("(\w+)"', jobs_source))
    assert "genie_jobs" in names
    return names | TRITON_METRICS


def metric_names_in(expression: str) -> set[str]:
    without_strings = re.sub(r'"[^"]*"|\[[^\]]*\]|\{[^}]*\}|\b\d+(\.\d+)?(e-?\d+|[smhd])?\b', " ", expression)
    words = set(re.findall(r"[a-zA-Z_][a-zA-Z0-9_]*", without_strings))
    return {word for word in words if word not in PROMQL_WORDS and not word.startswith("__")}


def test_promtool_accepts_the_compose_config_and_its_rules():
    result = run("promtool", "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    rules = sum(len(group["rules"]) for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"])
    assert f"{rules} rules found" in result.stdout + result.stderr


def test_promtool_accepts_the_kubernetes_config_relabelling(tmp_path: Path):
    # Debian's Prometheus is built without Kubernetes discovery, so the discovery block is swapped for a
    # static target; everything else (relabel rules, rule files) is checked as written.
    config = yaml.safe_load((PROMETHEUS / "prometheus-k8s.yml").read_text())
    (scrape,) = config["scrape_configs"]
    assert scrape.pop("kubernetes_sd_configs")[0]["role"] == "pod"
    scrape["static_configs"] = [{"targets": ["127.0.0.1:9090"]}]
    config["rule_files"] = [str(PROMETHEUS / "alerts.yml")]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    result = run("promtool", "check", "config", str(tmp_path / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = {rule.get("replacement", "$1") for rule in scrape["relabel_configs"] if rule.get("target_label") == "job"}
    assert jobs == {"model-service", "$1"}


def test_promtool_accepts_the_alert_rules():
    result = run("promtool", "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_on_the_series_the_services_export():
    result = run("promtool", "test", "rules", str(PROMETHEUS / "alerts_test.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_required_alerts_exist():
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    alerts = {rule["alert"] for group in groups for rule in group["rules"]}
    assert {"GatewayDown", "GatewayErrorRateHigh", "StepLatencyP99High", "ModelServiceNotReady", "ModelReplicaOut",
            "NoLiveModelReplica", "TrainingJobsFailing", "TrainingJobFailed"} <= alerts


def test_alerts_and_dashboard_query_only_metrics_that_exist():
    exported = exported_metric_names()
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    expressions = [rule["expr"] for group in groups for rule in group["rules"]]
    dashboard = json.loads((DEPLOY / "grafana/dashboards/genie.json").read_text())
    expressions += [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    for expression in expressions:
        unknown = metric_names_in(expression) - exported
        assert not unknown, f"{expression!r} queries {unknown}, which nothing exports"


def test_every_genie_service_is_scraped_on_its_default_metrics_port(prometheus_config):
    targets = {target for job in prometheus_config["scrape_configs"]
               for static in job.get("static_configs", []) for target in static["targets"]}
    assert f"gateway:{GatewaySettings().metrics_port}" in targets
    assert f"jobs:{JobsSettings().metrics_port}" in targets
    from services.triton.cli import ServiceSettings

    for kind in ("tokenizer", "lam", "dynamics"):
        assert f"{kind}:{ServiceSettings(Path('.'), '').metrics_port}" in targets
    (worker,) = [job for job in prometheus_config["scrape_configs"] if job["job_name"] == "worker"]
    assert worker["dns_sd_configs"][0]["port"] == WorkerSettings().metrics_port


@pytest.mark.parametrize("job", ("gateway", "model-service", "jobs", "worker"))
def test_alert_job_labels_match_scrape_job_names(prometheus_config, job):
    assert job in {scrape["job_name"] for scrape in prometheus_config["scrape_configs"]}
    assert f'job="{job}"' in (PROMETHEUS / "alerts.yml").read_text()
