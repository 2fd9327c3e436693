"""`genie jobs launch-k8s`: the indexed Job + headless Service of a training stage validate against the
Kubernetes schemas, their commands parse with torchrun's and genie's own parsers, they use the store settings
and secrets deploy/k8s defines, and the pod-side stage-in/stage-out move real files through a real store."""

from __future__ import annotations

import threading

import kubernetes_validate
import numpy as np
import pytest
import torch
import yaml
from torch.distributed.run import get_args_parser

from genie_models.checkpoints import latest_checkpoint, save_run_checkpoint
from genie_models.cli import build_parser, main
from genie_models.data.shards import EpisodeWriter
from services.jobs.spec import parse
from services.stores.local import LocalStore
from services.stores.runs import RunSync
from services.stores.transfer import put_tree
from services.worker.k8s_job import RENDEZVOUS_PORT, Cluster, job_name, training_job
from services.worker.pod_stage import stage_in, stage_out
from tests.deploy.helpers import parse_command, render
from tests.deploy.test_kubernetes import KUBERNETES_VERSION

SPEC = parse("platformer", "coinrun", {"tokenizer_steps": "1000", "dynamics_steps": "500", "batch_size": "48",
                                       "seed": "3", "eval_clips": "8"}, "")
GPU = Cluster(image="registry.example/genie-worker:1", nodes=3, gpus_per_node=8)
CPU = Cluster(image="genie-worker", nodes=2, cpu_processes_per_node=2)


def pod(manifests: list[dict]) -> dict:
    return next(item for item in manifests if item["kind"] == "Job")["spec"]["template"]["spec"]


def containers(manifests: list[dict]) -> dict[str, dict]:
    spec = pod(manifests)
    return {c["name"]: c for c in spec["initContainers"] + spec["containers"]}


@pytest.mark.parametrize("stage", ["tokenizer", "dynamics"])
@pytest.mark.parametrize("cluster", [GPU, CPU], ids=["gpu", "cpu"])
def test_manifests_validate_against_the_kubernetes_schemas(cluster, stage):
    manifests = training_job(SPEC, "Job42", stage, cluster)
    assert [item["kind"] for item in manifests] == ["Service", "Job"]
    for item in manifests:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("cluster", [GPU, CPU], ids=["gpu", "cpu"])
def test_an_indexed_job_whose_pods_meet_at_pod_zero_through_the_headless_service(cluster):
    service, job = training_job(SPEC, "job42", "tokenizer", cluster)
    name = job_name("job42", "tokenizer")
    assert service["metadata"]["name"] == job["metadata"]["name"] == name and len(f"{name}-99") <= 63
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"]
    template_labels = job["spec"]["template"]["metadata"]["labels"]
    assert all(template_labels.get(key) == value for key, value in service["spec"]["selector"].items())
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == cluster.nodes
    assert job["spec"]["template"]["spec"]["subdomain"] == name  # pod i is <name>-i.<name>

    trainer = containers([service, job])["trainer"]
    [node_rank] = [env for env in trainer["env"] if env["name"] == "NODE_RANK"]
    assert node_rank["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    command = [part.replace("$(NODE_RANK)", "2") for part in trainer["command"]]  # as Kubernetes expands it
    assert command[0] == "torchrun"
    torchrun = get_args_parser().parse_args(command[1:])
    assert (torchrun.nnodes, torchrun.nproc_per_node, torchrun.node_rank) == (str(cluster.nodes),
                                                                               str(cluster.processes_per_node), 2)
    assert torchrun.rdzv_backend == "static" and torchrun.rdzv_endpoint == f"{name}-0.{name}:{RENDEZVOUS_PORT}"
    assert torchrun.module and torchrun.training_script == "genie_models.cli"
    assert trainer["ports"] == [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT}]


