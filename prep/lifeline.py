"""Worker processes that end with their parent and leave group signals to it.

Two things go wrong with worker pools when a job is stopped from outside:
- ``kill -9`` of the parent (or any death that runs no cleanup) leaves its workers alive and idle,
  holding whatever they inherited: file locks, shared memory, GPU memory. ``die_with_parent``
  asks the kernel to SIGKILL a worker when its parent goes (Linux's PR_SET_PDEATHSIG; a
  watchdog thread polling the parent's pid elsewhere).
- Ctrl-C and schedulers (SLURM, Kubernetes) signal every process of a job at once. A worker
  killed by that signal breaks its parent's stream of batches before the parent could stop in
  order. ``starting_workers`` starts workers with SIGINT, SIGTERM and SIGUSR1 blocked:
  the parent hears them and stops its workers itself (they still die with it, and to SIGKILL).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

from prep.atomic import release_inherited_locks

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
GROUP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # what terminals and schedulers send a job


def become_worker(parent_pid: int) -> None:
    """Call first thing in a worker: die with the parent, and ignore the group's SIGINT, SIGTERM
    and SIGUSR1 (workers started by exec, as under 'spawn', begin with an empty signal mask).
    Such a worker no longer ends on terminate(): its parent must stop it in order, or kill it."""
    die_with_parent(parent_pid)
    release_inherited_locks()
    if threading.current_thread() is threading.main_thread():
        for number in GROUP_SIGNALS:
            signal.signal(number, signal.SIG_IGN)


_prctl = []  # libc's prctl, looked up in the parent (see prepare_workers)


def prepare_workers() -> None:
    """Call in the parent before it forks workers: look prctl up now. A child forked from a
    process with other threads must not dlopen (a lock another thread held at the fork stays
    held in the child for ever)."""
    if not _prctl and sys.platform.startswith("linux"):
        try:
            _prctl.append(ctypes.CDLL(None, use_errno=True).prctl)
        except (OSError, AttributeError):
            _prctl.append(None)


def die_with_parent(parent_pid: int) -> None:
    """Call in a worker: it is killed when process ``parent_pid`` (its parent) ends, however that
    ends. ``parent_pid`` is taken in the parent before the worker starts, so a parent that dies
    before this call is noticed too."""
    prepare_workers()  # a no-op in a forked worker: its parent looked it up
    prctl = _prctl[0] if _prctl else None
    if prctl is not None and prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
        if os.getppid() != parent_pid:  # gone before prctl took effect
            os._exit(1)
        return
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="die-with-parent").start()


def _watch_parent(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


_forking_parent: list[int] = []  # set inside starting_workers(): the pid forked children must die with
_fork_hook: list[bool] = []  # whether the fork hook is registered (once a process)


@contextlib.contextmanager
def starting_workers():
    """Start a pool's workers inside this block. Processes forked here become workers at once
    (``become_worker``, through a fork hook registered once that acts only inside the block),
    even one that never gets a task; and they begin with GROUP_SIGNALS blocked (the signal mask
    survives fork), so a signal sent to the whole process group stops only this process, which
    then closes them in order. Workers started by 'spawn' call ``become_worker`` themselves.
    This process's own handlers are untouched: a signal that arrives meanwhile stays pending
    and is handled on leaving the block."""
    prepare_workers()
    if not _fork_hook:
        os.register_at_fork(after_in_child=_after_fork_in_child)
        _fork_hook.append(True)
    _forking_parent.append(os.getpid())
    try:
        with signals_blocked(GROUP_SIGNALS):
            yield
    finally:
        _forking_parent.pop()


@contextlib.contextmanager
def signals_blocked(numbers):
    """Within the block ``numbers`` are blocked in this (main) thread: processes forked here start
    with them blocked, and one that arrives meanwhile stays pending until the block is left.
    Elsewhere than in the main thread (where signals are handled), nothing changes."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_sigmask"):
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, numbers)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _after_fork_in_child() -> None:
    if _forking_parent:
        parent = _forking_parent[-1]
        _forking_parent.clear()  # this child's own children are not ours to mark
        become_worker(parent)


@contextlib.contextmanager
def sigterm_as_interrupt(*numbers):
    """Within the block SIGTERM (or the signals ``numbers``) stops this process as Ctrl-C does
    (KeyboardInterrupt), so the same cleanup runs: workers stopped, temporary files removed,
    one line said."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(number, frame):
        raise KeyboardInterrupt

    previous = {number: signal.signal(number, interrupt) for number in numbers or (signal.SIGTERM,)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
