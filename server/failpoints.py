"""Fault injection for crash tests: TRACECODE_FAILPOINTS="after_prepare=5" makes the named point
sleep 5 seconds, so a test can kill the process exactly there. Unset (production), a failpoint is
one dict lookup."""
from __future__ import annotations

import os
import time


def _parse(spec: str) -> dict[str, float]:
    points = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, seconds = item.partition("=")
        points[name] = float(seconds or 0)
    return points


_POINTS = _parse(os.environ.get("TRACECODE_FAILPOINTS", ""))


def failpoint(name: str) -> None:
    delay = _POINTS.get(name)
    if delay is not None:
        time.sleep(delay)
