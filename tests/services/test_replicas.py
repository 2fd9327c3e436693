"""Several replicas of a model service: discovery plugins, worlds pinned per replica, and a replica SIGKILLed
while worlds play (its worlds move to the live replica and continue bit-identically to undisturbed twins).

The integration test runs two real dynamics services (the stack's and one more) behind one triton gateway.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from genie.v1 import world_pb2 as pb
from genie.v1 import world_pb2_grpc
from services.backends.discovery import DnsDiscovery, StaticDiscovery
from services.backends.replicas import ReplicaSet
from services.gateway.server import GatewayRuntime
from services.metrics import ReplicaMetrics
from services.triton.client import ServiceClient
from services.triton.stack import free_port, wait_ready_or_restart
from tests.services.conftest import gateway_settings
from tests.services.helpers import MODEL_NAME, create_request, open_channel, pixels_of
from tests.services.triton_stack import lone_service, running_stack

WORLDS, ROUNDS, KILL_IN_ROUND = 8, 8, 3
NUM_ACTIONS = 4


# --- discovery plugins -------------------------------------------------------------------------------------

def test_static_discovery_lists_each_replica_and_keeps_a_single_address_working():
    assert StaticDiscovery().resolve("dynamics:8001") == ["dynamics:8001"]
    assert StaticDiscovery().resolve("h2:8001, h1:8001,[::1]:8001") == ["[::1]:8001", "h1:8001", "h2:8001"]


@pytest.mark.parametrize("endpoint, message", [
    ("h1:8001,,h2:8001", "has an empty address: separate host:port entries by single commas"),
    ("h1:8001,", "has an empty address"),
    ("dynamics", "'dynamics' in triton endpoint 'dynamics' is not host:port: write e.g. 'dynamics:8001'"),
    ("h1:80x1", "has port '80x1': a port is a number from 1 to 65535"),
    ("h1:0", "has port '0'"),
    ("::1:8001", r"is not host:port: write e.g. 'dynamics:8001' \(IPv6: '\[::1\]:8001'\)"),
    ("h1:8001,h1:8001", "lists h1:8001 more than once: list each replica once"),
])
def test_static_discovery_refuses_a_malformed_endpoint_saying_what_to_write(endpoint, message):
    with pytest.raises(ValueError, match=message):
        StaticDiscovery().resolve(endpoint)


def test_dns_discovery_resolves_localhost_to_its_addresses_on_the_port():
    addresses = DnsDiscovery().resolve("localhost:8001")
    assert addresses and set(addresses) <= {"127.0.0.1:8001", "[::1]:8001"}, addresses


def test_dns_discovery_refuses_a_list_and_reports_an_unknown_name_as_os_error():
    with pytest.raises(ValueError, match="dns discovery takes one name:port per endpoint"):
        DnsDiscovery().resolve("h1:8001,h2:8001")
    with pytest.raises(OSError):
        DnsDiscovery().resolve("no-such-host.invalid:8001")


# --- pinning, without servers -------------------------------------------------------------------------------

def replica_set(endpoint: str) -> tuple[ReplicaSet, CollectorRegistry]:
    registry = CollectorRegistry()
    connect = lambda address: ServiceClient(address, "dynamics", 2**20, timeout_s=1.0)  # noqa: E731 - connects lazily
    return ReplicaSet("m", "dynamics", endpoint, StaticDiscovery(), connect, ReplicaMetrics(registry),
                      wake=lambda: None), registry


def worlds_on(registry: CollectorRegistry, address: str) -> float | None:
    return registry.get_sample_value("genie_replica_worlds", {"model": "m", "kind": "dynamics", "replica": address})


def test_worlds_spread_over_replicas_and_move_off_one_that_went_down():
    ports = [free_port() for _ in range(3)]  # nothing listens there
    addresses = [f"127.0.0.1:{port}" for port in ports]
    replicas, registry = replica_set(",".join(addresses))
    pins = replicas.route([f"w{index}" for index in range(6)])
    assert sorted(worlds_on(registry, address) for address in addresses) == [2, 2, 2]
    lost = pins[0].address
    lost_worlds = [f"w{index}" for index, pin in enumerate(pins) if pin.address == lost]
    assert replicas.down(lost)  # two live replicas take over
    assert replicas.moved([f"w{index}" for index in range(6)]) == lost_worlds
    assert worlds_on(registry, lost) == 0 and {replica.address for replica in replicas.route(lost_worlds)} != {lost}
    assert registry.get_sample_value("genie_world_repins_total", {"model": "m", "kind": "dynamics"}) == 2
    assert registry.get_sample_value("genie_replicas_live", {"model": "m", "kind": "dynamics"}) == 2
    replicas.started(lost_worlds[0])
    assert replicas.moved(lost_worlds) == lost_worlds[1:]
    assert replicas.route(["new"])[0].address != lost  # a down replica gets no new worlds
    replicas.refresh()  # the probe finds nothing listening: it stays down
    assert registry.get_sample_value("genie_replicas_live", {"model": "m", "kind": "dynamics"}) == 2


def test_a_lone_replica_that_is_down_keeps_its_worlds_for_when_it_returns():
    replicas, registry = replica_set(f"127.0.0.1:{free_port()}")
    [pin] = replicas.route(["w"])
    assert not replicas.down(pin.address)
    assert replicas.moved(["w"]) == [] and replicas.route(["w"]) == [pin]


# --- two real dynamics replicas behind one gateway ------------------------------------------------------------

@pytest.fixture(scope="module")
def two_dynamics(world_checkpoint, tmp_path_factory):
    """The stack (tokenizer, lam, dynamics) and a second dynamics replica, both loading at once."""
    second = lone_service("dynamics", world_checkpoint, MODEL_NAME, tmp_path_factory.mktemp("replica"), 16)
    second.start()
    try:
        with running_stack(world_checkpoint, MODEL_NAME, max_worlds=16) as stack:
            second.wait_ready()
            yield stack, second
    finally:
        second.stop()


@pytest.mark.integration
@pytest.mark.slow
def test_dns_discovery_finds_each_service_of_the_stack_through_localhost(two_dynamics):
    stack, _ = two_dynamics
    overrides = stack.overrides()
    ports = {kind: service.ports.grpc for kind, service in stack.services.items()}
    overrides["triton_endpoints"] = {MODEL_NAME: {kind: f"localhost:{port}" for kind, port in ports.items()}}
    runtime = GatewayRuntime(gateway_settings(overrides | {"discovery": "dns"})).start()  # lists the model: found
    try:
        live = {kind: runtime.metrics.registry.get_sample_value("genie_replicas_live", {"model": MODEL_NAME,
                                                                                        "kind": kind})
                for kind in ports}
        assert live == {kind: 1 for kind in ports}  # 127.0.0.1 (a ::1 record, where the services do not listen,
        # would be marked down at the first call)
    finally:
        runtime.stop(grace_s=1.0)


@contextlib.contextmanager
def serving(overrides: dict):
    runtime = GatewayRuntime(gateway_settings(overrides)).start()
    try:
        with contextlib.closing(open_channel(runtime.port)) as channel:
            yield runtime, world_pb2_grpc.WorldServiceStub(channel)
    finally:
        runtime.stop(grace_s=1.0)


def action(world: int, round_: int) -> int:
    return (world + 3 * round_) % NUM_ACTIONS


def nothing(round_: int) -> None:
    pass


def play(stub, before_round=nothing, during_round=nothing, round_seconds: list[float] | None = None
         ) -> list[list[np.ndarray]]:
    """WORLDS worlds (seeds 0..7) stepped ROUNDS times, all worlds' steps of a round at once -> frames per world.
    before_round(round) runs before the round's steps are sent, during_round(round) while they are. The worlds
    stay open. round_seconds gets each round's wall time."""
    created = [stub.CreateWorld(create_request(seed=seed)) for seed in range(WORLDS)]
    frames = [[pixels_of(world.frame)] for world in created]
    with ThreadPoolExecutor(WORLDS + 1) as pool:
        for round_ in range(ROUNDS):
            before_round(round_)
            started = time.monotonic()
            disturbance = pool.submit(during_round, round_)
            steps = [pool.submit(stub.StepWorld, pb.StepWorldRequest(world_id=world.world.world_id,
                                                                     action=action(index, round_)))
                     for index, world in enumerate(created)]
            for index, step in enumerate(steps):
                frames[index].append(pixels_of(step.result().frame))  # any error a client would see fails the test
            if round_seconds is not None:
                round_seconds.append(time.monotonic() - started)
            disturbance.result()
    return frames