def test_the_trainer_runs_genie_train_with_the_jobs_overrides_and_its_gpus():
    trainer = containers(training_job(SPEC, "job42", "dynamics", GPU))["trainer"]
    torchrun = get_args_parser().parse_args([part.replace("$(NODE_RANK)", "0") for part in trainer["command"][1:]])
    train = build_parser().parse_args(torchrun.training_script_args)
    assert (train.command, train.stage, train.preset, train.device) == ("train", "dynamics", "coinrun", "cuda")
    assert (train.steps, train.batch_size, train.seed) == (500, 48, 3)  # dynamics_steps, not tokenizer_steps
    assert str(train.tokenizer) == "/var/lib/genie/job/runs/tokenizer" and str(train.data) == "/var/lib/genie/job/data"
    assert trainer["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert pod(training_job(SPEC, "job42", "dynamics", GPU))["tolerations"][0]["key"] == "nvidia.com/gpu"
    cpu_trainer = containers(training_job(SPEC, "job42", "tokenizer", CPU))["trainer"]
    assert "nvidia.com/gpu" not in cpu_trainer["resources"]["limits"] and "--device" in cpu_trainer["command"]
    assert cpu_trainer["command"][cpu_trainer["command"].index("--device") + 1] == "cpu"


def test_stage_containers_run_genie_commands_with_the_store_settings_deploy_k8s_defines():
    rendered = render("cpu")
    configmaps = {item["metadata"]["name"]: item for item in rendered if item["kind"] == "ConfigMap"}
    worker = next(item for item in rendered if item["metadata"]["name"] == "genie-worker")
    worker_secrets = {volume["secret"]["secretName"] for volume in worker["spec"]["template"]["spec"]["volumes"]
                      if "secret" in volume}
    manifests = training_job(SPEC, "job42", "tokenizer", CPU)
    spec = pod(manifests)
    assert {volume["secret"]["secretName"] for volume in spec["volumes"] if "secret" in volume} <= worker_secrets
    sidecar = containers(manifests)["stage-out"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar, stopped (SIGTERM) after the trainer
    for name, container in containers(manifests).items():
        assert [source["configMapRef"]["name"] for source in container["envFrom"]] == ["genie-store"]
        assert "genie-store" in configmaps
        mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
        credentials = configmaps["genie-store"]["data"]["GENIE_STORE_S3_CREDENTIALS_FILE"]
        assert any(credentials.startswith(path + "/") for path in mounts), name
        if name != "trainer":
            args = parse_command(container["command"])
            assert (args.command, args.worker_command, args.job_id, args.stage) == \
                ("worker", name, "job42", "tokenizer")


def test_launch_k8s_prints_valid_manifests_and_refuses_a_bad_override(capsys):
    main(["jobs", "launch-k8s", "--dataset", "platformer", "--image", "genie-worker:1", "--nodes", "4",
          "--gpus-per-node", "2", "--set", "tokenizer_steps=10", "--job-id", "abc"])
    manifests = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [item["kind"] for item in manifests] == ["Service", "Job"] and manifests[1]["spec"]["completions"] == 4
    for item in manifests:
        kubernetes_validate.validate(item, KUBERNETES_VERSION, strict=True)
    with pytest.raises(SystemExit, match="unknown override 'steps'"):
        main(["jobs", "launch-k8s", "--dataset", "platformer", "--image", "x", "--set", "steps=10"])


def test_stage_in_pulls_data_and_checkpoints_and_stage_out_pushes_new_ones(tmp_path):
    store = LocalStore(tmp_path / "store")
    data = tmp_path / "ingested"
    with EpisodeWriter(data, source="test", frame_size=8) as writer:
        writer.add_episode(np.zeros((4, 8, 8, 3), dtype=np.uint8), np.zeros(3, dtype=np.int16), "train")
    put_tree(store, data, "jobs/j1/data", last="index.json")
    stored_run = tmp_path / "elsewhere"
    save_run_checkpoint(stored_run, {"tokenizer": {"w": torch.ones(3)}}, {}, 5, kind="t")
    RunSync(store, stored_run, "jobs/j1/runs/tokenizer").push()

    pod_dir = tmp_path / "pod"
    stage_in(store, "j1", "unused", "tiny", "tokenizer", pod_dir)
    assert (pod_dir / "data/index.json").is_file()
    assert latest_checkpoint(pod_dir / "runs/tokenizer").name == "step-00000005"  # resumes there

    save_run_checkpoint(pod_dir / "runs/tokenizer", {"tokenizer": {"w": torch.zeros(3)}}, {}, 9,
                        kind="t")
    stop = threading.Event()
    stop.set()  # as after SIGTERM: one last push
    assert stage_out(store, "j1", "tokenizer", pod_dir, every_s=0, stop=stop) == 1
    assert RunSync(store, tmp_path / "again", "jobs/j1/runs/tokenizer").latest_stored() == "step-00000009"
    assert stage_out(store, "j1", "tokenizer", pod_dir, every_s=0, stop=stop) == 0  # nothing new
