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

_STAMP = struct.Struct("d")
# Where the timestamp lives: this process's own buffer, or the workers' shared file (attach).
_clock: bytearray | mmap.mmap = bytearray(_STAMP.size)


def create_shared(directory: str) -> str:
    """The supervisor's part: a zeroed timestamp file in `directory`; returns its path."""
    path = os.path.join(directory, "pos-clock")
    with open(path, "wb") as fh:
        fh.write(bytes(_STAMP.size))
    return path


def attach(path: str | None) -> None:
    """Read and write the shared timestamp at `path` (None: this process's own again)."""
    global _clock
    if isinstance(_clock, mmap.mmap):
        _clock.close()
    _clock = bytearray(_STAMP.size)
    if path:
        with open(path, "r+b") as fh:
            _clock = mmap.mmap(fh.fileno(), _STAMP.size)


def foreground(method):
    """Marks a gRPC handler as POS traffic."""
    @functools.wraps(method)
    def handler(*args, **kwargs):
        _STAMP.pack_into(_clock, 0, time.monotonic())
        return method(*args, **kwargs)
    return handler


def pos_traffic() -> bool:
    """Whether this server (any of its workers) has answered a POS call within WINDOW_S."""
    return time.monotonic() - _STAMP.unpack_from(_clock, 0)[0] < WINDOW_S


attach(os.environ.get(SHARED_ENV))
