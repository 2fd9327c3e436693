"""`genie serve stack`: one world's Triton services and its gateway, kept running until asked to stop.

A child that exits on its own is logged, its leftovers (tritonserver, stubs) killed, and it is started again
after an exponential backoff, counted in genie_service_restarts_total{service}; SIGTERM/SIGINT stop them all.
A model service that stops answering (hung: SIGSTOP, a deadlock) is probed, killed and restarted the same way.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

from services.metrics import StackMetrics, serve_metrics
from services.triton.stack import ServiceStack, kill_group, start_child, wait_or_kill

logger = logging.getLogger("genie.stack")


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff_s: float = 1.0  # wait before the first restart; doubles with each quick failure
    max_backoff_s: float = 30.0
    stable_after_s: float = 60.0  # a child up this long counts as healthy: its next restart waits initial_backoff_s
    # Children that can be probed (Child.answers) are asked every probe_every_s once they have answered since their
    # start; unanswered_limit probes in a row without an answer within probe_timeout_s: hung, killed, restarted.
    probe_every_s: float = 2.0
    probe_timeout_s: float = 5.0  # generous: a loaded 2-core machine answers the info model in well under 1 s
    unanswered_limit: int = 3

    def backoff_s(self, quick_failures: int) -> float:
        return min(self.max_backoff_s, self.initial_backoff_s * 2 ** quick_failures)


class Child(Protocol):
    process: subprocess.Popen | None

    def start(self) -> None: ...

    def exit_code(self) -> int | None: ...

    def terminate(self) -> None: ...

    def stop(self) -> int | None: ...


class Probed(Child, Protocol):
    def answers(self, timeout_s: float) -> bool: ...


class GatewayProcess:
    """`genie serve gateway ARGS` as a child, with the environment that points it at the stack."""

    def __init__(self, args: list[str], env: dict[str, str]):
        self.command = [sys.executable, "-m", "services.cli", "serve", "gateway", *args]
        self.env, self.process = env, None

    def start(self) -> None:
        self.process = start_child(self.command, self.env)

    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def terminate(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self) -> int | None:
        if self.process is None:
            return None
        self.terminate()
        return wait_or_kill(self.process)


class Supervisor:
    """Restarts children that exit on their own. check() is called periodically from one thread."""

    def __init__(self, children: dict[str, Child], policy: RestartPolicy, metrics: StackMetrics):
        self.children, self.policy, self.metrics = children, policy, metrics
        self.started_at = {name: time.monotonic() for name in children}
        self.quick_failures = {name: 0 for name in children}
        self.restart_at: dict[str, float] = {}  # children that died, waiting out their backoff
        self.next_probe = {name: 0.0 for name in children}
        self.answered = {name: False for name in children}  # since its last start: probes count from then on
        self.unanswered = {name: 0 for name in children}
        self.probing: dict[str, tuple[int, Future]] = {}  # name -> (pid probed, its answer to come)
        self._probes = ThreadPoolExecutor(max(1, len(children)), thread_name_prefix="probe")
        for name in children:
            metrics.up.labels(name).set(1)

    def check(self) -> None:
        now = time.monotonic()
        for name, child in self.children.items():
            if name in self.restart_at:
                if now >= self.restart_at[name]:
                    self._restart(name, child, now)
                continue
            code = child.exit_code()
            if code is None:
                if now - self.started_at[name] > self.policy.stable_after_s:
                    self.quick_failures[name] = 0
                if hasattr(child, "answers"):
                    self._probe(name, child)
                continue
            kill_group(child.process)
            delay = self.policy.backoff_s(self.quick_failures[name])
            self.quick_failures[name] += 1
            self.restart_at[name] = now + delay
            self.metrics.up.labels(name).set(0)
            logger.error("%s exited on its own; restarting it", name,
                         extra={"service": name, "exit_code": code, "restart_in_s": delay})

    def _probe(self, name: str, child: Probed) -> None:
        """Probes run on their own threads, so a slow answer (up to probe_timeout_s) never delays noticing and
        restarting a child that exited. A finished probe is judged here; one that began before a restart is
        dropped. A child that answered before but then missed unanswered_limit probes in a row is killed; the
        next check() sees it exited and restarts it."""
        pending = self.probing.get(name)
        if pending is None:
            if time.monotonic() >= self.next_probe[name]:
                answer = self._probes.submit(child.answers, self.policy.probe_timeout_s)
                self.probing[name] = (child.process.pid, answer)
            return
        pid, future = pending
        if not future.done():
            return
        del self.probing[name]
        self.next_probe[name] = time.monotonic() + self.policy.probe_every_s
        if pid != child.process.pid:
            return
        if future.result():
            self.answered[name], self.unanswered[name] = True, 0
        elif self.answered[name]:  # still starting up until its first answer
            self.unanswered[name] += 1
            if self.unanswered[name] >= self.policy.unanswered_limit:
                logger.error("%s answered none of %d probes in a row (hung); killing it", name,
                             self.unanswered[name], extra={"service": name, "pid": child.process.pid})
                child.process.kill()
                child.process.wait()

    def _restart(self, name: str, child: Child, now: float) -> None:
        del self.restart_at[name]
        child.start()
        self.answered[name], self.unanswered[name] = False, 0
        self.started_at[name] = now
        self.metrics.restarts.labels(name).inc()
        self.metrics.up.labels(name).set(1)
        logger.info("%s restarted", name, extra={"service": name, "pid": child.process.pid})

    def stop(self) -> dict[str, int | None]:
        """Gateway first (it drains in-flight steps), then the services all at once (each takes seconds to
        unload); -> exit codes, None for a child that was down awaiting its restart."""
        self._probes.shutdown(wait=False, cancel_futures=True)
        codes: dict[str, int | None] = {name: None for name in self.restart_at}
        running = {name: child for name, child in self.children.items() if name not in self.restart_at}
        if "gateway" in running:
            codes["gateway"] = running.pop("gateway").stop()
        for child in running.values():
            child.terminate()
        return codes | {name: child.stop() for name, child in running.items()}


def run_stack(stack: ServiceStack, gateway_args: list[str], metrics_port: int, policy: RestartPolicy = RestartPolicy(),
              poll_s: float = 0.25) -> int:
    """The services, then a gateway (`genie serve gateway GATEWAY_ARGS`) pointed at them, supervised until
    SIGTERM or SIGINT. Returns 0 when every child then exited cleanly, else 1."""
    for signum in (signal.SIGTERM, signal.SIGINT):  # both interrupt whatever we wait on, start-up included
        signal.signal(signum, signal.default_int_handler)
    metrics = StackMetrics()
    server = serve_metrics(metrics.registry, metrics_port, stack.services["dynamics"].host)
    supervisor: Supervisor | None = None
    codes: dict[str, int | None] = {}
    try:
        stack.start()
        gateway = GatewayProcess(gateway_args, os.environ | stack.gateway_environment())
        gateway.start()
        supervisor = Supervisor({"gateway": gateway, **stack.services}, policy, metrics)
        logger.info("stack serving", extra={"model": stack.model_name, "gateway_pid": gateway.process.pid,
                                            "metrics_port": server.port,
                                            "services": {kind: s.url for kind, s in stack.services.items()}})
        while True:
            supervisor.check()
            time.sleep(poll_s)
    except KeyboardInterrupt:
        logger.info("stopping the stack")
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT):  # stop in order; the SIGKILL timeouts bound it
            signal.signal(signum, signal.SIG_IGN)
        codes = supervisor.stop() if supervisor else stack.stop()
        server.close()
    logger.info("stack stopped", extra={"exit_codes": codes})
    return 0 if all(code in (0, None) for code in codes.values()) else 1
