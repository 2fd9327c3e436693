"""The TLS overlays (cpu-tls, gpu-tls = deploy/k8s/components/tls): every certificate a process reads is a key of a
mounted Secret that secrets.example.yaml documents; model services serve mutual TLS with HTTP on loopback, and
their probes reach them without a kubelet gRPC probe (which cannot speak TLS); the gateway and job API serve TLS,
the gateway holds the CA and a client certificate, and the dev certificates (or cert-manager's) name what the
gateway dials."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path, PurePosixPath

import pytest
import yaml

from services.settings import GatewaySettings, JobsSettings
from services.triton import probe
from services.triton.cli import LOOPBACK, ServiceSettings
from tests.deploy.helpers import DEPLOY, TLS_OVERLAYS, service_settings, settings_from_env, subject_names
from tests.deploy.tools import run
from tests.deploy.test_kubernetes import MODEL_SERVICES, command_of, container, environment, objects_of

PROBES = ("startupProbe", "readinessProbe", "livenessProbe")


def healthcheck_module():
    """deploy/docker/healthcheck.py (the images' /usr/local/bin/genie-healthcheck), to parse probe commands."""
    spec = importlib.util.spec_from_file_location("genie_healthcheck", DEPLOY / "docker/healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example_secret_keys() -> dict[str, set[str]]:
    secrets = yaml.safe_load_all((DEPLOY / "k8s/secrets.example.yaml").read_text())
    return {secret["metadata"]["name"]: set(secret["stringData"]) for secret in secrets if secret}


def mounted_secret(deployment: dict, path: object) -> str:
    """The Secret whose key `path` reads; fails unless a volume of that Secret is mounted there with that key."""
    path = PurePosixPath(str(path))
    mounts = {mount["mountPath"]: mount["name"] for mount in container(deployment)["volumeMounts"]}
    assert str(path.parent) in mounts, f"{path}: nothing is mounted at {path.parent}"
    volumes = {volume["name"]: volume for volume in deployment["spec"]["template"]["spec"]["volumes"]}
    name = volumes[mounts[str(path.parent)]]["secret"]["secretName"]
    assert path.name in example_secret_keys()[name], f"{path}: Secret {name} has no key {path.name} (secrets.example)"
    return name


def healthcheck_args(probe_spec: dict):
    command = probe_spec["exec"]["command"]
    assert command[:2] == ["python", "/usr/local/bin/genie-healthcheck"]
    return healthcheck_module().parse(command[2:])


@pytest.mark.parametrize("overlay", TLS_OVERLAYS)
def test_no_kubelet_grpc_probe_is_left_to_fail_the_tls_handshake(rendered, overlay):
    for name, deployment in objects_of(rendered[overlay], "Deployment").items():
        for probe_name in PROBES:
            assert "grpc" not in container(deployment).get(probe_name, {}), f"{name} {probe_name}"


@pytest.mark.parametrize("overlay", TLS_OVERLAYS)
@pytest.mark.parametrize("kind", MODEL_SERVICES)
def test_model_services_serve_mutual_tls_from_the_secret_and_their_probes_reach_them(rendered, overlay, kind):
    deployment = objects_of(rendered[overlay], "Deployment")[f"genie-{kind}"]
    settings: ServiceSettings = service_settings(command_of(deployment))
    files = (settings.tls_cert, settings.tls_key, settings.tls_client_ca)
    assert {mounted_secret(deployment, path) for path in files} == {"genie-model-services-tls"}
    assert settings.http_bind_address() == LOOPBACK and not settings.http_exposed_beside_tls()
    spec = container(deployment)
    for probe_name in ("startupProbe", "readinessProbe"):  # Triton's readiness, on its loopback HTTP endpoint
        args = healthcheck_args(spec[probe_name])
        assert (args.kind, args.target) == ("http", f"http://{LOOPBACK}:{settings.http_port}/v2/health/ready")
        assert spec[probe_name]["timeoutSeconds"] >= 3, "a Python exec probe needs more than the default 1 s"
    command = spec["livenessProbe"]["exec"]["command"]
    assert command[:3] == ["python", "-m", "services.triton.probe"]
    live = probe.parse_args(command[3:])
    assert live.grpc_port == settings.grpc_port and live.host == LOOPBACK
    assert (live.tls_cert, live.tls_key) == (settings.tls_cert, settings.tls_key)  # the pod's own certificate
    assert mounted_secret(deployment, live.tls_ca) == "genie-model-services-tls"


@pytest.mark.parametrize("overlay", TLS_OVERLAYS)
@pytest.mark.parametrize(("name", "settings_class"), [("gateway", GatewaySettings), ("jobs", JobsSettings)])
def test_grpc_services_serve_tls_and_are_probed_over_it(rendered, overlay, name, settings_class, monkeypatch):
    objects = rendered[overlay]
    deployment = objects_of(objects, "Deployment")[f"genie-{name}"]
    settings = settings_from_env(environment(objects, deployment), monkeypatch)[settings_class]
    assert mounted_secret(deployment, settings.tls_cert_file) == mounted_secret(deployment, settings.tls_key_file) \
        == f"genie-{name}-tls"
    for probe_name in ("readinessProbe", "livenessProbe"):
        args = healthcheck_args(container(deployment)[probe_name])
        assert (args.kind, args.target) == ("grpc", f"127.0.0.1:{settings.port}")
        assert mounted_secret(deployment, args.ca) == f"genie-{name}-tls"


@pytest.mark.parametrize("overlay", TLS_OVERLAYS)
def test_gateway_reaches_the_model_services_with_the_ca_and_its_own_client_certificate(rendered, overlay,
                                                                                      monkeypatch):
    objects = rendered[overlay]
    gateway = objects_of(objects, "Deployment")["genie-gateway"]
    settings = settings_from_env(environment(objects, gateway), monkeypatch)[GatewaySettings]
    client = {mounted_secret(gateway, path) for path in (settings.triton_tls_ca_file, settings.triton_tls_cert_file,
                                                          settings.triton_tls_key_file)}
    assert client == {"genie-gateway-triton-tls"}
    for kind in MODEL_SERVICES:  # the client key stays in the gateway's pods
        volumes = objects_of(objects, "Deployment")[f"genie-{kind}"]["spec"]["template"]["spec"]["volumes"]
        assert "genie-gateway-triton-tls" not in {volume.get("secret", {}).get("secretName") for volume in volumes}


def test_dev_certificates_name_every_host_the_gateway_dials(rendered, dev_certificates, monkeypatch):
    objects = rendered["cpu-tls"]
    gateway = settings_from_env(environment(objects, objects_of(objects, "Deployment")["genie-gateway"]),
                                monkeypatch)[GatewaySettings]
    dialled = {endpoint.rsplit(":", 1)[0] for kinds in gateway.triton_endpoints.values() for endpoint in kinds.values()}
    assert dialled <= subject_names(Path(dev_certificates["k8s"]) / "model-service.pem")


def test_plain_overlays_stay_plaintext(rendered):
    for overlay in ("cpu", "gpu"):
        for deployment in objects_of(rendered[overlay], "Deployment").values():
            assert "tls" not in " ".join(container(deployment).get("args", [])), "TLS is opt-in (the *-tls overlays)"


@pytest.fixture(scope="module")
def with_cert_manager(tmp_path_factory) -> list[dict]:
    """cpu-tls plus deploy/k8s/components/cert-manager, rendered the way its kustomization.yaml tells to use it."""
    folder = tmp_path_factory.mktemp("cert-manager-overlay")
    overlay, component = (os.path.relpath(DEPLOY / "k8s" / path, folder)
                          for path in ("overlays/cpu-tls", "components/cert-manager"))
    (folder / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [overlay], "components": [component]}))
    result = run("kubectl", "kustomize", str(folder))
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_cert_manager_issues_every_tls_secret_with_the_names_and_usages_its_holder_needs(rendered, with_cert_manager,
                                                                                        monkeypatch):
    certificates = {item["spec"]["secretName"]: item["spec"] for item in with_cert_manager
                    if item["kind"] == "Certificate"}
    mounted = {volume["secret"]["secretName"] for deployment in objects_of(rendered["cpu-tls"], "Deployment").values()
               for volume in deployment["spec"]["template"]["spec"]["volumes"] if "secret" in volume}
    tls_secrets = {name for name in mounted if name.endswith("-tls")}
    assert set(certificates) == tls_secrets
    (issuer,) = [item for item in with_cert_manager if item["kind"] == "Issuer"]
    assert all(spec["issuerRef"]["name"] == issuer["metadata"]["name"] for spec in certificates.values())
    assert issuer["spec"]["ca"]["secretName"] in example_secret_keys()
    objects = rendered["cpu-tls"]
    gateway = settings_from_env(environment(objects, objects_of(objects, "Deployment")["genie-gateway"]),
                                monkeypatch)[GatewaySettings]
    dialled = {endpoint.rsplit(":", 1)[0] for kinds in gateway.triton_endpoints.values() for endpoint in kinds.values()}
    assert dialled <= set(certificates["genie-model-services-tls"]["dnsNames"])
    for secret in ("genie-gateway-tls", "genie-jobs-tls", "genie-model-services-tls"):
        spec = certificates[secret]
        assert "localhost" in spec["dnsNames"] and "127.0.0.1" in spec["ipAddresses"], f"{secret}: probes dial loopback"
        assert "server auth" in spec["usages"]
    assert "client auth" in certificates["genie-model-services-tls"]["usages"]  # its liveness probe presents it
    assert "client auth" in certificates["genie-gateway-triton-tls"]["usages"]
