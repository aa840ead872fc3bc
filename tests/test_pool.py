"""The process pool of imgprep shard and pca-stats: a dead worker is named, an early stop ends
the workers at once, and pca-stats gets the same behaviour as shard."""

import os
import time
from pathlib import Path

import pytest

from helpers import living_processes
from prep.errors import PrepError
from prep.pool import WorkerDied, WorkerPool

pytestmark = pytest.mark.timeout(120)


def square_or_die(n: int) -> int:
    if n == 5:
        time.sleep(0.3)  # the others are mid-task when this one dies
        os._exit(9)
    time.sleep(0.5 if n < 4 else 0)
    return n * n


def sleep_long(n: int) -> int:
    time.sleep(60)
    return n


def children() -> list[int]:
    """This process's living children, less multiprocessing's resource tracker: Python starts
    that helper once, the first time anything in the process spawns (an earlier test's DALI
    loader does), and keeps it to the end on purpose."""
    return [pid for pid, stat, command in living_processes()
            if stat.parent == os.getpid() and b"multiprocessing.resource_tracker" not in command]


def test_results_are_every_task_once():
    with WorkerPool(2) as pool:
        results = dict(pool.run(square_or_die, [0, 1, 2, 3, 4, 6]))
    assert results == {n: n * n for n in [0, 1, 2, 3, 4, 6]}


@pytest.mark.parametrize("workers", [2, 3])
def test_a_dead_worker_is_named_by_its_task(workers):
    with pytest.raises(WorkerDied) as caught:
        with WorkerPool(workers) as pool:
            list(pool.run(square_or_die, [1, 2, 5, 3]))
    assert caught.value.tasks == [5]
    assert not children()


def test_leaving_early_ends_the_workers_at_once():
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        with WorkerPool(2) as pool:
            results = pool.run(sleep_long, [1, 2, 3])
            assert len(children()) == 2
            time.sleep(0.5)
            raise KeyboardInterrupt  # as Ctrl-C raises it in the parent
    assert time.monotonic() - started < 10 and not children()
    assert results is not None


def test_a_dead_pca_stats_worker_names_its_shard_and_nothing_is_written(fresh_copy, monkeypatch):
    import prep.stats
    from prep.shards import open_shards

    victim = sorted((fresh_copy / "train").glob("*.h5"))[1]
    real = prep.stats.shard_sums

    def dying(root, split, file_no, *args):
        if Path(root) / open_shards(root).split(split).files[file_no] == victim:
            os._exit(9)
        return real(root, split, file_no, *args)

    monkeypatch.setattr(prep.stats, "shard_sums", dying)  # the workers are forked: they see it
    with pytest.raises(PrepError, match=f"a pca-stats worker process died while reading {victim} "):
        prep.stats.compute_stats(fresh_copy, workers=2, progress=False)
    assert not (fresh_copy / "stats.json").exists() and not children()


FIRST = "/tmp/imgprep-test-pool-first-{}"  # made by the first worker to start (per test run)


def second_starts_slowly(parent_pid: int) -> None:
    """The first worker starts at once; the others are still starting 1 s later."""
    try:
        os.close(os.open(FIRST.format(parent_pid), os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        time.sleep(1)


@pytest.mark.timeout(60)
def test_workers_stopped_while_they_start_end_even_if_the_parent_notes_sigterm(monkeypatch):
    # A training run notes SIGTERM and goes on; forked workers inherit that handler until they
    # set their own. Here one worker is idle (holding the task queue's lock) and the other still
    # starting when the parent stops: the first dies holding the lock, so the second, had it
    # only noted the SIGTERM, would wait for that lock for ever, and so would shutdown.
    import signal

    import prep.pool

    monkeypatch.setattr(prep.pool, "die_with_parent", second_starts_slowly)
    previous = signal.signal(signal.SIGTERM, lambda number, frame: None)
    try:
        with pytest.raises(RuntimeError):
            with WorkerPool(2) as pool:
                pool.run(square_or_die, [4, 6])
                time.sleep(0.5)  # the first worker has done both tasks and waits for more
                raise RuntimeError("the parent stops early")
    finally:
        signal.signal(signal.SIGTERM, previous)
        if os.path.exists(FIRST.format(os.getpid())):
            os.unlink(FIRST.format(os.getpid()))
    assert not children()


@pytest.mark.timeout(60)
def test_a_result_cut_short_by_a_stop_does_not_hang_the_pool():
    # A worker ended while sending its result leaves a length and part of the bytes in the
    # result pipe; the executor's thread reads them and waits for the rest. Here the parent
    # writes such a half message itself: the length of 1 MiB, then nothing.
    import struct

    started = time.monotonic()
    with pytest.raises(RuntimeError):
        with WorkerPool(1) as pool:
            pool.run(sleep_long, [1])
            pool.executor._result_queue._writer._send(struct.pack("!i", 1 << 20))
            time.sleep(0.5)  # the executor's thread is reading it now
            raise RuntimeError("the parent stops early")
    assert time.monotonic() - started < 30 and not children()
