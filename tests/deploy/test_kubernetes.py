"""deploy/k8s against the Kubernetes schemas and the code: every overlay renders and validates, commands
parse, probes and scrape annotations use the services' ports, env names are settings fields, selectors
select, only the gateway reaches the model services, and the gpu overlay asks for GPUs and /dev/shm."""

from __future__ import annotations

import importlib.util
import json

import kubernetes_validate
import pytest
import yaml

from services.settings import GatewaySettings, JobsSettings, WorkerSettings
from tests.deploy.helpers import (DEPLOY, OVERLAYS, PREFIXES_BY_SERVICE, ROOT, dockerfile_entrypoint, parse_command,
                                  service_of, settings_field, settings_from_env)

KUBERNETES_VERSION = "1.30.0"  # the oldest release these manifests promise to run on (gRPC probes are GA in 1.27)
MODEL_SERVICES = ("tokenizer", "lam", "dynamics")
HEADLESS = "-replicas"  # a headless twin of a Service: the same pods, for the gateway's dns discovery
DOCKERFILE_BY_IMAGE = {"gateway": "gateway", "jobs": "jobs", "worker": "worker", "model-service": "model-service.cpu"}


def objects_of(objects: list[dict], kind: str) -> dict[str, dict]:
    return {item["metadata"]["name"]: item for item in objects if item["kind"] == kind}


def container(deployment: dict) -> dict:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def command_of(deployment: dict):
    image = container(deployment)["image"].rsplit("/", 1)[-1].split(":")[0]
    dockerfile = ROOT / "deploy/docker" / f"{DOCKERFILE_BY_IMAGE[image]}.Dockerfile"
    return parse_command(dockerfile_entrypoint(dockerfile) + container(deployment)["args"])


def environment(objects: list[dict], deployment: dict) -> dict[str, str]:
    """Literal env values plus every key of the ConfigMaps it loads; Secret refs become a stand-in value."""
    configmaps = objects_of(objects, "ConfigMap")
    spec = container(deployment)
    env = {}
    for source in spec.get("envFrom", []):
        env |= configmaps[source["configMapRef"]["name"]]["data"]
    for variable in spec.get("env", []):
        env[variable["name"]] = variable.get("value", "redis://secret-from-kubernetes:6379/0")
    return env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_against_the_kubernetes_schemas(rendered, overlay):
    kinds = {item["kind"] for item in rendered[overlay]}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy",
            "ConfigMap", "PersistentVolumeClaim", "Namespace"} <= kinds
    for item in rendered[overlay]:
        try:
            kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{overlay}: {item['kind']}/{item['metadata']['name']}: {error.message} at {list(error.path)}")


