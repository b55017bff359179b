"""POS calls come first. A bulk job that shares a server with POS traffic runs its work in smaller
slices while POS calls are arriving (server/bulk.py), so a pharmacy's settlement waits behind less
of a job's Python (the GIL) and Redis work; with no POS traffic a job runs in large slices, at
full speed. docs/performance.md ("A bulk job beside POS traffic") has the measurements.

The signal is one timestamp: the monotonic time of the last POS call, written by every POS
handler, read once per slice. With `tracecode serve --workers N` the workers share it through an
8-byte file the supervisor creates (mapped into each worker's memory; CLOCK_MONOTONIC is one
clock for every process of the machine), so a job on one worker also yields to POS calls that
another worker answers: they all meet in the same Redis."""
from __future__ import annotations

import functools
import mmap
import os
import struct
import time

WINDOW_S = 1.0  # a POS call within this long ago counts as POS traffic
SHARED_ENV = "TRACECODE_INTERNAL_POS_CLOCK"  # path of the workers' shared timestamp file

_last_pos_call = float("-inf")  # this process's own, when no shared file is attached
_shared: mmap.mmap | None = None
_STAMP = struct.Struct("d")


def create_shared(directory: str) -> str:
    """The supervisor's part: a zeroed timestamp file in `directory`; returns its path."""
    path = os.path.join(directory, "pos-clock")
    with open(path, "wb") as fh:
        fh.write(bytes(_STAMP.size))
    return path


def attach(path: str | None) -> None:
    """Read and write the shared timestamp at `path` (None: this process's own again)."""
    global _shared
    if _shared is not None:
        _shared.close()
        _shared = None
    if path:
        with open(path, "r+b") as fh:
            _shared = mmap.mmap(fh.fileno(), _STAMP.size)


def foreground(method):
    """Marks a gRPC handler as POS traffic."""
    @functools.wraps(method)
    def handler(*args, **kwargs):
        global _last_pos_call
        now = time.monotonic()
        if _shared is not None:
            _STAMP.pack_into(_shared, 0, now)
        else:
            _last_pos_call = now
        return method(*args, **kwargs)
    return handler


def pos_traffic() -> bool:
    """Whether this server (any of its workers) has answered a POS call within WINDOW_S."""
    last = _STAMP.unpack_from(_shared, 0)[0] if _shared is not None else _last_pos_call
    return time.monotonic() - last < WINDOW_S


attach(os.environ.get(SHARED_ENV))
