"""docker-compose.yml against the code: images and Dockerfiles, start commands the `genie` CLI accepts,
health checks, ports equal to the settings' defaults, settings names and values, and no literal secrets."""

from __future__ import annotations

import json
import re
import subprocess

import pytest

from services.settings import GatewaySettings, JobsSettings, WorkerSettings
from tests.deploy.helpers import (PREFIXES_BY_SERVICE, ROOT, dockerfile_entrypoint, interpolate, parse_command,
                                  service_of, settings_from_env)

GENIE_SERVICES = ("gateway", "tokenizer", "lam", "dynamics", "jobs", "worker")
INFRASTRUCTURE = ("redis", "minio", "minio-init", "prometheus", "grafana")
ONE_SHOT = ("minio-init",)


def genie_command(service: dict) -> object:
    """The parsed argv the container runs: its Dockerfile's ENTRYPOINT + the Compose command."""
    dockerfile = ROOT / service["build"]["dockerfile"]
    command = [interpolate(part) for part in service["command"]]
    return parse_command(dockerfile_entrypoint(dockerfile) + command)


def environment(service: dict) -> dict[str, str]:
    return {name: interpolate(str(value)) for name, value in (service.get("environment") or {}).items()}


def test_every_component_of_the_design_is_a_compose_service(compose):
    assert set(compose["services"]) == set(GENIE_SERVICES) | set(INFRASTRUCTURE)


@pytest.mark.parametrize("name", GENIE_SERVICES)
def test_genie_service_builds_from_an_existing_dockerfile_that_copies_existing_paths(compose, name):
    build = compose["services"][name]["build"]
    assert build["context"] == "."
    dockerfile = ROOT / build["dockerfile"]
    assert dockerfile.is_file(), f"{name}: no Dockerfile at {build['dockerfile']}"
    assert (dockerfile.parent / f"{dockerfile.name}.dockerignore").is_file(), "send the image only what it copies"
    text = dockerfile.read_text()
    for source in re.findall(r"^COPY (\S+) ", text, re.MULTILINE):
        assert (ROOT / source).exists(), f"{dockerfile.name} copies {source}, which does not exist"
    assert re.search(r"^USER 10001$", text, re.MULTILINE), f"{dockerfile.name} must not run as root"
    assert "HEALTHCHECK" in text


@pytest.mark.parametrize("name", GENIE_SERVICES)
def test_genie_service_command_is_one_the_cli_accepts_and_runs_that_service(compose, name):
    args = genie_command(compose["services"][name])
    assert service_of(args) == name
    assert callable(args.handler)


@pytest.mark.parametrize("name", [n for n in GENIE_SERVICES + INFRASTRUCTURE if n not in ONE_SHOT])
def test_every_long_running_service_has_a_healthcheck_and_restarts(compose, name):
    service = compose["services"][name]
    test = service["healthcheck"]["test"]
    assert test[0] == "CMD" and len(test) > 1
    assert service["restart"] == "unless-stopped"


def test_one_shot_bucket_creation_gates_the_services_that_use_the_store(compose):
    init = compose["services"]["minio-init"]
    assert init["restart"] == "no" and "mc mb --ignore-existing" in init["command"][0]
    for name in ("jobs", "worker"):
        assert compose["services"][name]["depends_on"]["minio-init"]["condition"] == "service_completed_successfully"
    store_bucket = interpolate(compose["services"]["jobs"]["environment"]["GENIE_STORE_S3_BUCKET"])
    assert interpolate(init["environment"]["GENIE_S3_BUCKET"]) == store_bucket


@pytest.mark.parametrize("name", INFRASTRUCTURE)
def test_infrastructure_images_are_pinned_releases(compose, name):
    image = compose["services"][name]["image"]
    assert re.fullmatch(r"[\w./-]+:[\w.-]+", image) and not image.endswith(":latest"), f"{name}: pin a release"


