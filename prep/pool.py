"""The process pool of the CPU stages (``imgprep shard``, ``imgprep pca-stats``).

One pool, so every stage gets the same behaviour from its workers:
- they die with the parent however it ends, and close their copies of the folder lock;
- Ctrl-C is the parent's: workers ignore SIGINT, and the parent ends them (SIGTERM) when it
  stops early, instead of letting each finish its task first;
- a worker that dies (killed for memory, a crash in a native library) breaks the pool; the
  error names the task that worker was running, which the executor itself cannot tell;
- the progress bar opens after the fork (tqdm runs a thread: a fork copies none, but may copy a
  lock one of them held) and closes however the run ends.

To know who ran what, each worker owns a row of a shared table: (its pid, 1 + the number of the
task it is running or 0, 1 once it was told to stop). When the pool breaks, the executor stops
the other workers with SIGTERM, which each notes in its row before it ends; once they are all
gone, the worker that died is the one mid-task that was never told to stop.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from prep.atomic import release_inherited_locks
from prep.errors import quiet_cleanup_echoes
from prep.lifeline import die_with_parent, prepare_workers, signals_blocked
from prep.procs import process_stat


def usable_cores() -> int:
    """The cores this process may run on (containers and taskset restrict them), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class WorkerDied(Exception):
    """A worker process died; ``tasks`` are those it may have been running (one when known)."""

    def __init__(self, tasks: list):
        super().__init__(f"a worker process died while running {len(tasks)} candidate task(s)")
        self.tasks = tasks


STARTING_SIGNALS = {signal.SIGINT, signal.SIGTERM}  # blocked from fork until a worker has its handlers
_table = None  # in a worker: the shared table of (pid, task, stopped) rows
_row = -1  # in a worker: its row of the table
COLUMNS = 3


def _note_stop(number, frame) -> None:
    """SIGTERM in a worker: note it, then end as SIGTERM ends a process."""
    _table[COLUMNS * _row + 2] = 1
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


def _start_worker(table, rows, parent_pid: int, initializer, initargs) -> None:
    global _table, _row
    die_with_parent(parent_pid)
    release_inherited_locks()
    quiet_cleanup_echoes()  # for workers that were not forked from a command (spawn, tests)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    with rows.get_lock():
        _row, rows.value = rows.value, rows.value + 1
    _table = table
    table[COLUMNS * _row] = os.getpid()
    # The parent may turn SIGTERM into KeyboardInterrupt (a clean stop) or note it and go on (a
    # training run); a worker inherits that handler, but must simply end when the parent stops it
    # (terminate()), mid-write or not. The signals were blocked since the fork (see
    # WorkerPool.run): one sent meanwhile is delivered now, to these handlers.
    signal.signal(signal.SIGTERM, _note_stop)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STARTING_SIGNALS)
    if initializer is not None:
        initializer(*initargs)


def _run(function, number: int, task):
    _table[COLUMNS * _row + 1] = number + 1
    result = function(task)
    _table[COLUMNS * _row + 1] = 0
    return result


class WorkerPool:
    """``with WorkerPool(workers) as pool: for task, result in pool.run(function, tasks, bar=...): ...``

    ``run`` forks the workers before it returns its iterator; the bar (``pool.bar``) is made when
    iteration starts. Leaving the block early (an error, Ctrl-C) ends the workers at once; either
    way every worker has been joined when the block is left.
    """

    def __init__(self, workers: int, initializer=None, initargs=()):
        self.workers, self.initializer, self.initargs = max(1, workers), initializer, initargs
        self.executor = None
        self.bar = None

    def __enter__(self):
        return self

    def run(self, function, tasks: list, poll=None, every: float = 0.25, bar=None, died=None):
        """Submit every task (forking the workers), and return an iterator of (task, result)
        in the order they finish; ``poll()`` is called every ``every`` seconds meanwhile.
        ``bar()`` makes the progress bar (``self.bar`` while iterating; a tqdm or any context
        manager). A dead worker raises ``died(tasks)``, the exception for the tasks it may have
        been running (one when known), or WorkerDied(tasks)."""
        tasks = list(tasks)
        workers = min(self.workers, max(1, len(tasks)))
        table = multiprocessing.Array("q", COLUMNS * workers, lock=False)
        prepare_workers()
        self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context(),
                                            initializer=_start_worker,
                                            initargs=(table, multiprocessing.Value("i", 0), os.getpid(),
                                                      self.initializer, self.initargs))
        # The workers are forked by the first submit, with this thread's signal mask: block the
        # signals whose handlers they replace, or one arriving before they have (an early stop)
        # would run this process's handler in them.
        with signals_blocked(STARTING_SIGNALS):
            futures = {self.executor.submit(_run, function, n, task): n for n, task in enumerate(tasks)}
        return self._results(futures, tasks, table, poll, every, bar, died or WorkerDied)

    def _results(self, futures, tasks, table, poll, every, bar, died):
        with bar() if bar is not None else contextlib.nullcontext() as self.bar:
            while futures:
                done, _ = wait(futures, timeout=every, return_when=FIRST_COMPLETED)
                if poll is not None:
                    poll()
                for future in done:
                    number = futures.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        raise died(_suspects(table, tasks) or [tasks[number]]) from None
                    yield tasks[number], result

    def __exit__(self, kind, error, trace):
        if self.executor is None:
            return
        if kind is not None:  # workers ignore SIGINT and would finish their task first
            _stop_workers(self.executor)
        # shutdown joins the workers: none is left holding the folder lock
        self.executor.shutdown(wait=True, cancel_futures=True)


def _stop_workers(executor, seconds: float = 10) -> None:
    """End the workers of ``executor`` now (SIGTERM, then SIGKILL after ``seconds``).

    A worker ended while it was sending its result leaves half a message in the result pipe, and
    the executor's thread, reading it, would wait for the rest for ever (and shutdown with it):
    once the workers are gone, this process closes its own copy of the pipe's writing end, so
    that read ends instead (the executor then counts the pool as broken, which it is)."""
    processes = list((getattr(executor, "_processes", None) or {}).values())
    for process in processes:
        process.terminate()
    waiting, deadline = {p.sentinel: p for p in processes}, time.monotonic() + seconds
    while waiting and time.monotonic() < deadline:
        for sentinel in multiprocessing.connection.wait(list(waiting), deadline - time.monotonic()):
            waiting.pop(sentinel)
    for process in waiting.values():
        process.kill()
    writer = getattr(getattr(executor, "_result_queue", None), "_writer", None)
    if writer is not None:
        writer.close()


def _suspects(table, tasks, seconds: float = 10) -> list:
    """The tasks of the workers that were mid-task when the pool broke and were not stopped by
    the executor's SIGTERM (all those mid-task, if that is not known within ``seconds``)."""
    rows = [table[i:i + COLUMNS] for i in range(0, len(table), COLUMNS)]
    running = [(pid, task - 1) for pid, task, _ in rows if task]
    deadline = time.monotonic() + seconds
    while any(_alive(pid) for pid, _ in running) and time.monotonic() < deadline:
        time.sleep(0.01)
    rows = [table[i:i + COLUMNS] for i in range(0, len(table), COLUMNS)]
    died = [task - 1 for _, task, stopped in rows if task and not stopped]
    return [tasks[n] for n in (died or [n for _, n in running])]


def _alive(pid: int) -> bool:
    stat = process_stat(pid)
    return stat is not None and stat.running
