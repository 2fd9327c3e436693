"""What Linux's /proc says about processes: a Triton service's tritonserver child, and whether a pid still runs.

Used by the service itself (to notice its tritonserver dying) and by whoever starts services (to tell its own
tritonserver from a killed predecessor's, which keeps answering on the same ports for seconds).
"""

from __future__ import annotations

import os

TRITONSERVER = "tritonserver"


def children_named(parent: int, name: str) -> list[int]:
    """The pids of parent's live or zombie children whose command name is name."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    command, fields = stat.read().split(" (", 1)[1].rsplit(") ", 1)
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                continue
            if command == name and int(fields.split()[1]) == parent:
                found.append(int(entry))
    return found


def process_alive(pid: int) -> bool:
    """Whether pid runs (a zombie, exited but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(") ", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
