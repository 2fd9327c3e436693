"""A training stage of a job as a Kubernetes indexed Job running `torchrun` across nodes.

One pod per node (completionMode Indexed); a headless Service gives pod i the stable name
`<job>-<i>.<service>`, so every node's torchrun meets at pod 0 (static rendezvous: node rank = completion
index, so global rank 0, the checkpoint writer, runs on pod 0). Each pod: an init container pulls the data
and the stage's newest checkpoints from the store (`genie worker stage-in`), a sidecar pushes new ones
(`genie worker stage-out`), and the trainer runs `torchrun ... -m genie_models.cli train <stage>`.
Settings and secrets are the ones deploy/k8s gives the Celery worker (genie-store ConfigMap,
genie-store-credentials Secret).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kubernetes import client

from services.jobs.spec import JobSpec

RENDEZVOUS_PORT = 29500
SCRATCH = "/var/lib/genie/job"
STORE_CREDENTIALS = "/etc/genie/store"
STAGES = ("tokenizer", "dynamics")
# Job overrides (services/jobs/spec.py) -> `genie train <stage>` flags.
FLAGS = {"batch_size": "--batch-size", "checkpoint_every": "--checkpoint-every", "seed": "--seed"}
STEPS = {"tokenizer": {"tokenizer_steps": "--steps"},
         "dynamics": {"dynamics_steps": "--steps", "lam_steps": "--lam-steps"}}


@dataclass(frozen=True)
class Cluster:
    """Where and how big: nodes x processes per node (GPUs per node, or CPU processes when gpus_per_node=0)."""

    image: str
    nodes: int = 2
    gpus_per_node: int = 0
    cpu_processes_per_node: int = 1
    namespace: str = "genie"
    cpu: str = "4"
    memory: str = "16Gi"
    backoff_limit: int = 3

    @property
    def processes_per_node(self) -> int:
        return self.gpus_per_node or self.cpu_processes_per_node


def job_name(job_id: str, stage: str) -> str:
    """A DNS label short enough for the pods' hostnames (`<name>-<index>`)."""
    name = re.sub(r"[^a-z0-9-]+", "-", f"genie-{stage}-{job_id}".lower()).strip("-")
    return name[:50].rstrip("-")


def trainer_command(spec: JobSpec, stage: str, cluster: Cluster, name: str) -> list[str]:
    """The torchrun command line of every pod; $(NODE_RANK) is expanded by Kubernetes from the pod's index."""
    launch = ["torchrun", f"--nnodes={cluster.nodes}", f"--nproc-per-node={cluster.processes_per_node}",
              "--node-rank=$(NODE_RANK)", "--rdzv-backend=static", f"--rdzv-id={name}",
              f"--rdzv-endpoint={name}-0.{name}:{RENDEZVOUS_PORT}", "-m", "genie_models.cli"]
    train = ["train", stage, "--data", f"{SCRATCH}/data", "--run-dir", f"{SCRATCH}/runs/{stage}",
             "--preset", spec.preset, "--device", "cuda" if cluster.gpus_per_node else "cpu"]
    if stage == "dynamics":
        train += ["--tokenizer", f"{SCRATCH}/runs/tokenizer"]
    for key, value in sorted(spec.overrides.items()):
        if flag := (FLAGS | STEPS[stage]).get(key):
            train += [flag, str(value)]
    return launch + train


def training_job(spec: JobSpec, job_id: str, stage: str, cluster: Cluster) -> list[dict]:
    """The headless Service and the indexed Job of one stage, as plain manifests (dicts)."""
    if stage not in STAGES:
        raise ValueError(f"stage {stage!r} does not run under torchrun; use one of {', '.join(STAGES)}")
    name = job_name(job_id, stage)
    labels = {"app.kubernetes.io/name": "genie", "app.kubernetes.io/component": "training",
              "genie.dev/training-job": name}
    service = client.V1Service(
        api_version="v1", kind="Service", metadata=client.V1ObjectMeta(name=name, namespace=cluster.namespace,
                                                                       labels=labels),
        spec=client.V1ServiceSpec(cluster_ip="None", selector=labels, publish_not_ready_addresses=True,
                                  ports=[client.V1ServicePort(name="rendezvous", port=RENDEZVOUS_PORT)]))
    job = client.V1Job(
        api_version="batch/v1", kind="Job", metadata=client.V1ObjectMeta(name=name, namespace=cluster.namespace,
                                                                         labels=labels),
        spec=client.V1JobSpec(
            completion_mode="Indexed", completions=cluster.nodes, parallelism=cluster.nodes,
            backoff_limit=cluster.backoff_limit, ttl_seconds_after_finished=7 * 24 * 3600,
            template=client.V1PodTemplateSpec(metadata=client.V1ObjectMeta(labels=labels),
                                              spec=_pod(spec, job_id, stage, cluster, name))))
    return [client.ApiClient().sanitize_for_serialization(item) for item in (service, job)]


