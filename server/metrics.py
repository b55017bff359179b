"""Prometheus metrics of the service. Labels have bounded values only: never a site id or a code."""
from __future__ import annotations

from prometheus_client import Counter, Histogram

from .verdicts import VERDICT_ENUM

CHANNELS = ("pos", "bulk")

VERIFICATIONS = Counter("tracecode_verifications_total", "Lines judged, by verdict and channel",
                        ["verdict", "channel"])
SETTLEMENTS = Counter("tracecode_settlements_total", "Settlements handled, by outcome and channel",
                      ["outcome", "channel"])
# Buckets for a service that should answer in single-digit milliseconds.
VERIFY_SECONDS = Histogram(
    "tracecode_verify_duration_seconds", "Time to judge one settlement inside the server",
    ["channel"], buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
REDIS_ERRORS = Counter("tracecode_redis_errors_total", "Redis calls that failed (unreachable, timeout)")
REVERSALS = Counter("tracecode_reversals_total", "ReverseDispense calls that succeeded")

# Pre-bound children: the hot path does a dict lookup, not a label resolution.
_VERDICT = {(v, c): VERIFICATIONS.labels(v, c) for v in VERDICT_ENUM for c in CHANNELS}
_OUTCOME = {(o, c): SETTLEMENTS.labels(o, c) for o in ("recorded", "not_recorded", "replayed") for c in CHANNELS}
_LATENCY = {c: VERIFY_SECONDS.labels(c) for c in CHANNELS}


def observe_settlement(channel: str, outcome, seconds: float) -> None:
    """Count one settlement outcome (a verifier.SettlementOutcome) and its lines."""
    _LATENCY[channel].observe(seconds)
    if outcome.replayed:
        _OUTCOME["replayed", channel].inc()
        return
    _OUTCOME["recorded" if outcome.recorded else "not_recorded", channel].inc()
    for line in outcome.results:
        _VERDICT[line.verdict, channel].inc()
