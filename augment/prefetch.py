"""Shard files of a bucket downloaded ahead of the batches that read them.

A Loader over a URL reads its shards through the node's cache (``prep.cache``). Without help a
file is downloaded when a worker first needs it, and the worker waits. ``ShardPrefetch`` runs a
few threads in the loader's own process that download the files the coming batches will read,
in the order they are first needed:

    files     = the shard files of this rank's samples of the epoch, from the current batch on,
                each once, in the order of the batch that first reads it
    allowed   = the files the current batch needs + ``ahead`` more

In shard-window order (a bounded cache) a window's K files are first needed together, so with
``ahead`` = K the next window downloads while this one is read: the two fit in a cache of 4K.
In a fully random order nearly every file is needed by the first batches, and the threads
download them side by side instead of one a worker.

A download goes through the same locks as the workers' (``ShardCache.fetch``): a file is never
downloaded twice, and a worker wanting a file being prefetched waits for it. The prefetch only
hurries what would happen anyway: if one fails, the worker that needs the file tries again and
reports the error in its own words.
"""

from __future__ import annotations

import threading

import numpy as np

THREADS = 4  # downloads at once: requests to an object store are latency-bound, not CPU-bound
AHEAD = 8  # files beyond the current batch's, when the order has no windows


class ShardPrefetch:
    """``follow(epoch, position)`` when an epoch starts, ``consumed(position)`` after each batch,
    ``close()`` at the end."""

    def __init__(self, reader, plan, ahead: int, threads: int = THREADS):
        self.reader, self.plan, self.ahead = reader, plan, ahead
        self._lock = threading.Condition()
        self._files: list[int] = []  # file numbers in first-use order
        self._first_use: np.ndarray = np.zeros(0, np.int64)  # the batch position each is first read at
        self._next = 0  # index into _files of the next file to fetch
        self._position = 0
        self._closed = False
        self._threads = [threading.Thread(target=self._run, daemon=True, name=f"shard-prefetch-{i}")
                         for i in range(threads)]
        for thread in self._threads:
            thread.start()

    def follow(self, epoch: int, position: int) -> None:
        """The batches to come are ``epoch``'s from ``position`` on."""
        plan = self.plan
        order = plan.order(epoch)[position * plan.batch_size:]
        file_nos, _ = self.reader.locate_many(order)
        files, first = np.unique(file_nos, return_index=True)
        by_use = np.argsort(first, kind="stable")
        with self._lock:
            self._files = files[by_use].tolist()
            self._first_use = first[by_use] // plan.batch_size + position
            self._next, self._position = 0, position
            self._lock.notify_all()

    def consumed(self, position: int) -> None:
        """Batch ``position`` - 1 was taken: the one at ``position`` is current."""
        with self._lock:
            self._position = position
            self._lock.notify_all()

    def _allowed(self) -> int:
        """How many of ``_files`` may be fetched by now (under the lock)."""
        needed = int(np.searchsorted(self._first_use, self._position, side="right"))
        return min(len(self._files), needed + self.ahead)

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._closed and self._next >= self._allowed():
                    self._lock.wait()
                if self._closed:
                    return
                file_no = self._files[self._next]
                self._next += 1
            reader = self.reader
            try:
                held = reader.cache.fetch(reader.files[file_no], reader.sha256s[file_no], reader.file_bytes[file_no])
                held.close()  # cached now; the worker that reads it holds it then
            except Exception:  # the worker that needs it fetches it again and says what is wrong
                pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        for thread in self._threads:
            thread.join(timeout=60)  # a download in flight finishes (or fails) first
