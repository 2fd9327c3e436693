"""CLI of training jobs: `genie serve jobs`, `genie jobs submit|get|watch|list|cancel`, `genie worker`,
`genie datasets upload` and `genie models list|publish|delete`. Registered by services.cli.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

DEFAULT_ADDRESS = "127.0.0.1:50061"


def register(subparsers: argparse._SubParsersAction, serve_sub: argparse._SubParsersAction) -> None:
    from services.cli import add_caller_options  # services.cli calls this register: no import cycle at load

    serve = serve_sub.add_parser("jobs", help="the genie.v1 JobService (GENIE_JOBS_*, store: GENIE_STORE_*)")
    serve.add_argument("--port", type=int, help="gRPC port (overrides GENIE_JOBS_PORT)")
    serve.add_argument("--metrics-port", type=int, help="Prometheus port (overrides GENIE_JOBS_METRICS_PORT)")
    serve.set_defaults(handler=_serve_jobs)

    worker = subparsers.add_parser("worker", help="a training worker (Celery; GENIE_WORKER_*, GENIE_STORE_*)")
    worker.add_argument("--concurrency", type=int, help="stages at once (overrides GENIE_WORKER_CONCURRENCY)")
    worker.set_defaults(handler=_worker)
    _register_pod_stage(worker.add_subparsers(dest="worker_command"))

    jobs = subparsers.add_parser(
        "jobs", help="submit and follow training jobs",
        description="Talks to the job service (genie serve jobs). Each call carries your API key: a job belongs to "
        "the key that submitted it, and other keys neither see nor cancel it. submit and cancel need a key with the "
        "train scope, get/watch/list the read scope. No key or an unknown one: UNAUTHENTICATED (exit 2).")
    jobs.add_argument("--address", default=DEFAULT_ADDRESS, help="job service host:port")
    add_caller_options(jobs, "job service")
    jobs_sub = jobs.add_subparsers(dest="jobs_command", required=True)
    submit = jobs_sub.add_parser("submit", help="train a world from a dataset in the store and publish it")
    submit.add_argument("--dataset", required=True, help="dataset name (genie datasets upload DIR --name NAME)")
    submit.add_argument("--preset", default="tiny", help="tiny or coinrun")
    submit.add_argument("--model-name", default="", help="publish as this model (default: the dataset name)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override, e.g. tokenizer_steps=100 (repeatable)")
    submit.add_argument("--watch", action="store_true", help="follow the job with a progress bar")
    submit.set_defaults(handler=_submit)
    for name, text in (("get", "one job as JSON"), ("watch", "follow a job with a progress bar until it ends"),
                       ("cancel", "stop a job (its last checkpoint stays in the store)")):
        command = jobs_sub.add_parser(name, help=text)
        command.add_argument("job_id")
        command.set_defaults(handler=_watch if name == "watch" else _get_or_cancel)
    listing = jobs_sub.add_parser("list", help="recent jobs, newest first")
    listing.add_argument("--limit", type=int, default=20)
    listing.set_defaults(handler=_list)
    _register_launch_k8s(jobs_sub)

    datasets = subparsers.add_parser("datasets", help="video datasets in the store (GENIE_STORE_*)")
    datasets_sub = datasets.add_subparsers(dest="datasets_command", required=True)
    upload = datasets_sub.add_parser("upload", help="upload a folder of videos (mp4, webm, mkv, avi, mov, gif)")
    upload.add_argument("src", type=Path)
    upload.add_argument("--name", required=True)
    upload.set_defaults(handler=_upload)

    models = subparsers.add_parser("models", help="published model versions in the store (GENIE_STORE_*)")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="models and their versions").set_defaults(handler=_models_list)
    publish = models_sub.add_parser("publish", help="publish a trained world directory as NAME's next version "
                                    "(gateways serving NAME give it to new worlds within seconds)")
    publish.add_argument("name")
    publish.add_argument("checkpoint", type=Path, help="trained world directory (safetensors + manifest)")
    publish.set_defaults(handler=_models_publish)
    delete = models_sub.add_parser("delete", help="delete one version: NAME@VERSION")
    delete.add_argument("ref")
    delete.set_defaults(handler=_models_delete)


def _register_launch_k8s(jobs_sub: argparse._SubParsersAction) -> None:
    launch = jobs_sub.add_parser(
        "launch-k8s", help="run a job's training stage on Kubernetes: an indexed Job of torchrun nodes",
        description="Prints the manifests (a headless Service and an indexed Job) of one training stage of a job, "
                    "or creates them with --submit (kubeconfig or in-cluster credentials). Run the tokenizer stage, "
                    "then the dynamics stage with the same --job-id.")
    launch.add_argument("--dataset", required=True, help="dataset name in the store")
    launch.add_argument("--preset", default="coinrun", help="tiny or coinrun")
    launch.add_argument("--model-name", default="")
    launch.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override (repeatable)")
    launch.add_argument("--stage", choices=("tokenizer", "dynamics"), default="tokenizer")
    launch.add_argument("--job-id", default=None, help="the job's id (default: a new one); its files in the store")
    launch.add_argument("--image", required=True, help="the worker image (deploy/docker/worker.Dockerfile)")
    launch.add_argument("--nodes", type=int, default=2, help="pods, one per node")
    launch.add_argument("--gpus-per-node", type=int, default=0, help="GPUs (= processes) per pod; 0: CPU")
    launch.add_argument("--cpu-processes-per-node", type=int, default=1, help="processes per pod without GPUs")
    launch.add_argument("--namespace", default="genie")
    launch.add_argument("--submit", dest="dry_run", action="store_false",
                        help="create the objects in the cluster (default: --dry-run, print them as YAML)")
    launch.add_argument("--dry-run", dest="dry_run", action="store_true", default=True)
    launch.set_defaults(handler=_launch_k8s)


def _launch_k8s(args: argparse.Namespace) -> None:
    import uuid

    import yaml

    from services.jobs.spec import InvalidJob, parse
    from services.worker.k8s_job import Cluster, submit, training_job

    try:
        spec = parse(args.dataset, args.preset, _pairs(args.set), args.model_name)
    except InvalidJob as error:
        raise SystemExit(f"genie jobs launch-k8s: error: {error}") from None
    cluster = Cluster(image=args.image, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                      cpu_processes_per_node=args.cpu_processes_per_node, namespace=args.namespace)
    manifests = training_job(spec, args.job_id or uuid.uuid4().hex[:12], args.stage, cluster)
    if args.dry_run:
        print(yaml.safe_dump_all(manifests, sort_keys=False), end="")
        return
    from kubernetes.config import ConfigException

    try:
        print("\n".join(submit(manifests, args.namespace)))
    except ConfigException as error:
        raise SystemExit(f"genie jobs launch-k8s: error: no cluster to submit to ({error}); give a kubeconfig "
                         "(~/.kube/config or $KUBECONFIG) or run inside the cluster, or print the manifests "
                         "with --dry-run") from None


def _register_pod_stage(worker_sub: argparse._SubParsersAction) -> None:
    for name, text in (("stage-in", "pull a job's data and checkpoints into a pod (the launch-k8s init container)"),
                       ("stage-out", "push new checkpoints until SIGTERM (the launch-k8s sidecar)")):
        command = worker_sub.add_parser(name, help=text)
        command.add_argument("--job-id", required=True)
        command.add_argument("--stage", choices=("tokenizer", "dynamics"), required=True)
        command.add_argument("--dir", type=Path, required=True, help="the pod's scratch directory for the job")
        if name == "stage-in":
            command.add_argument("--dataset", required=True)
            command.add_argument("--preset", required=True)
            command.add_argument("--seed", type=int, default=0)
        command.set_defaults(handler=_pod_stage)


def _pod_stage(args: argparse.Namespace) -> None:
    from services.logs import configure_logging
    from services.settings import StoreSettings, WorkerSettings
    from services.stores.base import open_store
    from services.worker.pod_stage import stage_in, stage_out

    settings = WorkerSettings()
    configure_logging(settings.log_level)
    store = open_store(StoreSettings())
    if args.worker_command == "stage-in":
        stage_in(store, args.job_id, args.dataset, args.preset, args.stage, args.dir, args.seed,
                 settings.keep_checkpoints)
    else:
        stage_out(store, args.job_id, args.stage, args.dir, keep=settings.keep_checkpoints)


def _pairs(items: list[str]) -> dict[str, str]:
    pairs = [item.split("=", 1) for item in items]
    if any(len(pair) != 2 for pair in pairs):
        raise SystemExit(f"--set takes KEY=VALUE, got {items}")
    return dict(pairs)


def _serve_jobs(args: argparse.Namespace) -> None:
    from services.jobs.server import serve
    from services.logs import configure_logging
    from services.settings import JobsSettings, StoreSettings

    settings = JobsSettings()
    overrides = {key: value for key, value in (("port", args.port), ("metrics_port", args.metrics_port))
                 if value is not None}
    settings = settings.model_copy(update=overrides) if overrides else settings
    configure_logging(settings.log_level)
    serve(settings, StoreSettings())


def _worker(args: argparse.Namespace) -> None:
    from services.settings import StoreSettings, WorkerSettings
    from services.worker.main import run_worker

    settings = WorkerSettings()
    if args.concurrency:
        settings = settings.model_copy(update={"concurrency": args.concurrency})
    run_worker(settings, StoreSettings())


def _stub(args: argparse.Namespace):
    from genie.v1 import jobs_pb2_grpc
    from services.client import api_key_from, open_channel

    channel = open_channel(args.address, api_key_from(args.api_key_file), args.ca_file)
    return channel, jobs_pb2_grpc.JobServiceStub(channel)


def _job_json(job) -> str:
    from google.protobuf.json_format import MessageToJson

    return MessageToJson(job, preserving_proto_field_name=True, indent=None)


def _rpc(function, *args):
    from services.client import cli_errors

    with cli_errors("genie jobs"):
        return function(*args)


def _watch_updates(stub, job_id: str):
    """WatchJob's updates; a status that ends the stream (e.g. UNAUTHENTICATED, NOT_FOUND) exits as _rpc does."""
    from genie.v1 import jobs_pb2 as pb
    from services.client import cli_errors

    with cli_errors("genie jobs"):
        yield from stub.WatchJob(pb.WatchJobRequest(job_id=job_id))


