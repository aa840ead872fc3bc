"""What Linux says of a process, from ``/proc/<pid>/stat``: the one reader of that file.

The file is one line: ``pid (command) state ppid pgrp ...``; the command may hold spaces and
parentheses, so the fields are counted from the last ``)``. After it, 0-based: 0 the state
(``Z``: a zombie, ended and waiting for its parent to collect it), 1 the parent's pid, 2 the
process group, 11 and 12 the user and system CPU time in clock ticks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessStat:
    state: str
    parent: int
    group: int
    cpu_seconds: float  # user + system, all threads

    @property
    def running(self) -> bool:
        """Running, as opposed to ended (a zombie counts as ended)."""
        return self.state != "Z"


def process_stat(pid: int) -> ProcessStat | None:
    """Process ``pid`` as /proc shows it now; None when there is no such process (or no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return ProcessStat(fields[0], int(fields[1]), int(fields[2]), (int(fields[11]) + int(fields[12])) / ticks)
    except (OSError, ValueError, IndexError):  # gone while read, or not Linux
        return None


def command_line(pid: int) -> bytes | None:
    """The arguments process ``pid`` was started with, NUL-separated; None once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return None


def all_pids() -> list[int]:
    """Every process id /proc lists now."""
    try:
        return [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    except OSError:
        return []
