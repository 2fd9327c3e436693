"""A version published to the model catalog (on a real SeaweedFS S3 server) reaches new worlds without a restart,
while worlds already playing keep theirs until they close; on both backends (the triton one with real services).

8 worlds play on version 1, version 2 is published, and they step on bit-identically to twins that never saw
the publish; a new world plays version 2; `name@1` still works; once the last version-1 world closes, version 1
is unloaded (gateway listing and metric, and the backend itself: the in-process models or the Triton models).
"""

from __future__ import annotations

import contextlib
import secrets
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc
from services.gateway.server import GatewayRuntime
from services.stores.catalog import ModelCatalog
from services.triton import protocol
from tests.services.conftest import gateway_settings, tiny_world_model
from services.triton.client import ServiceClient
from services.triton.stack import ServicePorts, TritonService
from tests.services.catalog_harness import create_world as create, gateway_process, open_catalog, store_settings
from tests.services.helpers import MODEL_NAME, open_channel, pixels_of
from tests.services import jobs_servers
from tests.services.triton_stack import options_for_tests, running_stack

pytestmark = [pytest.mark.integration, pytest.mark.slow]
s3_server = jobs_servers.s3_server  # the suite's SeaweedFS fixture, used here

WORLDS = 8
ACTIONS = [1, 3, 0, 2, 1, 3]  # steps before the publish: the first half; after it: the second
POLL_S = 0.5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[int, Path]:
    """Version 1 is the suite's tiny world; version 2 the same shape from another seed (other weights)."""
    directories = {}
    for version, seed in ((1, 0), (2, 1)):
        directories[version] = tmp_path_factory.mktemp(f"world-v{version}")
        tiny_world_model(seed=seed).save(directories[version], step=version)
    return directories


@pytest.fixture
def catalog_environment(s3_server, tmp_path) -> dict[str, str]:
    """A fresh bucket per test, so each starts with nothing published."""
    return store_settings(s3_server, "versions-" + secrets.token_hex(4), tmp_path / "model-cache")


def step(stub, world_id: str, action: int) -> np.ndarray:
    return pixels_of(stub.StepWorld(pb.StepWorldRequest(world_id=world_id, action=action), timeout=60).frame)


def play(stub, world_ids: list[str], actions: list[int]) -> dict[str, list[np.ndarray]]:
    """Steps every world through actions, all worlds' steps of one round in flight at once (one batch)."""
    frames: dict[str, list[np.ndarray]] = {world_id: [] for world_id in world_ids}
    for action in actions:
        calls = {world_id: stub.StepWorld.future(pb.StepWorldRequest(world_id=world_id, action=action), timeout=60)
                 for world_id in world_ids}
        for world_id, call in calls.items():
            frames[world_id].append(pixels_of(call.result().frame))
    return frames


def listed(stub) -> pb.Model:
    [model] = [model for model in stub.ListModels(pb.ListModelsRequest()).models if model.name == MODEL_NAME]
    return model


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> float:
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout_s:
            raise AssertionError(f"{what}: not within {timeout_s} s")
        time.sleep(0.1)
    return time.monotonic() - started


