"""Children started by the stack and the worker die with their parent, and start without running its fork handlers."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from services import die_with_parent
from services.triton.stack import start_child

REPO = Path(__file__).resolve().parents[2]


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie nobody reaped yet (a container's init may not reap)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_child_gets_its_signal_when_the_parent_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", textwrap.dedent("""
        import sys, time
        from services.triton.stack import start_child
        child = start_child(["sleep", "60"], {"PATH": "/usr/bin:/bin"})
        print(child.pid, flush=True)
        time.sleep(60)
        """)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    time.sleep(0.5)  # the launcher has exec'd sleep by now
    assert not _gone(child_pid)
    parent.kill()
    parent.wait(10)
    deadline = time.monotonic() + 10
    while not _gone(child_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _gone(child_pid), "the child outlived its killed parent"


def test_the_parents_fork_handlers_do_not_run_in_a_started_child(tmp_path):
    # preexec_fn made Python fork() and run the parent's fork handlers in the child before exec (gRPC's among
    # them, which once killed a service at start-up); the launcher is started without them.
    marker = tmp_path / "handler-ran"
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, sys
        from services.triton.stack import start_child
        os.register_at_fork(after_in_child=lambda: open(sys.argv[1], "w").close())
        print(start_child(["true"], {"PATH": "/usr/bin:/bin"}).wait(30))
        """), str(marker)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "0", result.stderr
    assert not marker.exists()


def test_a_child_whose_parent_died_before_it_asked_is_signalled_at_once():
    # The launcher checks its parent after asking for the signal: a parent that is already gone never sends it.
    launcher = die_with_parent.command(["sleep", "30"], signal.SIGTERM)
    launcher[launcher.index(str(os.getpid()))] = str(2**30)  # a parent that was another process, now gone
    started = time.monotonic()
    code = subprocess.run(launcher, timeout=30).returncode
    assert code == -signal.SIGTERM and time.monotonic() - started < 10


def test_a_command_that_cannot_run_exits_127_and_says_why():
    process = start_child(["/nonexistent/genie-service"], {"PATH": "/usr/bin:/bin"}, log=subprocess.PIPE)
    output, _ = process.communicate(timeout=30)
    assert process.returncode == die_with_parent.EXEC_FAILED
    assert b"cannot run /nonexistent/genie-service" in output
