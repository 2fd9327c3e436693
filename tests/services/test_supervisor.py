"""`genie serve stack`'s supervisor on small real child processes: restarts with backoff, counting, clean-up; and
on a real Triton service that hangs.

The Triton services are killed under a whole stack in test_serve_stack.py; these children just exit or linger.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from services.metrics import StackMetrics
from services.triton.procfs import process_alive
from services.triton.stack import READY_TIMEOUT_S, ServicePorts, TritonService, start_child
from services.triton.supervisor import RestartPolicy, Supervisor
from tests.services.helpers import MODEL_NAME
from tests.services.triton_stack import options_for_tests


class CommandChild:
    """A shell command run as a supervised child (the Child protocol of services/triton/supervisor.py)."""

    def __init__(self, script: str):
        self.command, self.process, self.starts = ["sh", "-c", script], None, []

    def start(self) -> None:
        self.process = start_child(self.command, {"PATH": "/usr/bin:/bin"})
        self.starts.append(time.monotonic())

    def exit_code(self) -> int | None:
        return self.process.poll()

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def stop(self) -> int | None:
        self.terminate()
        return self.process.wait(10)


def supervise(children: dict[str, CommandChild], policy: RestartPolicy, until, timeout_s: float = 60) -> StackMetrics:
    metrics = StackMetrics()
    for child in children.values():
        child.start()
    supervisor = Supervisor(children, policy, metrics)
    deadline = time.monotonic() + timeout_s
    while not until() and time.monotonic() < deadline:
        supervisor.check()
        time.sleep(0.01)
    supervisor.stop()
    return metrics


def restarts(metrics: StackMetrics, name: str) -> float:
    return metrics.registry.get_sample_value("genie_service_restarts_total", {"service": name}) or 0.0


def test_a_child_that_keeps_dying_is_restarted_with_doubling_backoff_and_counted(caplog):
    crashing, steady = CommandChild("exit 3"), CommandChild("sleep 30")
    policy = RestartPolicy(initial_backoff_s=0.1, max_backoff_s=0.4, stable_after_s=60)
    with caplog.at_level(logging.INFO, logger="genie.stack"):
        metrics = supervise({"dynamics": crashing, "lam": steady}, policy, until=lambda: len(crashing.starts) > 5)
    waits = [record.restart_in_s for record in caplog.records if getattr(record, "service", "") == "dynamics"
             and hasattr(record, "restart_in_s")]
    assert [record.exit_code for record in caplog.records if hasattr(record, "exit_code")][0] == 3
    assert waits[:5] == [0.1, 0.2, 0.4, 0.4, 0.4]  # doubling, capped
    gaps = [later - earlier for earlier, later in zip(crashing.starts, crashing.starts[1:])]
    assert all(gap >= wait for gap, wait in zip(gaps, waits)), (gaps, waits)
    assert restarts(metrics, "dynamics") == len(gaps) == 5
    assert restarts(metrics, "lam") == 0 and len(steady.starts) == 1
    assert metrics.registry.get_sample_value("genie_service_up", {"service": "lam"}) == 1


def test_the_rest_of_a_dead_childs_process_group_is_killed_before_it_restarts():
    # Like a SIGKILLed service whose tritonserver lingers on its ports: the leader exits, a member stays.
    child = CommandChild("sleep 30 & exit 1")
    child.start()
    leader = child.process
    time.sleep(0.3)
    members = subprocess.run(["pgrep", "-g", str(leader.pid)], capture_output=True, text=True).stdout.split()
    assert members, "the lingering member should exist before the supervisor looks"
    supervisor = Supervisor({"dynamics": child}, RestartPolicy(initial_backoff_s=10), StackMetrics())
    leader.wait()
    supervisor.check()
    time.sleep(0.2)
    assert not any(process_alive(int(pid)) for pid in members)
    assert "dynamics" in supervisor.restart_at  # waiting out its backoff, not yet restarted
    assert supervisor.stop() == {"dynamics": None}


def probe_exit_code(service: TritonService) -> int:
    return subprocess.run([sys.executable, "-m", "services.triton.probe", "--grpc-port", str(service.ports.grpc),
                           "--timeout-s", "2"], capture_output=True, timeout=60).returncode


def test_a_hung_model_service_is_killed_and_restarted(world_checkpoint, tmp_path, caplog):
    """SIGSTOP freezes the service's own process; tritonserver (its child) still says ready, so only a request that
    goes through the frozen process shows the hang. The supervisor kills it after its probes go unanswered and
    starts it again; the new instance answers."""
    with tempfile.TemporaryDirectory(prefix="genie-ws-") as workspace:
        service = TritonService("lam", world_checkpoint, MODEL_NAME, ServicePorts.free(),
                                options_for_tests(workspace_root=Path(workspace)), tmp_path / "lam.log")
        service.start()
        service.wait_ready()
        policy = RestartPolicy(initial_backoff_s=0.1, probe_every_s=0.5, probe_timeout_s=1.0, unanswered_limit=3)
        supervisor = Supervisor({"lam": service}, policy, StackMetrics())
        try:
            until_answered = time.monotonic() + 30
            while not supervisor.answered["lam"]:
                assert time.monotonic() < until_answered, "the running service never answered a probe"
                supervisor.check()
                time.sleep(0.1)
            frozen = service.process.pid
            assert probe_exit_code(service) == 0  # the Kubernetes liveness probe, on the same service
            os.kill(frozen, signal.SIGSTOP)
            stopped_at = time.monotonic()
            assert probe_exit_code(service) == 1
            with caplog.at_level(logging.INFO, logger="genie.stack"):
                while service.process.pid == frozen or not supervisor.answered["lam"]:
                    assert time.monotonic() - stopped_at < READY_TIMEOUT_S, service.log_tail()
                    supervisor.check()
                    time.sleep(0.1)
            assert not process_alive(frozen)
            assert any("answered none of 3 probes in a row (hung)" in record.getMessage() for record in caplog.records)
            assert service.answers(timeout_s=5.0)
        finally:
            supervisor.stop()
