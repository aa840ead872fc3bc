"""One shard task: read its planned files, decode and resize them, write the shard and its record.

A task is independent of every other: it needs the reader of the source, the output folder and
the options, and it leaves two files behind, both written atomically:

    OUT/<split>/<split>-NNNNN.h5      the shard (absent when every file of the task was rejected)
    OUT/.partial/<split>-NNNNN.json   its record: count, sha256, rejects; written last

A task whose record exists is done; a resumed run skips it. This is what the local process pool
runs, and what any other engine may run.
"""

from __future__ import annotations

import errno
import json
import time
from pathlib import Path

from prep.atomic import atomic_write_text, no_space
from prep.decode import HELD_BYTES_PER_PIXEL, decode_resize
from prep.encodings import storage_for
from prep.errors import BadImage, OutputError, PrepError
from prep.plan import ShardOptions, ShardTask
from prep.shards import sha256_file, write_shard

JOURNAL = ".partial"
# Read errors that say something about the file itself, and so make it a reject at once. Any other
# (EIO, ESTALE, EMFILE...) may pass: the read is tried READ_TRIES times. A file that still fails
# is a reject (one bad sector must not block every rerun), unless FAILING_IN_A_ROW files in a row
# fail so: then it is the disk or the mount, and the task stops instead of rejecting them all.
LASTING_READ_ERRORS = {errno.ENOENT, errno.EACCES, errno.EPERM, errno.EISDIR, errno.ENOTDIR, errno.ELOOP,
                       errno.ENAMETOOLONG}
READ_TRIES = 3
FAILING_IN_A_ROW = 3


def max_file_bytes(options: ShardOptions) -> int:
    """Files are read whole, so this bounds a worker's memory. decode.check_decoded_bytes admits
    images of at most HELD_BYTES_PER_PIXEL bytes a pixel of the cap once decoded; an
    uncompressed file of such an image is no larger, plus its header."""
    return HELD_BYTES_PER_PIXEL * options.max_pixels + (1 << 20)


def read_with_retries(reader, key: str, max_bytes: int) -> bytes:
    """``reader.read``, tried again (after 0.1 s, then 0.4 s) on an error that may pass."""
    for attempt in range(1, READ_TRIES + 1):
        try:
            return reader.read(key, max_bytes)
        except OSError as error:
            if error.errno in LASTING_READ_ERRORS or attempt == READ_TRIES:
                raise
        time.sleep(0.1 * 4 ** (attempt - 1))


def record_path(out: Path, task: ShardTask) -> Path:
    return Path(out) / JOURNAL / f"{task.name}.json"


def build_shard(task: ShardTask, reader, out: Path, options: ShardOptions, on_image=None) -> dict:
    """Run one task; returns its record. ``on_image()`` is called once per file handled."""
    out = Path(out)
    size = options.size
    storage = storage_for(options.encoding, options.policy)
    encoded, keys, labels, rejects = [], [], [], []
    failing = 0  # files in a row whose reads failed with an error that may pass
    for key, label in task.items:
        try:
            data = read_with_retries(reader, key, max_file_bytes(options))
            failing = 0
            image = decode_resize(data, size, options.policy, options.max_pixels, options.max_aspect)
        except BadImage as error:
            rejects.append([key, str(error)])
        except OSError as error:
            reason = error.strerror or str(error)
            if error.errno in LASTING_READ_ERRORS:
                rejects.append([key, f"unreadable: {reason}"])
            else:
                failing += 1
                if failing == FAILING_IN_A_ROW:
                    raise PrepError(f"reading {key} failed ({reason}), as did the {failing - 1} files before it: "
                                    "the disk or mount, not the files; finished shards are kept: rerun the same "
                                    "command to resume") from None
                rejects.append([key, f"unreadable after {READ_TRIES} tries: {reason}"])
        except MemoryError:
            raise
        except Exception as error:  # a decoder bug on one odd file must not end a long run
            rejects.append([key, f"unexpected decoder error: {type(error).__name__}: {error}"])
        else:
            encoded.append(storage.encode(image, options.quality))
            keys.append(key)
            labels.append(label)
        if on_image:
            on_image()

    record = {"split": task.split, "index": task.index, "file": None, "count": len(keys), "sha256": None}
    path = out / task.file
    try:
        if keys:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_shard(path, task.split, options, labels, keys, encoded)
            record.update(file=task.file, sha256=sha256_file(path))
        record["rejects"] = rejects
        atomic_write_text(record_path(out, task), json.dumps(record))
    except OSError as error:  # a full disk, a lost mount: one line, and a rerun resumes
        if no_space(error):
            raise OutputError(f"no space left on {out} (writing {task.file}); finished shards are kept: free "
                              "space, then rerun the same command to resume") from None
        raise OutputError(f"cannot write {path}: {error.strerror or error}") from None
    return record
