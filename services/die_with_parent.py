"""Child processes that die with the thread that started them (Linux PR_SET_PDEATHSIG), so a crashed or killed
parent leaves no service or training stage behind.

`command(argv)` wraps argv in this file run as a launcher: `python -I -S die_with_parent.py PARENT_PID SIGNAL --
ARGV...` asks for SIGNAL on its parent's death, then execs ARGV in its own place (same pid and process group).

Why not subprocess's preexec_fn: it forces a plain fork(), after which the child runs the parent's fork handlers
and Python code before exec. gRPC's handlers are among them: a model service once died at start-up, its whole
log one gRPC line (ev_epoll1: "epoll_wait error: Bad file descriptor"), forked while the parent's other threads
were inside gRPC. Without preexec_fn CPython starts the launcher with vfork(), which runs no handlers; the
launcher is a fresh interpreter (stdlib only, ~40 ms) that asks for the signal itself.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1
EXEC_FAILED = 127  # as a shell reports a command it cannot run


def command(argv: list[str], death_signal: int = signal.SIGTERM) -> list[str]:
    """argv, launched so that it gets death_signal when the calling thread of this process exits (Linux; elsewhere
    argv unchanged). Pass the result to subprocess without preexec_fn."""
    if not sys.platform.startswith("linux"):
        return argv
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), str(os.getpid()), str(int(death_signal)), "--",
            *argv]


def _launch(parent_pid: int, death_signal: int, argv: list[str]) -> None:
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, death_signal)
    if os.getppid() != parent_pid:  # the parent died before we asked: the signal will never come
        os.kill(os.getpid(), death_signal)
    try:
        os.execvp(argv[0], argv)
    except OSError as error:
        print(f"cannot run {argv[0]}: {error}", file=sys.stderr, flush=True)
        os._exit(EXEC_FAILED)


if __name__ == "__main__":
    parent, signal_number, separator, *child_argv = sys.argv[1:]
    if separator != "--" or not child_argv:
        sys.exit(f"usage: {sys.argv[0]} PARENT_PID SIGNAL -- COMMAND [ARG...]")
    _launch(int(parent), int(signal_number), child_argv)
