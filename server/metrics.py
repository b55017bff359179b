"""Prometheus metrics of the service (the gRPC server metrics live in api/interceptors.py).

Names follow the Prometheus conventions: base units (seconds), `_total` on counters, `_info` for
constant build labels. Labels have bounded values only: a verdict, a channel, an outcome, a Redis
operation or a bulk job kind; never a site id, a settlement id or a code (per-site suspicion is
served by the API, not by label cardinality). Every child a dashboard or alert needs is created at
import, so a series exists at 0 before its first event and `increase()` sees that first event.

docs/operations.md lists every metric and the alerts built on them.

May import: prometheus-client and the plain modules (errors, verdicts); never redis or grpc.
"""
from __future__ import annotations

import os
import time
from contextlib import contextmanager
from typing import Iterator

from prometheus_client import Counter, Gauge, Histogram, disable_created_metrics, start_http_server, values

from tracecode import __version__, codec

from tracecode.rules.verdicts import VERDICTS

# The `_created` companion series double the series count and Prometheus does not use them.
disable_created_metrics()

# With --workers (multiprocess mode), every inc/observe of a value checks os.getpid() for a fork
# since the last one: a system call each time (glibc does not cache the pid), ~13 per
# settlement, about 7 % of a worker's GIL time (docs/performance.md, issue 19). The same value
# class, given a pid read once per process (and again in a forked child), writes the very same
# files and values. Switched only while no metric exists yet: two value classes would keep two
# maps of the same per-pid file.
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


def _cached_pid() -> int:
    return _PID[0]


def _use_cached_pid() -> bool:
    cls = values.ValueClass
    if not getattr(cls, "_multiprocess", False):
        return False  # one process: no pid check at all
    init = getattr(cls, "__init__", None)
    cells = dict(zip(getattr(getattr(init, "__code__", None), "co_freevars", ()), getattr(init, "__closure__", None) or ()))
    made = cells.get("values")  # the values this class has created (prometheus_client's closure)
    if made is None or not isinstance(made.cell_contents, list) or made.cell_contents:
        return False  # not the layout we know, or metrics exist already: keep the one class
    values.ValueClass = values.MultiProcessValue(process_identifier=_cached_pid)
    return True


CACHED_PID = _use_cached_pid()

CHANNELS = ("pos", "bulk")
SETTLEMENT_OUTCOMES = ("recorded", "not_recorded", "replayed")
ISSUANCE_OUTCOMES = ("created", "updated", "unchanged", "conflicts", "rejected")
BULK_KINDS = ("check", "replay", "other")
BULK_OUTCOMES = ("finished", "failed", "abandoned")
# The store operations measured (one label value each); generators (batch_codes, audit_events)
# make several round trips per call and are left out rather than mis-measured.
REDIS_OPS = ("ping", "verify", "verify_batch", "stored_settlement", "reverse", "upsert_issuance",
             "get_issuance", "set_status", "code_history", "drop_namespace", "live_rules")
# The live rules (rules/live.py) and what became of each judgement: a notice on the answer, a
# refusal, or not judged (a cluster's second call failed; the settlement was answered anyway).
LIVE_MODELS = ("STOCKPILING", "RESALE_SOURCE")
LIVE_OUTCOMES = ("notice", "refused", "unjudged")

# multiprocess_mode: how `tracecode serve --workers N` (server/workers.py) merges a gauge over its
# worker processes; ignored by a single process.
BUILD_INFO = Gauge("tracecode_build_info", "Always 1; the labels say which build is running",
                   ["version", "codec"], multiprocess_mode="max")

VERIFICATIONS = Counter("tracecode_verifications_total", "Lines judged, by verdict and channel",
                        ["verdict", "channel"])
SETTLEMENTS = Counter("tracecode_settlements_total", "Settlements handled, by outcome and channel",
                      ["outcome", "channel"])