def test_the_example_secrets_are_valid_and_are_what_the_base_references(rendered):
    secrets = [doc for doc in yaml.safe_load_all((DEPLOY / "k8s/secrets.example.yaml").read_text()) if doc]
    for secret in secrets:
        kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
    keys = {(secret["metadata"]["name"], key) for secret in secrets for key in secret["stringData"]}
    referenced = set()
    deployments = [d for overlay in ("cpu", "cpu-tls") for d in objects_of(rendered[overlay], "Deployment").values()]
    for deployment in deployments:
        spec = deployment["spec"]["template"]["spec"]
        for variable in container(deployment).get("env", []):
            if "valueFrom" in variable:
                ref = variable["valueFrom"]["secretKeyRef"]
                referenced.add((ref["name"], ref["key"]))
        referenced |= {(volume["secret"]["secretName"], None) for volume in spec.get("volumes", []) if "secret" in volume}
    for name, key in referenced:
        assert (name, key) in keys if key else any(found == name for found, _ in keys), f"secret {name}/{key} undocumented"
    for overlay in rendered:
        assert not objects_of(rendered[overlay], "Secret"), "no Secret (and so no secret value) is rendered from git"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_deployment_runs_a_genie_command_and_its_selector_matches_its_pods(rendered, overlay):
    deployments = objects_of(rendered[overlay], "Deployment")
    assert set(deployments) == {f"genie-{name}" for name in ("gateway", "jobs", "worker", *MODEL_SERVICES)}
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selects(deployment["spec"]["selector"]["matchLabels"], labels)
        assert service_of(command_of(deployment)) == name.removeprefix("genie-")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_services_pdbs_and_hpas_point_at_existing_deployments(rendered, overlay):
    objects = rendered[overlay]
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in objects_of(objects, "Deployment").items()}
    for kind in ("Service", "PodDisruptionBudget"):
        for name, item in objects_of(objects, kind).items():
            selector = item["spec"]["selector"].get("matchLabels", item["spec"]["selector"])
            chosen = [deployment for deployment, labels in pods.items() if selects(selector, labels)]
            assert chosen == [name.removesuffix(HEADLESS)], f"{kind} {name} selects {chosen}"
    for name, service in objects_of(objects, "Service").items():
        deployment = objects_of(objects, "Deployment")[name.removesuffix(HEADLESS)]
        ports = {port["name"] for port in container(deployment)["ports"]}
        assert {port["targetPort"] for port in service["spec"]["ports"]} <= ports
    for hpa in objects_of(objects, "HorizontalPodAutoscaler").values():
        assert hpa["spec"]["scaleTargetRef"]["name"] in pods