def _submit(args: argparse.Namespace) -> None:
    from genie.v1 import jobs_pb2 as pb

    overrides = _pairs(args.set)
    channel, stub = _stub(args)
    with channel:
        job = _rpc(stub.SubmitJob, pb.SubmitJobRequest(dataset=args.dataset, preset=args.preset,
                                                       model_name=args.model_name, overrides=overrides))
        print(job.job_id, flush=True)
        if args.watch:
            _follow(stub, job.job_id)


def _get_or_cancel(args: argparse.Namespace) -> None:
    from genie.v1 import jobs_pb2 as pb

    channel, stub = _stub(args)
    with channel:
        if args.jobs_command == "get":
            job = _rpc(stub.GetJob, pb.GetJobRequest(job_id=args.job_id))
        else:
            job = _rpc(stub.CancelJob, pb.CancelJobRequest(job_id=args.job_id))
        print(_job_json(job))


def _watch(args: argparse.Namespace) -> None:
    channel, stub = _stub(args)
    with channel:
        _follow(stub, args.job_id)


def _follow(stub, job_id: str) -> None:
    """A tqdm bar per stage (steps, losses, frames/s, ETA); exits 0 only if the job succeeds."""
    from tqdm import tqdm

    from genie.v1 import jobs_pb2 as pb

    bar, stage, job = None, None, None
    for job in _watch_updates(stub, job_id):
        if job.stage != stage:
            if bar is not None:
                bar.close()
            stage = job.stage
            bar = tqdm(desc=pb.JobStage.Name(stage).removeprefix("JOB_STAGE_").lower(), unit="step",
                       dynamic_ncols=True)
        if job.total_steps and bar.total != job.total_steps:
            bar.reset(total=job.total_steps)
        bar.n = job.step
        bar.set_postfix({**{k: f"{v:.4g}" for k, v in sorted(job.losses.items())[:3]},
                         "frames/s": f"{job.frames_per_second:.0f}", "eta": f"{job.eta_seconds:.0f}s"}, refresh=False)
        bar.refresh()
    if bar is not None:
        bar.close()
    state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower() if job else "unknown"
    print(f"{job_id}: {state}" + (f" ({job.error})" if job and job.error else "")
          + (f", model {job.model_name}@{job.model_version}" if job and job.model_version else ""))
    if not job or job.state != pb.JOB_STATE_SUCCEEDED:
        raise SystemExit(1)