# Buckets for a service that should answer in single-digit milliseconds; 0.01 and 0.025 are the
# edges the latency alert tests against, so its quantile is not interpolated across a wide bucket.
VERIFY_SECONDS = Histogram(
    "tracecode_verify_duration_seconds", "Time to judge one settlement inside the server",
    ["channel"], buckets=(0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
REVERSALS = Counter("tracecode_reversals_total", "ReverseDispense calls that succeeded")

REDIS_SECONDS = Histogram(
    "tracecode_redis_call_duration_seconds", "Duration of one store operation against Redis (one round "
    "trip for verify), failures included", ["op"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
REDIS_CALL_ERRORS = Counter("tracecode_redis_errors_total",
                            "Store operations that failed in Redis (unreachable, timeout, error reply)", ["op"])
REDIS_UP = Gauge("tracecode_redis_up", "1 when the last health ping of Redis succeeded, else 0",
                 multiprocess_mode="livemin")  # 0 when any live worker cannot reach Redis

ISSUANCE_RECORDS = Counter("tracecode_issuance_records_total",
                           "Issuance records received by UpsertIssuance, by outcome", ["outcome"])

BULK_RUNNING = Gauge("tracecode_bulk_jobs_running", "Bulk jobs in progress", ["kind"],
                     multiprocess_mode="livesum")
BULK_RECORDS = Counter("tracecode_bulk_records_total", "Records (settlement lines) bulk jobs processed", ["kind"])
BULK_FLAGGED = Counter("tracecode_bulk_flagged_total", "Records (settlement lines) bulk jobs flagged: verdict not OK", ["kind"])
BULK_PROGRESS_TS = Gauge("tracecode_bulk_last_progress_timestamp_seconds",
                         "Unix time a bulk job of this kind last started or made progress", ["kind"],
                         multiprocess_mode="max")
BULK_JOBS = Counter("tracecode_bulk_jobs_total", "Bulk jobs ended, by outcome", ["kind", "outcome"])

MALFORMED_MESSAGES = Counter("tracecode_malformed_messages_total",
                             "Request messages that could not be decoded as their protobuf type")
EMBEDDED_REDIS_RESTARTS = Counter("tracecode_embedded_redis_restarts_total",
                                  "Times the supervised embedded redis-server was restarted after it died")

LIVE_RULES = Counter("tracecode_live_rule_results_total",
                     "Live rule judgements at settlement, by model and outcome (notice, refused, unjudged)",
                     ["model", "outcome"])

BUILD_INFO.labels(__version__, codec.IMPLEMENTATION).set(1)

# Pre-bound children: the hot path does a dict lookup, not a label resolution.
_VERDICT = {(v, c): VERIFICATIONS.labels(v, c) for v in VERDICTS for c in CHANNELS}
_OUTCOME = {(o, c): SETTLEMENTS.labels(o, c) for o in SETTLEMENT_OUTCOMES for c in CHANNELS}
_LATENCY = {c: VERIFY_SECONDS.labels(c) for c in CHANNELS}
_REDIS = {op: (REDIS_SECONDS.labels(op), REDIS_CALL_ERRORS.labels(op)) for op in REDIS_OPS}
_ISSUANCE = {o: ISSUANCE_RECORDS.labels(o) for o in ISSUANCE_OUTCOMES}
_LIVE = {(m, o): LIVE_RULES.labels(m, o) for m in LIVE_MODELS for o in LIVE_OUTCOMES}


def observe_live(model: str, outcome: str) -> None:
    """Count one live rule judgement (a notice, a refusal, or one that could not be made)."""
    _LIVE[model, outcome].inc()
for _k in BULK_KINDS:
    BULK_RUNNING.labels(_k)
    BULK_RECORDS.labels(_k)
    BULK_FLAGGED.labels(_k)
    for _o in BULK_OUTCOMES:
        BULK_JOBS.labels(_k, _o)


def observe_settlement(channel: str, outcome, seconds: float) -> None:
    """Count one settlement outcome (a verifier.SettlementOutcome) and its lines."""
    _LATENCY[channel].observe(seconds)
    if outcome.replayed:
        _OUTCOME["replayed", channel].inc()
        return
    _OUTCOME["recorded" if outcome.recorded else "not_recorded", channel].inc()
    results = outcome.results
    if len(results) == 1:
        _VERDICT[results[0].verdict, channel].inc()
        return
    # One inc per verdict, by how many lines got it: each inc takes the metric's lock (and with
    # --workers writes the shared file), and a settlement's lines mostly share one verdict.
    counts: dict[str, int] = {}
    for line in results:
        counts[line.verdict] = counts.get(line.verdict, 0) + 1
    for verdict, n in counts.items():
        _VERDICT[verdict, channel].inc(n)


def observe_settlements(channel: str, outcomes, seconds_each: float) -> tuple[int, int]:
    """observe_settlement over a bulk chunk: counts summed first, then one inc per label (a
    chunk holds hundreds of settlements; each inc takes a lock). Returns (lines, flagged lines)
    of all the outcomes, replayed ones included, for the job's progress."""
    outcome_counts: dict[str, int] = {}
    verdict_counts: dict[str, int] = {}
    lines = flagged = 0
    for o in outcomes:
        _LATENCY[channel].observe(seconds_each)
        for line in o.results:
            lines += 1
            flagged += line.verdict != "OK"
        if o.replayed:  # as observe_settlement: a replay's verdicts were counted the first time
            outcome_counts["replayed"] = outcome_counts.get("replayed", 0) + 1
            continue
        key = "recorded" if o.recorded else "not_recorded"
        outcome_counts[key] = outcome_counts.get(key, 0) + 1
        for line in o.results:
            verdict_counts[line.verdict] = verdict_counts.get(line.verdict, 0) + 1
    for key, n in outcome_counts.items():
        _OUTCOME[key, channel].inc(n)
    for verdict, n in verdict_counts.items():
        _VERDICT[verdict, channel].inc(n)
    return lines, flagged


def issuance_loaded(resp) -> None:
    """Count the outcomes of one UpsertIssuance call (an UpsertIssuanceResponse)."""
    for o in ISSUANCE_OUTCOMES:
        n = getattr(resp, o)
        if n:
            _ISSUANCE[o].inc(n)


# ---------------------------------------------------------------------- Redis

def observe_store(op: str, seconds: float, failed: bool) -> None:
    """The store's observer (Store(observer=...), app.make_store): one Redis operation's latency,
    and whether it failed (Redis unreachable or an error reply; the domain answers the store
    raises, such as a conflict or a closed return window, are not failures). Operations outside
    REDIS_OPS are not measured (their label would be unbounded)."""
    pair = _REDIS.get(op)
    if pair is None:
        return
    pair[0].observe(seconds)
    if failed:
        pair[1].inc()


# ---------------------------------------------------------------------- bulk jobs

def _kind(kind: str) -> str:
    # A caller passing a job id here would create one series per job: map anything unknown.
    return kind if kind in BULK_KINDS else "other"


def bulk_progress(records: int, flagged: int = 0, kind: str = "other") -> None:
    """A bulk job processed `records` more records, `flagged` of them not OK."""
    k = _kind(kind)
    BULK_RECORDS.labels(k).inc(records)
    if flagged:
        BULK_FLAGGED.labels(k).inc(flagged)
    BULK_PROGRESS_TS.labels(k).set(time.time())


class BulkJob:
    """Handle of one running bulk job (see bulk_job)."""

    def __init__(self, kind: str):
        self.kind = _kind(kind)
        self.outcome = "finished"

    def progress(self, records: int, flagged: int = 0) -> None:
        bulk_progress(records, flagged, self.kind)


@contextmanager
def bulk_job(kind: str) -> Iterator[BulkJob]:
    """Mark a bulk job as running for the duration of the block:

        with metrics.bulk_job("replay") as job:
            ...
            job.progress(len(chunk), flagged)
            ...
            job.outcome = "abandoned"   # e.g. the stream ended without Finish

    An exception marks the job "failed"; a generator closed early (client went away) "abandoned".
    The running gauge and the progress timestamp are what the TracecodeBulkJobStalled alert reads.
    """
    job = BulkJob(kind)
    BULK_RUNNING.labels(job.kind).inc()
    BULK_PROGRESS_TS.labels(job.kind).set(time.time())
    try:
        yield job
    except GeneratorExit:
        job.outcome = "abandoned"
        raise
    except BaseException:
        job.outcome = "failed"
        raise
    finally:
        BULK_RUNNING.labels(job.kind).dec()
        BULK_JOBS.labels(job.kind, job.outcome if job.outcome in BULK_OUTCOMES else "finished").inc()


# ---------------------------------------------------------------------- exposition

class MetricsHTTP:
    """The /metrics HTTP endpoint (prometheus-client's threaded server) on addr:port; port 0 picks one."""

    def __init__(self, port: int, addr: str = "127.0.0.1"):
        self._httpd, self._thread = start_http_server(port, addr=addr)
        self.port = self._httpd.server_address[1]

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


# ---------------------------------------------------------------------- sanctions (issue 16)

SANCTION_REASONS = ("SITE_SANCTIONED", "INSURED_SANCTIONED")
SANCTION_REFUSALS = Counter("tracecode_sanction_refusals_total",
                            "Settlements refused because a sanction binds the site or the insured person, by reason",
                            ["reason"])
SANCTION_CHANGES = Counter("tracecode_sanction_changes_total", "Sanctions set or lifted through the Admin API",
                           ["op"])
SANCTION_STALE_REFUSALS = Counter(
    "tracecode_sanction_view_stale_total",
    "Settlements answered UNAVAILABLE because this server's sanction view was older than its bound (cluster)")
SANCTION_VIEW_AGE = Gauge("tracecode_sanction_view_age_seconds",
                          "Seconds since this server's sanction view was last known complete (largest over workers)",
                          multiprocess_mode="livemax")
SANCTION_VIEW_ENTRIES = Gauge("tracecode_sanction_view_entries", "Sanction entries in this server's view",
                              multiprocess_mode="livemax")
WITHOUT_INSURED = Counter("tracecode_settlements_without_insured_total",
                          "VerifyDispense calls that carried no insured id (clients from before the field)")
_REFUSED = {r: SANCTION_REFUSALS.labels(r) for r in SANCTION_REASONS}
for _op in ("set", "lift"):
    SANCTION_CHANGES.labels(_op)


def sanction_refused(reason: str) -> None:
    _REFUSED[reason].inc()


def sanction_changed(op: str) -> None:
    SANCTION_CHANGES.labels(op).inc()

# The receiving check (入库核验, server/receiving.py): packs by verdict, deliveries, latency; and the
# receipt notices at settlement (a pack received by another site, or by none where required).
RECEIVED_PACKS = Counter("tracecode_received_packs_total",
                         "packs judged at the receiving check, by verdict (OK: recorded as received)", ["verdict"])
_RECEIVED = {v: RECEIVED_PACKS.labels(v) for v in VERDICTS}
RECEIVE_LATENCY = Histogram("tracecode_receive_seconds", "ReceivePacks latency, seconds",
                            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5))
RECEIPT_NOTICES = Counter("tracecode_receipt_notices_total",
                          "settlement lines whose pack another site received (RECEIVED_ELSEWHERE) or none did "
                          "where receipts are required (NOT_RECEIVED)", ["notice"])
_RECEIPT = {n: RECEIPT_NOTICES.labels(n) for n in ("RECEIVED_ELSEWHERE", "NOT_RECEIVED")}


def observe_receiving(outcome, seconds: float) -> None:
    RECEIVE_LATENCY.observe(seconds)
    if outcome.replayed:
        return
    counts: dict[str, int] = {}
    for r in outcome.results:
        counts[r.verdict] = counts.get(r.verdict, 0) + 1
    for verdict, n in counts.items():
        _RECEIVED[verdict].inc(n)


def observe_receipt_notice(notice: str) -> None:
    _RECEIPT[notice].inc()