@pytest.mark.parametrize("name", GENIE_SERVICES)
def test_settings_names_belong_to_the_service_and_their_values_load(compose, name, monkeypatch):
    service = compose["services"][name]
    env = environment(service)
    prefixes = PREFIXES_BY_SERVICE[service_of(genie_command(service))]
    for variable in env:
        assert variable.startswith(prefixes), f"{name} sets {variable}, which `genie` for {name} never reads"
    settings_from_env(env, monkeypatch)  # raises on a field name or value the service would reject


@pytest.mark.parametrize(("name", "settings_class"), [("gateway", GatewaySettings), ("jobs", JobsSettings)])
def test_grpc_service_ports_and_healthcheck_agree_with_its_settings(compose, name, settings_class, monkeypatch):
    service = compose["services"][name]
    settings = settings_from_env(environment(service), monkeypatch)[settings_class]
    assert settings.host == "0.0.0.0", "in a container a service must bind every interface"
    assert f"{settings.port}:{settings.port}" in service["ports"]
    assert str(settings.metrics_port) in service["expose"]
    assert service["healthcheck"]["test"][-1] == f"127.0.0.1:{settings.port}"


def test_worker_health_is_its_metrics_port(compose, monkeypatch):
    service = compose["services"]["worker"]
    settings = settings_from_env(environment(service), monkeypatch)[WorkerSettings]
    assert str(settings.metrics_port) in service["expose"]
    assert service["healthcheck"]["test"][-1] == f"http://127.0.0.1:{settings.metrics_port}/metrics"


@pytest.mark.parametrize("kind", ("tokenizer", "lam", "dynamics"))
def test_gateway_reaches_each_model_service_on_its_grpc_port_and_model_name(compose, kind, monkeypatch):
    gateway = settings_from_env(environment(compose["services"]["gateway"]), monkeypatch)[GatewaySettings]
    assert gateway.backend == "triton"
    args = genie_command(compose["services"][kind])
    endpoints = gateway.triton_endpoints[args.model_name]
    assert endpoints[kind] == f"{kind}:{args.grpc_port}"
    service = compose["services"][kind]
    assert {str(args.http_port), str(args.grpc_port), str(args.metrics_port)} <= set(service["expose"])
    assert service["healthcheck"]["test"][-1] == f"http://127.0.0.1:{args.http_port}/v2/health/ready"
    assert args.address == "0.0.0.0"
    assert service["shm_size"] in ("256m", "512m", "1g", "2g"), "Triton's Python backend needs /dev/shm"


def test_gateway_waits_for_healthy_model_services_and_redis(compose):
    depends = compose["services"]["gateway"]["depends_on"]
    for name in ("redis", "tokenizer", "lam", "dynamics"):
        assert depends[name]["condition"] == "service_healthy"


def test_no_secret_is_written_in_the_compose_file(compose):
    secret_like = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN|API_KEYS$")
    for name, service in compose["services"].items():
        for variable, value in (service.get("environment") or {}).items():
            if secret_like.search(variable):
                assert re.fullmatch(r"\$\{\w+:\?[^}]+\}", str(value)), \
                    f"{name}.{variable} must come from the operator (${{VAR:?...}}), not the file"
    for secret in compose["secrets"].values():
        path = ROOT / secret["file"]
        ignored = subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT).returncode == 0
        assert ignored, f"{secret['file']} must be git-ignored"
        assert path.with_name(path.name + ".example").is_file()


def test_grafana_is_provisioned_with_the_dashboard_and_prometheus(compose):
    volumes = compose["services"]["grafana"]["volumes"]
    for source in (volume.split(":")[0] for volume in volumes):
        assert (ROOT / source).is_dir(), f"grafana mounts {source}, which does not exist"
    dashboard = json.loads((ROOT / "deploy/grafana/dashboards/genie.json").read_text())
    titles = " ".join(panel["title"].lower() for panel in dashboard["panels"])
    for topic in ("worlds", "p50", "p99", "errors by code", "batch size", "triton queue", "triton compute",
                  "training jobs"):
        assert topic in titles, f"the dashboard has no panel about {topic}"