def _list(args: argparse.Namespace) -> None:
    from genie.v1 import jobs_pb2 as pb

    channel, stub = _stub(args)
    with channel:
        for job in _rpc(stub.ListJobs, pb.ListJobsRequest(limit=args.limit)).jobs:
            state = pb.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
            stage = pb.JobStage.Name(job.stage).removeprefix("JOB_STAGE_").lower()
            print(f"{job.job_id}  {state:<9}  {stage:<9}  {job.step}/{job.total_steps}  {job.dataset} -> "
                  f"{job.model_name}{'@' + job.model_version if job.model_version else ''}  {job.error}")


def _upload(args: argparse.Namespace) -> None:
    from services.settings import StoreSettings
    from services.stores.base import open_store
    from services.stores.datasets import upload_videos

    keys = upload_videos(open_store(StoreSettings()), args.src, args.name)
    print(json.dumps({"dataset": args.name, "videos": len(keys)}))


def _catalog():
    from services.settings import StoreSettings
    from services.stores.base import open_store
    from services.stores.catalog import ModelCatalog

    return ModelCatalog(open_store(StoreSettings()))


def _models_list(args: argparse.Namespace) -> None:
    catalog = _catalog()
    print(json.dumps({name: {"versions": catalog.versions(name), "latest": catalog.resolve(name).version}
                      for name in catalog.models()}))


def _models_publish(args: argparse.Namespace) -> None:
    print(_catalog().publish(args.name, args.checkpoint).ref)


def _models_delete(args: argparse.Namespace) -> None:
    print(_catalog().delete(args.ref).ref)
