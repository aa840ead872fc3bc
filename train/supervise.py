"""Process supervision of a data-parallel run: start the local ranks, pass signals on, end stuck
ones, and turn how each ended into one outcome; in each rank, note stop signals (``StopSignals``).

``launch`` runs an entrypoint in N local processes through torch's elastic launch API (what
``torchrun --standalone`` does). Each rank leaves a report file saying how it ended; the launcher
reads them and raises the first cause as one line (``RankError``), or returns rank 0's result.
The collectives and the process group are ``train.dist``'s.
"""

from __future__ import annotations

import functools
import os
import signal
import threading
import uuid

from prep.atomic import atomic_write_text
from prep.errors import ImgprepError


def launch(entrypoint, args: tuple, nproc: int):
    """Run ``entrypoint(*args)`` in ``nproc`` local processes; returns rank 0's result.

    Uses a c10d rendezvous on a free local port (torchrun --standalone does the same). Each
    process reports how it ended through a file in a private folder (``_report``), so a failure
    ends the command with one line naming its first cause, not with every rank's traceback:
    ImgprepError -> ``RankError`` with its message; any other exception -> its traceback, printed
    here, then ``RankError``; Ctrl-C -> KeyboardInterrupt; a process killed by a signal (out of
    memory) -> ``RankError`` naming the signal. The other processes stop when one fails.

    SIGTERM, SIGUSR1 and SIGINT sent to this process are passed on to the ranks, which stop in
    order (``train.loop``); this process waits for them.
    """
    import logging
    import shutil
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Elastic (and torch's process spawning under it) log each failure and each signal at
    # length; ours is one line (see _outcome).
    quiet = ("torch.distributed.elastic", "torch.multiprocessing")
    for name in [*quiet, *logging.root.manager.loggerDict]:
        if name.startswith(quiet):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    reports = tempfile.mkdtemp(prefix="imgprep-ranks-")
    # signals_to_handle: the agent's own handling of SIGTERM and SIGINT would end it with an
    # exception that leaves its rendezvous running (and an abort at exit): those are ours.
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.2,
                          signals_to_handle="SIGHUP,SIGQUIT")
    died = {}
    watcher = threading.Thread(target=_end_stuck_ranks, args=(reports,), daemon=True, name="end-stuck-ranks")
    watcher.start()
    previous_env = os.environ.get(AGENT_SIGNALS)  # LaunchConfig sets it for the agent
    previous = {number: signal.signal(number, functools.partial(_pass_on, reports)) for number in PASSED_ON}
    try:
        try:
            elastic_launch(config, _report)(entrypoint, args, reports, os.getpid())
        except ChildFailedError as failure:
            died = {rank: f.signal_name() for rank, f in failure.failures.items() if f.exitcode < 0}
        except SignalException:  # SIGHUP or SIGQUIT: the agent has stopped the ranks
            pass
        return _outcome(reports, nproc, died)
    finally:
        _launch_over.add(reports)
        for number, handler in previous.items():
            signal.signal(number, handler)
        if previous_env is None:
            os.environ.pop(AGENT_SIGNALS, None)
        else:
            os.environ[AGENT_SIGNALS] = previous_env
        shutil.rmtree(reports, ignore_errors=True)


AGENT_SIGNALS = "TORCHELASTIC_SIGNALS_TO_HANDLE"
PASSED_ON = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


STUCK_GRACE_SECONDS = 5  # after one rank failed, how long the others may take to notice
_launch_over: set = set()  # report folders whose launch has returned (their watchers stop)


def _pass_on(reports: str, number, frame) -> None:
    """Send the signal this launcher received to every rank. A rank that has not written its
    pid yet finds the "stop" file instead (written first, read by ``_report`` after its pid)."""
    atomic_write_text(os.path.join(reports, "stop"), signal.Signals(number).name)
    _signal_ranks(reports, number)


def _signal_ranks(reports: str, number, spare=()) -> None:
    for name in os.listdir(reports):
        if name.endswith(".pid") and name[: -len(".pid")] not in spare:
            try:
                with open(os.path.join(reports, name)) as f:
                    os.kill(int(f.read()), number)
            except (OSError, ValueError):
                pass  # already gone


def _end_stuck_ranks(reports: str) -> None:
    """Once a rank has failed, the others end by themselves when their next collective fails
    (gloo notices a closed peer at once); NCCL waits for its timeout instead. Give them
    STUCK_GRACE_SECONDS, then SIGKILL those that have not reported."""
    import json
    import time

    failed_at = None
    while reports not in _launch_over:
        time.sleep(0.2)
        try:
            names = os.listdir(reports)
        except OSError:
            return
        reported = {name[: -len(".json")] for name in names if name.endswith(".json")}
        if failed_at is None:
            for rank in reported:
                try:
                    with open(os.path.join(reports, rank + ".json")) as f:
                        record = json.load(f)
                except (OSError, ValueError):
                    continue
                if "error" in record or "traceback" in record:
                    failed_at = time.monotonic()
        elif time.monotonic() - failed_at > STUCK_GRACE_SECONDS:
            _signal_ranks(reports, signal.SIGKILL, spare=reported)
            return


