"""POS calls come first. A bulk job that shares a server process with POS traffic runs its work
in smaller slices while POS calls are arriving (server/bulk.py), so a pharmacy's settlement waits
behind less of a job's Python (the GIL) and Redis work; with no POS traffic a job runs in large
slices, at full speed. One timestamp per process: written by each POS call, read per slice.
docs/performance.md ("A bulk job beside POS traffic") has the measurements."""
from __future__ import annotations

import functools
import time

WINDOW_S = 1.0  # a POS call within this long ago counts as POS traffic

_last_pos_call = float("-inf")


def foreground(method):
    """Marks a gRPC handler as POS traffic."""
    @functools.wraps(method)
    def handler(*args, **kwargs):
        global _last_pos_call
        _last_pos_call = time.monotonic()
        return method(*args, **kwargs)
    return handler


def pos_traffic() -> bool:
    """Whether this process has answered a POS call within WINDOW_S."""
    return time.monotonic() - _last_pos_call < WINDOW_S
