"""What tests share besides fixtures: running the CLI and commands, hashes of shard files, and
checks that no process outlives a test. The independent image reference (Pillow's Lanczos and
PSNR) is tools/reference.py, which the benchmarks use too."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from click.testing import CliRunner


def run_cli(args):
    from prep.cli import main

    return CliRunner().invoke(main, args, catch_exceptions=False)


def shard_into(source, out, *extra) -> dict:
    """``imgprep shard SOURCE --out OUT`` in small shards of 5 (``extra`` adds options); it must
    succeed. Returns the manifest."""
    import json

    result = run_cli(["shard", str(source), "--out", str(out), "--shard-size", "5", "--quiet", *map(str, extra)])
    assert result.exit_code == 0, result.output
    return json.loads((Path(out) / "manifest.json").read_text())


def shard_hashes(root: Path) -> dict:
    """SHA-256 of every shard file of a folder, by path relative to it."""
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(root).glob("*/*.h5"))}


# ----------------------------------------------------------------------------- processes

def living_members(group: int) -> list[str]:
    """'pid command' of the processes still running in process group ``group`` (zombies, which
    only wait for a parent to collect their exit status, do not count)."""
    return [f"{pid} " + command.replace(b"\0", b" ").decode(errors="replace")[:120]
            for pid, stat, command in living_processes() if stat.group == group]


def living_processes() -> list[tuple[int, object, bytes]]:
    """(pid, prep.procs.ProcessStat, command line) of every process running now (zombies, which
    only wait for a parent to collect their exit status, left out)."""
    from prep.procs import all_pids, command_line, process_stat

    found = []
    for pid in all_pids():
        stat, command = process_stat(pid), command_line(pid)
        if stat is not None and command is not None and stat.running:
            found.append((pid, stat, command))
    return found


def assert_group_ends(group: int, seconds: float = 10) -> None:
    """Every process of ``group`` is gone within ``seconds``."""
    deadline = time.time() + seconds
    while living_members(group) and time.time() < deadline:
        time.sleep(0.2)
    assert not living_members(group), living_members(group)


def run_command(args, env=None, timeout: float = 300):
    """Run a command in its own process group; returns (CompletedProcess, group id). A hang
    kills the whole group and fails the test."""
    process = subprocess.Popen([str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(map(str, args))} did not end within {timeout} s:\n{stdout}\n{stderr}")
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), process.pid


class ForwardReads:
    """An ``open_archive`` for tests that records, for each file it opens, how far before the
    furthest byte already read any read started: 0 (or a byte) when the file was read forward
    once, as a tar in a bucket must be, since each step back is another download."""

    def __init__(self):
        self.back = {}  # path -> the largest step back, in bytes

    def open(self, where):
        recorder = self

        class Recording:
            def __init__(self):
                self.file, self.furthest = open(where, "rb"), 0
                recorder.back[str(where)] = 0

            def read(self, size=-1):
                start = self.file.tell()
                data = self.file.read(size)
                recorder.back[str(where)] = max(recorder.back[str(where)], self.furthest - start)
                self.furthest = max(self.furthest, start + len(data))
                return data

            def seek(self, *where_to):
                return self.file.seek(*where_to)

            def tell(self):
                return self.file.tell()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.file.close()

        return Recording()