_early_stops: list[str] = []  # stop signals this rank got before its entrypoint installed handlers


def _note_early_stop(number, frame) -> None:
    _early_stops.append(signal.Signals(number).name)


def early_stop() -> str | None:
    """The name of a stop signal that arrived while this process was starting, if any."""
    return _early_stops[0] if _early_stops else None


class RankError(ImgprepError):
    """A process of a data-parallel run failed; the message names the first cause."""


def _report(entrypoint, args: tuple, reports: str, launcher_pid: int):
    """Each process: run ``entrypoint``, then leave {"result" | "error" | "traceback" |
    "interrupted" | "consequence"} in reports/rank-N.json. A failure exits non-zero at once, so
    the launcher stops the other processes instead of leaving them waiting in a collective."""
    import json
    import traceback

    from prep.lifeline import die_with_parent

    die_with_parent(launcher_pid)  # a launcher killed outright takes its ranks with it
    for number in (signal.SIGTERM, signal.SIGUSR1):  # until the entrypoint listens (see early_stop)
        signal.signal(number, _note_early_stop)
    rank = int(os.environ["RANK"])
    path = os.path.join(reports, f"rank-{rank}.json")
    atomic_write_text(os.path.join(reports, f"rank-{rank}.pid"), str(os.getpid()))
    if os.path.exists(os.path.join(reports, "stop")):  # signalled before our pid was there to see
        with open(os.path.join(reports, "stop")) as f:
            _note_early_stop(signal.Signals[f.read().strip()], None)

    def leave(record: dict, code: int):
        atomic_write_text(path, json.dumps(record))
        if code:
            raise SystemExit(code)

    try:
        if early_stop() == "SIGINT":
            raise KeyboardInterrupt
        result = entrypoint(*args)
    except ImgprepError as error:  # its traceback travels too, for IMGPREP_DEBUG=1
        leave({"error": str(error), "error_traceback": traceback.format_exc()}, 1)
    except KeyboardInterrupt:
        leave({"interrupted": True}, 130)
    except Exception as error:
        # A collective fails on every rank once one rank has gone: only the first cause counts.
        others = [name for name in os.listdir(reports) if name.endswith(".json") and name != f"rank-{rank}.json"]
        leave({"consequence": str(error)} if others else {"traceback": traceback.format_exc()}, 1)
    leave({"result": result}, 0)
    return result


def _outcome(reports: str, nproc: int, died: dict):
    import json
    import sys

    records = {}
    for rank in range(nproc):
        path = os.path.join(reports, f"rank-{rank}.json")
        if os.path.isfile(path):
            with open(path) as f:
                records[rank] = json.load(f)
    for rank, record in sorted(records.items()):
        if "error" in record:
            error = RankError(f"rank {rank}: {record['error']}")
            error.remote_traceback = f"rank {rank}:\n{record.get('error_traceback', '')}"
            raise error
    for rank, signal_name in sorted(died.items()):
        hint = " (out of memory?)" if signal_name == "SIGKILL" else ""
        raise RankError(f"rank {rank} was killed by {signal_name}{hint}")
    for rank, record in sorted(records.items()):
        if "traceback" in record:
            print(record["traceback"], file=sys.stderr, end="")
            raise RankError(f"rank {rank} failed with the error above")
    if any("interrupted" in record for record in records.values()):
        raise KeyboardInterrupt
    if 0 in records and "result" in records[0]:
        return records[0]["result"]
    missing = sorted(set(range(nproc)) - set(records))
    raise RankError(f"rank {missing[0] if missing else 0} ended without a result")


class StopSignals:
    """Notes SIGTERM and SIGUSR1 instead of dying on them; ``run`` stops at its next check.
    The first SIGINT raises KeyboardInterrupt; later ones (a terminal and a launcher may both
    send one) are ignored, so they cannot cut short the closing of the loaders."""

    NUMBERS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.received: str | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        self.received = early_stop()  # one that came while the process was starting
        if threading.current_thread() is threading.main_thread():
            self._previous = {number: signal.signal(number, self._note) for number in self.NUMBERS}
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._interrupt)
        return self

    @staticmethod
    def _interrupt(number, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        raise KeyboardInterrupt

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _note(self, number, frame) -> None:
        self.received = signal.Signals(number).name