def metric_lines(metrics_port: int) -> list[str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        return [line for line in response.read().decode().splitlines() if line.startswith("genie_model_")]


def loaded_metric(version: int) -> str:
    return f'genie_model_version_loaded{{model="{MODEL_NAME}",version="{version}"}} 1.0'


def status_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value.code(), error.value.details()


def publish_while_worlds_play(port: int, metrics_port: int, catalog: ModelCatalog, checkpoints: dict[int, Path],
                              backend_has: Callable[[int], bool], pickup_bound_s: float = 30) -> None:
    """The scenario, on a running gateway that serves MODEL_NAME from the catalog (version 1 published); a new
    version must reach new worlds within pickup_bound_s."""
    channel = open_channel(port)
    stub = world_pb2_grpc.WorldServiceStub(channel)
    with contextlib.closing(channel):
        wait_for(lambda: MODEL_NAME in [model.name for model in stub.ListModels(pb.ListModelsRequest()).models],
                 "version 1 loaded", timeout_s=120)
        model = listed(stub)
        assert (list(model.versions), model.latest_version, list(model.loaded_versions)) == ([1], 1, [1])

        # Twins: the same worlds played start to end before anything else is published.
        twins = [create(stub, seed) for seed in range(WORLDS)]
        twin_frames = play(stub, [twin.world.world_id for twin in twins], ACTIONS)
        for twin in twins:
            stub.CloseWorld(pb.CloseWorldRequest(world_id=twin.world.world_id))

        worlds = [create(stub, seed) for seed in range(WORLDS)]
        ids = [world.world.world_id for world in worlds]
        assert all(world.world.model_version == 1 for world in worlds)
        assert all(np.array_equal(pixels_of(world.frame), pixels_of(twin.frame)) for world, twin in zip(worlds, twins))
        before = play(stub, ids, ACTIONS[:3])

        catalog.publish(MODEL_NAME, checkpoints[2])
        took = wait_for(lambda: listed(stub).latest_version == 2, "version 2 served to new worlds", pickup_bound_s)
        print(f"version 2 reached new worlds after {took:.1f} s")
        assert list(listed(stub).loaded_versions) == [1, 2] and backend_has(1) and backend_has(2)
        assert loaded_metric(1) in metric_lines(metrics_port) and loaded_metric(2) in metric_lines(metrics_port)

        after = play(stub, ids, ACTIONS[3:])
        for index, world_id in enumerate(ids):  # bit-identical to a twin that never saw version 2
            assert all(np.array_equal(a, b) for a, b in zip(before[world_id] + after[world_id], twin_frames[twins[index].world.world_id]))
            assert stub.GetWorld(pb.GetWorldRequest(world_id=world_id)).model_version == 1

        newcomer = create(stub, seed=0)  # the bare name: the latest version now
        assert (newcomer.world.model, newcomer.world.model_version) == (MODEL_NAME, 2)
        new_frames = [step(stub, newcomer.world.world_id, action) for action in ACTIONS[:3]]
        old_frames = twin_frames[twins[0].world.world_id][:3]
        assert not all(np.array_equal(a, b) for a, b in zip(new_frames, old_frames)), "version 2 plays like 1"

        pinned = create(stub, seed=0, model=f"{MODEL_NAME}@1")  # an explicit older version, while loaded
        assert pinned.world.model_version == 1
        assert np.array_equal(step(stub, pinned.world.world_id, ACTIONS[0]), old_frames[0])

        code, details = status_of(lambda: create(stub, seed=0, model=f"{MODEL_NAME}@9"))
        assert code == grpc.StatusCode.NOT_FOUND and "no version 9" in details and "1, 2" in details
        code, details = status_of(lambda: create(stub, seed=0, model=f"{MODEL_NAME}@latest"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "name@N" in details

        for world_id in [*ids, pinned.world.world_id]:
            stub.CloseWorld(pb.CloseWorldRequest(world_id=world_id))
        wait_for(lambda: list(listed(stub).loaded_versions) == [2], "version 1 unloaded after its last world")
        wait_for(lambda: not backend_has(1), "version 1 freed in the backend")
        assert backend_has(2) and loaded_metric(1) not in metric_lines(metrics_port)
        assert loaded_metric(2) in metric_lines(metrics_port)
        assert step(stub, newcomer.world.world_id, ACTIONS[3]).shape == old_frames[0].shape  # v2 plays on


@contextlib.contextmanager
def catalog_gateway(overrides: dict, catalog: ModelCatalog) -> Iterator[GatewayRuntime]:
    settings = gateway_settings(overrides | {"catalog_models": [MODEL_NAME], "catalog_poll_s": POLL_S})
    runtime = GatewayRuntime(settings, catalog=catalog).start()
    try:
        yield runtime
    finally:
        runtime.stop(grace_s=1.0)


def test_inprocess_gateway_serves_a_new_version_while_old_worlds_keep_theirs(checkpoints, catalog_environment):
    catalog = open_catalog(catalog_environment)
    catalog.publish(MODEL_NAME, checkpoints[1])
    with catalog_gateway({"backend": "inprocess"}, catalog) as runtime:
        publish_while_worlds_play(runtime.port, runtime.metrics_server.port, catalog, checkpoints,
                                  lambda version: f"{MODEL_NAME}@{version}" in runtime.backend._models)


def ready_in_triton(service: TritonService, version: int) -> list[bool]:
    """Whether each of the version's models is ready in one service, as Triton itself reports."""
    ready = []
    with contextlib.closing(grpcclient.InferenceServerClient(service.url)) as client:
        for name in protocol.MODELS_BY_KIND[service.kind]:
            try:
                ready.append(client.is_model_ready(protocol.versioned(name, version)))
            except InferenceServerException:  # unknown model
                ready.append(False)
    return ready


def test_triton_gateway_serves_a_new_version_while_old_worlds_keep_theirs(checkpoints, catalog_environment, tmp_path):
    catalog = open_catalog(catalog_environment)
    catalog.publish(MODEL_NAME, checkpoints[1])
    # Holds lapse after 3 s unrenewed and the gateway renews every second: the scenario outlasts many leases, so a
    # version that stayed loaded throughout was kept by renewals.
    with running_stack(None, MODEL_NAME, environment=catalog_environment, hold_lease_s=3.0) as stack:
        def served_by_triton(version: int) -> bool:
            """Whether every service has the version's models loaded, as Triton itself reports."""
            ready = [each for service in stack.services.values() for each in ready_in_triton(service, version)]
            assert all(ready) or not any(ready), f"version {version} half loaded: {ready}"
            return all(ready)

        # `genie serve gateway` with the triton backend in its own process, where `import torch` fails (issue 10):
        # any torch import on its paths (start-up, prompts, versions, steps) would fail the scenario.
        log = tmp_path / "gateway.log"
        environment = stack.gateway_environment() | catalog_environment | {
            "GENIE_GATEWAY_CATALOG_POLL_S": str(POLL_S), "GENIE_GATEWAY_TRITON_HOLD_RENEW_S": "1"}
        with gateway_process(environment, log, torch_free=True) as (port, metrics_port):
            # Binding a version's models in three Triton services takes ~10 s on a 2-core machine (measured 9.9 s)
            # but took ~40 s per bind with another process holding the cores: the bound is generous and the
            # time is printed (pytest -s), so the suite checks the behaviour without failing on a busy machine.
            publish_while_worlds_play(port, metrics_port, catalog, checkpoints, served_by_triton, pickup_bound_s=180)
        assert "import of torch halted" not in log.read_text(errors="replace")
        lapsed = [kind for kind, service in stack.services.items() if "lapsed" in service.log_tail(10_000)]
        assert not lapsed, f"a live gateway's hold lapsed in the {lapsed} service(s)"


def test_a_restarted_gateway_resumes_worlds_on_their_version(checkpoints, catalog_environment, redis_url):
    """The redis world store keeps each world's `name@version`: a new gateway, whose latest is version 2, plays the
    version-1 world on version 1 (loading it on demand) and it continues as if nothing happened."""
    catalog = open_catalog(catalog_environment)
    catalog.publish(MODEL_NAME, checkpoints[1])
    overrides = {"backend": "inprocess", "world_store": "redis", "redis_url": redis_url,
                 "world_store_prefix": f"versions{time.monotonic_ns()}:"}
    with catalog_gateway(overrides, catalog) as runtime, contextlib.closing(open_channel(runtime.port)) as channel:
        stub = world_pb2_grpc.WorldServiceStub(channel)
        twin, world = create(stub, seed=3), create(stub, seed=3)
        twin_frames = [step(stub, twin.world.world_id, action) for action in ACTIONS]
        first_half = [step(stub, world.world.world_id, action) for action in ACTIONS[:3]]
    catalog.publish(MODEL_NAME, checkpoints[2])
    with catalog_gateway(overrides, catalog) as runtime, contextlib.closing(open_channel(runtime.port)) as channel:
        stub = world_pb2_grpc.WorldServiceStub(channel)
        assert listed(stub).latest_version == 2
        assert stub.GetWorld(pb.GetWorldRequest(world_id=world.world.world_id)).model_version == 1
        second_half = [step(stub, world.world.world_id, action) for action in ACTIONS[3:]]
        assert all(np.array_equal(a, b) for a, b in zip(first_half + second_half, twin_frames))
        assert list(listed(stub).loaded_versions) == [1, 2]
        for world_id in (world.world.world_id, twin.world.world_id):
            stub.CloseWorld(pb.CloseWorldRequest(world_id=world_id))
        wait_for(lambda: list(listed(stub).loaded_versions) == [2], "version 1 unloaded after its last world")


def test_a_restarted_catalog_service_binds_its_version_again_when_the_gateway_needs_it(checkpoints,
                                                                                     catalog_environment):
    """A --catalog dynamics service SIGKILLed and started again has no version bound: the next step of a world on
    version 1 binds it there again (the gateway's reload on "unknown model"), rebuilds the world's caches, and the
    world plays on bit-identically to a twin that never saw the restart; new worlds get the version too."""
    catalog = open_catalog(catalog_environment)
    catalog.publish(MODEL_NAME, checkpoints[1])
    with running_stack(None, MODEL_NAME, environment=catalog_environment) as stack:
        # A step that binds the version again can take longer than the default step deadline on a loaded machine.
        overrides = stack.overrides() | {"step_deadline_s": protocol.CONTROL_TIMEOUT_S}
        with catalog_gateway(overrides, catalog) as runtime, contextlib.closing(open_channel(runtime.port)) as channel:
            stub = world_pb2_grpc.WorldServiceStub(channel)
            twin, world = create(stub, seed=5), create(stub, seed=5)
            twin_frames = [step(stub, twin.world.world_id, action) for action in ACTIONS]
            first_half = [step(stub, world.world.world_id, action) for action in ACTIONS[:3]]

            dynamics = stack.services["dynamics"]
            dynamics.kill()
            dynamics.start()
            dynamics.wait_ready()
            assert ready_in_triton(dynamics, 1) == [False] * len(protocol.MODELS_BY_KIND["dynamics"])

            # The first step binds the version in the restarted service (seconds, minutes on a loaded machine).
            reply = stub.StepWorld(pb.StepWorldRequest(world_id=world.world.world_id, action=ACTIONS[3]),
                                   timeout=protocol.CONTROL_TIMEOUT_S)
            second_half = [pixels_of(reply.frame), *(step(stub, world.world.world_id, action) for action in ACTIONS[4:])]
            assert all(np.array_equal(a, b) for a, b in zip(first_half + second_half, twin_frames, strict=True))
            assert all(ready_in_triton(dynamics, 1)) and stub.GetWorld(
                pb.GetWorldRequest(world_id=world.world.world_id)).model_version == 1

            newcomer = create(stub, seed=5)
            assert newcomer.world.model_version == 1
            assert np.array_equal(step(stub, newcomer.world.world_id, ACTIONS[0]), twin_frames[0])


def test_a_hold_not_renewed_lapses_so_a_dead_gateways_versions_are_unloaded(checkpoints, catalog_environment,
                                                                            tmp_path):
    """Holds are leases: a holder that stops renewing (its gateway was SIGKILLed) loses its hold after the lease, and
    a version nobody holds any more is unbound; a holder that keeps renewing keeps the version loaded meanwhile."""
    lease_s = 4.0
    open_catalog(catalog_environment).publish(MODEL_NAME, checkpoints[1])
    with contextlib.ExitStack() as stack:
        workspace = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="genie-ws-")))
        options = replace(options_for_tests(workspace_root=workspace, environment=catalog_environment),
                          hold_lease_s=lease_s)
        service = TritonService("lam", None, MODEL_NAME, ServicePorts.free(), options, tmp_path / "lam.log")
        service.start()
        stack.callback(service.stop)
        service.wait_ready()
        assert service.answers(timeout_s=5.0)  # the supervisor's probe of a catalog service: refused at once
        client = ServiceClient(service.url, "lam service", 2**24, protocol.CONTROL_TIMEOUT_S)
        stack.callback(client.close)

        def hold(holder: str) -> None:
            command = np.array([protocol.control_command("load", 1, holder)], dtype=object)
            client.infer(protocol.CONTROL, {"command": command}, timeout_s=protocol.CONTROL_TIMEOUT_S)

        hold("dead-gateway")
        hold("live-gateway")
        assert all(ready_in_triton(service, 1))
        renewed_until = time.monotonic() + 2.5 * lease_s
        while time.monotonic() < renewed_until:  # the live holder renews; the dead one never does
            hold("live-gateway")
            time.sleep(lease_s / 4)
        assert all(ready_in_triton(service, 1)), "a renewed hold lapsed"
        log = (tmp_path / "lam.log").read_text(errors="replace")
        assert "dead-gateway's hold on version 1 lapsed" in log and "live-gateway's hold" not in log
        wait_for(lambda: not any(ready_in_triton(service, 1)), "version 1 unloaded once no hold was renewed",
                 timeout_s=lease_s + 30)
        assert "lam service unloaded version 1" in (tmp_path / "lam.log").read_text(errors="replace")