def _pod(spec: JobSpec, job_id: str, stage: str, cluster: Cluster, name: str) -> client.V1PodSpec:
    sync = ["--job-id", job_id, "--stage", stage, "--dir", SCRATCH]
    stage_in = _container("stage-in", cluster, ["genie", "worker", "stage-in", *sync, "--dataset", spec.dataset,
                                                 "--preset", spec.preset, "--seed", str(spec.overrides.get("seed", 0))])
    stage_out = _container("stage-out", cluster, ["genie", "worker", "stage-out", *sync])
    stage_out.restart_policy = "Always"  # a native sidecar: runs beside the trainer, stopped after it
    trainer = _container("trainer", cluster, trainer_command(spec, stage, cluster, name))
    index = "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    trainer.env = [client.V1EnvVar(name="NODE_RANK", value_from=client.V1EnvVarSource(
        field_ref=client.V1ObjectFieldSelector(field_path=index)))]
    trainer.ports = [client.V1ContainerPort(name="rendezvous", container_port=RENDEZVOUS_PORT)]
    trainer.volume_mounts.append(client.V1VolumeMount(name="dshm", mount_path="/dev/shm"))
    limits = {"memory": cluster.memory} | ({"nvidia.com/gpu": str(cluster.gpus_per_node)} if cluster.gpus_per_node
                                           else {})
    trainer.resources = client.V1ResourceRequirements(requests={"cpu": cluster.cpu, "memory": cluster.memory},
                                                      limits=limits)
    return client.V1PodSpec(
        subdomain=name, restart_policy="Never", termination_grace_period_seconds=120,
        security_context=client.V1PodSecurityContext(run_as_non_root=True, run_as_user=10001),
        init_containers=[stage_in, stage_out], containers=[trainer],
        tolerations=[client.V1Toleration(key="nvidia.com/gpu", operator="Exists", effect="NoSchedule")]
        if cluster.gpus_per_node else None,
        volumes=[client.V1Volume(name="store-credentials",
                                 secret=client.V1SecretVolumeSource(secret_name="genie-store-credentials")),
                 client.V1Volume(name="scratch", empty_dir=client.V1EmptyDirVolumeSource(size_limit="100Gi")),
                 client.V1Volume(name="dshm", empty_dir=client.V1EmptyDirVolumeSource(medium="Memory",
                                                                                      size_limit="8Gi"))])


def _container(name: str, cluster: Cluster, command: list[str]) -> client.V1Container:
    return client.V1Container(
        name=name, image=cluster.image, command=command,
        env_from=[client.V1EnvFromSource(config_map_ref=client.V1ConfigMapEnvSource(name="genie-store"))],
        volume_mounts=[client.V1VolumeMount(name="store-credentials", mount_path=STORE_CREDENTIALS, read_only=True),
                       client.V1VolumeMount(name="scratch", mount_path="/var/lib/genie")])


def submit(manifests: list[dict], namespace: str) -> list[str]:
    """Create the manifests with the kubeconfig's (or the in-cluster) credentials; returns what was created."""
    from kubernetes import config

    try:
        config.load_kube_config()
    except config.ConfigException:
        config.load_incluster_config()
    api = client.ApiClient()
    created = []
    for manifest in manifests:
        if manifest["kind"] == "Service":
            client.CoreV1Api(api).create_namespaced_service(namespace, manifest)
        else:
            client.BatchV1Api(api).create_namespaced_job(namespace, manifest)
        created.append(f"{manifest['kind'].lower()}/{manifest['metadata']['name']}")
    return created