def assert_same_frames(got: list[np.ndarray], want: list[np.ndarray], world: int) -> None:
    assert len(got) == len(want)
    for step, (got_frame, want_frame) in enumerate(zip(got, want)):
        np.testing.assert_array_equal(got_frame, want_frame, err_msg=f"world {world}, frame {step}")


def triton_metric(url: str, name: str, model: str) -> float:
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    found = re.search(rf'^{name}{{model="{model}",version="1"}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def step_as_a_careful_client(stub, world_id: str, number: int, action_: int) -> tuple[np.ndarray, int]:
    """StepWorld producing step `number`; a step that missed its deadline may still complete, so it is asked again
    with expected_step, which answers with that step's frame instead of stepping twice. -> (frame, deadlines missed)"""
    for missed in range(3):
        try:
            request = pb.StepWorldRequest(world_id=world_id, action=action_, expected_step=number)
            return pixels_of(stub.StepWorld(request).frame), missed
        except grpc.RpcError as error:
            if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                raise
    raise AssertionError(f"world {world_id}'s step {number} missed its deadline three times")


@pytest.mark.integration
@pytest.mark.slow
def test_worlds_move_off_a_hung_replica_which_takes_worlds_again_once_its_process_answers(two_dynamics,
                                                                                         world_checkpoint):
    """The second replica's Python process is SIGSTOPped (a hang: its tritonserver still says ready and takes
    requests nobody answers). The call to it gives up at half the step deadline, its worlds move to the live
    replica and the batch steps there, within every caller's deadline: no client sees an error, and every world
    plays on bit-identically to its twin. The hung replica stays out (health alone would take it back at once).
    Resumed, it is taken back once its own process answers, and takes the next new world."""
    stack, second = two_dynamics
    first = stack.services["dynamics"]
    overrides = stack.overrides()
    overrides["triton_endpoints"][MODEL_NAME]["dynamics"] = f"{first.url},{second.url}"
    # A replica call gets half the step deadline (4 s): far longer than any healthy round on a loaded 2-core machine.
    overrides |= {"discovery_refresh_s": 0.5, "step_deadline_s": 8.0}
    with serving({"backend": "inprocess", "models": {MODEL_NAME: str(world_checkpoint)}}) as (_, twin_stub):
        twins = play(twin_stub)

    with serving(overrides) as (runtime, stub), contextlib.closing(
            ServiceClient(second.url, "second dynamics replica", 2**20, timeout_s=5.0)) as second_client:
        def dynamics_sample(name: str, **labels: str) -> float | None:
            return runtime.metrics.registry.get_sample_value(name, {"model": MODEL_NAME, "kind": "dynamics", **labels})

        replies = [stub.CreateWorld(create_request(seed=seed)) for seed in range(WORLDS)]
        created, frames = [reply.world.world_id for reply in replies], [[pixels_of(reply.frame)] for reply in replies]
        missed, round_seconds = 0, []
        try:
            with ThreadPoolExecutor(WORLDS) as pool:
                for round_ in range(ROUNDS):
                    if round_ == KILL_IN_ROUND:
                        assert dynamics_sample("genie_replica_worlds", replica=second.url) == WORLDS / 2
                        os.kill(second.process.pid, signal.SIGSTOP)
                    started = time.monotonic()
                    steps = list(pool.map(lambda world: step_as_a_careful_client(
                        stub, created[world], round_ + 1, action(world, round_)), range(WORLDS)))
                    round_seconds.append(time.monotonic() - started)
                    for world, (frame, deadlines) in enumerate(steps):
                        frames[world].append(frame)
                        missed += deadlines
            print("seconds per round of 8 steps (SIGSTOP before round %d, replica calls 4 s):" % KILL_IN_ROUND,
                  " ".join(f"{seconds:.2f}" for seconds in round_seconds), f"; deadlines missed {missed}")
            time.sleep(2.0)  # four probe rounds while it still hangs
            assert second_client.ready() and not second_client.answers()  # what the prober must see through
            assert dynamics_sample("genie_replicas_live") == 1, "a hung replica was taken back"
        finally:
            os.kill(second.process.pid, signal.SIGCONT)
        for world, (got, want) in enumerate(zip(frames, twins)):
            assert_same_frames(got, want, world)
        assert missed == 0, f"{missed} steps missed their deadline"
        assert dynamics_sample("genie_world_repins_total") == WORLDS / 2
        assert dynamics_sample("genie_replica_worlds", replica=first.url) == WORLDS

        deadline = time.monotonic() + 30
        while dynamics_sample("genie_replicas_live") != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dynamics_sample("genie_replicas_live") == 2, "the resumed replica was not taken back"
        newcomer = stub.CreateWorld(create_request(seed=0)).world.world_id
        frame, deadlines = step_as_a_careful_client(stub, newcomer, 1, action(0, 0))
        np.testing.assert_array_equal(frame, twins[0][1])
        assert deadlines == 0 and dynamics_sample("genie_replica_worlds", replica=second.url) == 1
        for world_id in [*created, newcomer]:
            stub.CloseWorld(pb.CloseWorldRequest(world_id=world_id))


@pytest.mark.integration
@pytest.mark.slow
def test_worlds_spread_over_two_dynamics_replicas_and_survive_one_being_killed(two_dynamics, world_checkpoint):
    """8 worlds over two dynamics replicas; one is SIGKILLed mid-soak; every world keeps stepping and plays the
    frames of its twin on the in-process backend. The killed replica comes back and takes the next new world,
    whose replica is then stopped gracefully (SIGTERM, a rolling update) while it plays: it moves too."""
    stack, second = two_dynamics
    first = stack.services["dynamics"]
    overrides = stack.overrides()
    overrides["triton_endpoints"][MODEL_NAME]["dynamics"] = f"{first.url},{second.url}"
    overrides["discovery_refresh_s"] = 0.5
    with serving({"backend": "inprocess", "models": {MODEL_NAME: str(world_checkpoint)}}) as (_, twin_stub):
        twins = play(twin_stub)

    with serving(overrides) as (runtime, stub):
        registry = runtime.metrics.registry

        def dynamics_sample(name: str, **labels: str) -> float | None:
            return registry.get_sample_value(name, {"model": MODEL_NAME, "kind": "dynamics", **labels})

        def stepped(service) -> float:
            return triton_metric(service.metrics_url, "nv_inference_count", "dynamics_step")

        stepped_before = {service.url: stepped(service) for service in (first, second)}  # by the module's other tests

        def rows(service) -> float:
            """Rows the replica stepped for this gateway."""
            return stepped(service) - stepped_before[service.url]

        seen: dict[str, float] = {}

        def count_before_the_kill(round_: int) -> None:
            """The worlds are spread evenly, and each world's step went to its replica only (not to both)."""
            if round_ == KILL_IN_ROUND:
                seen.update({url: dynamics_sample("genie_replica_worlds", replica=url)
                             for url in (first.url, second.url)})
                seen["rows"] = rows(first) + rows(second)
                seen["second rows"] = rows(second)

        def kill_second_replica(round_: int) -> None:
            if round_ == KILL_IN_ROUND:
                time.sleep(0.02)  # as the round's steps go out (where in their batch depends on timing)
                second.kill()

        round_seconds: list[float] = []
        frames = play(stub, count_before_the_kill, kill_second_replica, round_seconds)
        print("seconds per round of 8 steps (SIGKILL in round %d):" % KILL_IN_ROUND,
              " ".join(f"{seconds:.2f}" for seconds in round_seconds))
        assert seen[first.url] == seen[second.url] == WORLDS / 2
        assert seen["rows"] == WORLDS * KILL_IN_ROUND and seen["second rows"] == WORLDS / 2 * KILL_IN_ROUND
        for world, (got, want) in enumerate(zip(frames, twins)):
            assert_same_frames(got, want, world)
        assert dynamics_sample("genie_world_repins_total") == WORLDS / 2
        assert dynamics_sample("genie_replicas_known") == 2 and dynamics_sample("genie_replicas_live") == 1
        assert dynamics_sample("genie_replica_worlds", replica=first.url) == WORLDS

        # The killed replica comes back: the prober finds it, and it takes the next new world.
        second.start()
        wait_ready_or_restart(second)  # a Triton started again at once on the same ports may abort (seen in CI)
        deadline = time.monotonic() + 10
        while dynamics_sample("genie_replicas_live") != 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert dynamics_sample("genie_replicas_live") == 2
        created = stub.CreateWorld(create_request(seed=0))
        world = created.world.world_id

        def step(round_: int) -> np.ndarray:
            return pixels_of(stub.StepWorld(pb.StepWorldRequest(world_id=world, action=action(0, round_))).frame)

        replayed = [pixels_of(created.frame), step(0)]
        assert dynamics_sample("genie_replica_worlds", replica=second.url) == 1
        assert triton_metric(second.metrics_url, "nv_inference_count", "dynamics_step") == 1

        # A graceful stop: Triton unloads its models first (~2 s answering "unknown model"), then closes its port.
        second.terminate()
        time.sleep(0.2)
        replayed += [step(round_) for round_ in range(1, ROUNDS)]
        assert_same_frames(replayed, twins[0], world=0)
        assert dynamics_sample("genie_world_repins_total") == WORLDS / 2 + 1
        assert dynamics_sample("genie_replica_worlds", replica=first.url) == WORLDS + 1
        second.stop()
    backend = runtime.backend  # its threads stop with it (other tests' gateways may run their own meanwhile)
    assert not backend._refresher._thread.is_alive() and not backend._renewer.is_alive()
