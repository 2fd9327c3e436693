"""docker-compose.tls.yml merged over docker-compose.yml: the model services serve mutual TLS from mounted secrets
with their HTTP on loopback, the gateway and job API serve TLS and the gateway holds the CA and a client
certificate, health checks speak TLS, and every secret is a git-ignored file the dev-certificate script makes."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import yaml

from services.settings import GatewaySettings, JobsSettings
from services.triton.cli import LOOPBACK
from tests.deploy.helpers import ROOT, service_settings, settings_from_env, subject_names
from tests.deploy.test_compose import environment, genie_command

MODEL_SERVICES = ("tokenizer", "lam", "dynamics")
SECRETS = Path("/run/secrets")  # where Compose mounts a service's secrets
TLS_OPTIONS = ("--tls-cert", "--tls-key", "--tls-client-ca")


def mounted_secret(service: dict, path: object) -> str:
    """The secret a /run/secrets/NAME path reads; fails unless the service mounts it."""
    path = Path(str(path))
    assert path.parent == SECRETS, f"{path} is not a Compose secret"
    assert path.name in service["secrets"], f"{path} is read but secret {path.name} is not mounted"
    return path.name


def without_tls_options(command: list[str]) -> list[str]:
    kept, skip = [], False
    for part in command:
        if not skip and part not in TLS_OPTIONS:
            kept.append(part)
        skip = part in TLS_OPTIONS
    return kept


def test_the_tls_file_only_adds_to_the_genie_services(compose):
    override = yaml.safe_load((ROOT / "docker-compose.tls.yml").read_text())
    assert set(override["services"]) == {"gateway", "jobs", *MODEL_SERVICES}
    assert set(override["secrets"]).isdisjoint(compose["secrets"])


@pytest.mark.parametrize("kind", MODEL_SERVICES)
def test_model_services_serve_mutual_tls_from_secrets_and_keep_http_on_loopback(compose, compose_tls, kind):
    service = compose_tls["services"][kind]
    settings = service_settings(genie_command(service))
    for path in (settings.tls_cert, settings.tls_key, settings.tls_client_ca):
        mounted_secret(service, path)
    assert settings.http_bind_address() == LOOPBACK and not settings.http_exposed_beside_tls()
    # The HTTP health check dials loopback, where the endpoint still listens; the command is the plain one + TLS.
    assert service["healthcheck"]["test"][-1] == f"http://{LOOPBACK}:{settings.http_port}/v2/health/ready"
    assert without_tls_options(service["command"]) == compose["services"][kind]["command"]


@pytest.mark.parametrize(("name", "settings_class"), [("gateway", GatewaySettings), ("jobs", JobsSettings)])
def test_grpc_services_serve_tls_and_their_health_check_trusts_the_ca(compose_tls, name, settings_class,
                                                                      monkeypatch):
    service = compose_tls["services"][name]
    settings = settings_from_env(environment(service), monkeypatch)[settings_class]
    mounted_secret(service, settings.tls_cert_file)
    mounted_secret(service, settings.tls_key_file)
    test = service["healthcheck"]["test"]
    assert test[test.index("grpc") + 1] == f"127.0.0.1:{settings.port}"
    assert mounted_secret(service, test[test.index("--ca") + 1]) == "tls_ca"


def test_gateway_reaches_the_model_services_with_the_ca_and_its_client_certificate(compose_tls, monkeypatch):
    gateway = compose_tls["services"]["gateway"]
    settings = settings_from_env(environment(gateway), monkeypatch)[GatewaySettings]
    assert mounted_secret(gateway, settings.triton_tls_ca_file) == "tls_ca"
    client = {mounted_secret(gateway, settings.triton_tls_cert_file),
              mounted_secret(gateway, settings.triton_tls_key_file)}
    for kind in MODEL_SERVICES:  # the CA the services trust for clients is the one that signed the gateway's
        assert service_settings(genie_command(compose_tls["services"][kind])).tls_client_ca == SECRETS / "tls_ca"
    assert not client & set().union(*(compose_tls["services"][kind]["secrets"] for kind in MODEL_SERVICES)), \
        "the gateway's client key stays in the gateway"


def test_every_tls_secret_is_a_git_ignored_file_the_dev_certificate_script_makes(compose_tls, dev_certificates):
    made = {path.name for path in dev_certificates["compose"].iterdir()}
    for name, secret in compose_tls["secrets"].items():
        path = ROOT / secret["file"]
        assert subprocess.run(["git", "check-ignore", "-q", str(path)], cwd=ROOT).returncode == 0, \
            f"{secret['file']} must be git-ignored"
        if path.parent.name == "tls":
            assert path.name in made, f"secret {name}: make-dev-certs.sh makes no {path.name}"
    assert "ca.key" not in {Path(secret["file"]).name for secret in compose_tls["secrets"].values()}


def test_certificates_name_the_hosts_their_clients_dial(compose_tls, dev_certificates, monkeypatch):
    folder = dev_certificates["compose"]
    gateway = settings_from_env(environment(compose_tls["services"]["gateway"]), monkeypatch)[GatewaySettings]
    dialled = {endpoint.rsplit(":", 1)[0] for kinds in gateway.triton_endpoints.values() for endpoint in kinds.values()}
    assert dialled <= subject_names(folder / "model-service.pem")
    for name in ("gateway", "jobs", "model-service"):  # health checks and probes dial loopback inside the container
        assert {"localhost", "127.0.0.1"} <= subject_names(folder / f"{name}.pem")
    assert {"gateway", "jobs"} <= subject_names(folder / "gateway.pem") | subject_names(folder / "jobs.pem")