def test_gateway_probes_ports_and_scrape_annotation_agree_with_its_settings(rendered, monkeypatch):
    objects = rendered["cpu"]
    gateway = objects_of(objects, "Deployment")["genie-gateway"]
    settings = settings_from_env(environment(objects, gateway), monkeypatch)[GatewaySettings]
    spec = container(gateway)
    assert settings.host == "0.0.0.0" and settings.backend == "triton" and settings.world_store == "redis"
    assert spec["readinessProbe"]["grpc"]["port"] == spec["livenessProbe"]["grpc"]["port"] == settings.port
    assert {port["containerPort"] for port in spec["ports"]} == {settings.port, settings.metrics_port}
    assert gateway["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(settings.metrics_port)
    grace = gateway["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.shutdown_grace_s, "Kubernetes must not SIGKILL before in-flight steps finish"


def test_job_service_and_worker_ports_agree_with_their_settings(rendered, monkeypatch):
    objects = rendered["cpu"]
    deployments = objects_of(objects, "Deployment")
    jobs = settings_from_env(environment(objects, deployments["genie-jobs"]), monkeypatch)[JobsSettings]
    spec = container(deployments["genie-jobs"])
    assert spec["readinessProbe"]["grpc"]["port"] == jobs.port
    assert deployments["genie-jobs"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == \
        str(jobs.metrics_port)
    worker = settings_from_env(environment(objects, deployments["genie-worker"]), monkeypatch)[WorkerSettings]
    ports = {port["name"]: port["containerPort"] for port in container(deployments["genie-worker"])["ports"]}
    assert ports["metrics"] == worker.metrics_port
    assert deployments["genie-worker"]["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == \
        str(worker.metrics_port)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_env_names_are_settings_fields_of_the_service_that_reads_them(rendered, overlay):
    objects = rendered[overlay]
    for name, deployment in objects_of(objects, "Deployment").items():
        prefixes = PREFIXES_BY_SERVICE[service_of(command_of(deployment))]
        for variable in environment(objects, deployment):
            assert variable.startswith(prefixes), f"{name} gets {variable}, which it never reads"
            settings_field(variable)


@pytest.mark.parametrize("kind", MODEL_SERVICES)
def test_model_service_probes_and_gateway_endpoint_use_its_grpc_port_and_model_name(rendered, kind, monkeypatch):
    objects = rendered["cpu"]
    deployment = objects_of(objects, "Deployment")[f"genie-{kind}"]
    args = command_of(deployment)
    spec = container(deployment)
    for probe in ("startupProbe", "readinessProbe"):
        assert spec[probe]["grpc"]["port"] == args.grpc_port
    # Liveness runs the probe module against the same port (a hang is invisible to tritonserver's health service).
    command = spec["livenessProbe"]["exec"]["command"]
    assert command[:3] == ["python", "-m", "services.triton.probe"] and importlib.util.find_spec(command[2])
    assert int(command[command.index("--grpc-port") + 1]) == args.grpc_port
    assert float(command[command.index("--timeout-s") + 1]) < spec["livenessProbe"]["timeoutSeconds"]
    assert deployment["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] == str(args.metrics_port)
    gateway = settings_from_env(environment(objects, objects_of(objects, "Deployment")["genie-gateway"]), monkeypatch)
    endpoint = gateway[GatewaySettings].triton_endpoints[args.model_name][kind]
    host, port = endpoint.split(":")
    service = objects_of(objects, "Service")[host]
    assert int(port) in {p["port"] for p in service["spec"]["ports"] if p["targetPort"] == "grpc"}
    mounts = {mount["mountPath"] for mount in spec["volumeMounts"]}
    assert "/dev/shm" in mounts and str(args.checkpoint).startswith(tuple(mounts))


def test_gateway_discovers_each_dynamics_pod_through_a_headless_service(rendered, monkeypatch):
    objects = rendered["cpu"]
    gateway = settings_from_env(environment(objects, objects_of(objects, "Deployment")["genie-gateway"]),
                                monkeypatch)[GatewaySettings]
    assert gateway.discovery == "dns"
    host = gateway.triton_endpoints["world"]["dynamics"].split(":")[0]
    assert host == "genie-dynamics" + HEADLESS and objects_of(objects, "Service")[host]["spec"]["clusterIP"] == "None"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_only_the_gateway_reaches_the_model_services(rendered, overlay):
    objects = rendered[overlay]
    pods = {name: d["spec"]["template"]["metadata"]["labels"] for name, d in objects_of(objects, "Deployment").items()}
    policy = objects_of(objects, "NetworkPolicy")["genie-model-services"]
    guarded = {name for name, labels in pods.items() if selects(policy["spec"]["podSelector"]["matchLabels"], labels)}
    assert guarded == {f"genie-{kind}" for kind in MODEL_SERVICES}
    grpc_rules = [rule for rule in policy["spec"]["ingress"] if {"port": 8001, "protocol": "TCP"} in rule["ports"]]
    (rule,) = grpc_rules
    allowed = {name for name, labels in pods.items()
               for peer in rule["from"] if selects(peer["podSelector"]["matchLabels"], labels)}
    assert allowed == {"genie-gateway"}
    assert all("namespaceSelector" not in peer for peer in rule["from"]), "no pod of another namespace"


def test_gpu_overlay_gives_model_services_and_workers_a_gpu_cuda_and_shared_memory(rendered):
    gpu, cpu = objects_of(rendered["gpu"], "Deployment"), objects_of(rendered["cpu"], "Deployment")
    for kind in MODEL_SERVICES:
        spec = container(gpu[f"genie-{kind}"])
        assert spec["resources"]["limits"]["nvidia.com/gpu"] == 1
        assert command_of(gpu[f"genie-{kind}"]).device == "cuda"
        assert spec["image"].endswith("-gpu")
        volumes = {v["name"]: v for v in gpu[f"genie-{kind}"]["spec"]["template"]["spec"]["volumes"]}
        dshm = [m["name"] for m in spec["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[dshm[0]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "2Gi"}
        assert command_of(cpu[f"genie-{kind}"]).device == "cpu"
    assert container(gpu["genie-worker"])["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "nvidia.com/gpu" not in json.dumps(rendered["cpu"])
    assert "nvidia.com/gpu" not in json.dumps(gpu["genie-gateway"]), "the gateway needs no GPU"
