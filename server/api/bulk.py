"""Bulk re-verification: the BulkVerification servicer.

One stream is one job: options, then chunks of settlements answered one by one in order, then
Finish. The servicer pulls one chunk at a time from the request stream, so gRPC flow control makes
a fast client wait for a slow server instead of either side buffering the data set.
"""
from __future__ import annotations

import logging
import re
import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor


from tracecode.v1 import bulk_pb2 as bpb
from tracecode.v1 import bulk_pb2_grpc
from tracecode.v1 import verification_pb2 as pb

from .. import metrics, priority
from ..errors import InvalidRequest
from tracecode.rules.pseudonym import Pseudonymizer
from ..verifier import Line, Verifier
from . import convert
from .sanctions import notice_pb
from .status import answer, guarded

log = logging.getLogger("tracecode.bulk")

_JOB_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}\Z")
MAX_CHUNK = 5000  # settlements per chunk: bounds one pipelined Redis round trip
MAX_AHEAD = 4  # chunks read from a stream and not yet answered
# Settlements per Redis round trip of a job, while the process serves POS calls and when it does
# not (priority.py): a slice is a stretch of Python holding the GIL and of Redis running the job's
# scripts, which a POS call in the same process may have to wait out.
SLICE_BESIDE_POS = 8
SLICE_ALONE = 128
IN_REDIS = 2  # slices of a job submitted to Redis and not yet finished (one runs, one waits)


class BulkServicer(bulk_pb2_grpc.BulkVerificationServicer):
    def __init__(self, verifier: Verifier, *, job_ttl_s: int = 7 * 86400, authorize=None):
        self.verifier = verifier
        self.job_ttl_s = job_ttl_s  # an abandoned REPLAY namespace expires by itself
        self.authorize = authorize or (lambda context: None)

    def job_keys(self, job_id: str):
        if not _JOB_ID.match(job_id):
            raise InvalidRequest([("job_id", "required: 1-64 characters of A-Z a-z 0-9 . _ -")])
        return self.verifier.job_namespace(job_id)

    def Reverify(self, request_iterator, context):
        # A generator handler: guarded cannot wrap it, so errors are mapped per step.
        try:
            self.authorize(context)
            first = next(request_iterator, None)
            if first is None or first.WhichOneof("body") != "options":
                raise InvalidRequest([("options", "the first message of a job must carry its options")])
            opts = first.options
            if opts.mode not in (bpb.CHECK, bpb.REPLAY):
                raise InvalidRequest([("options.mode", "CHECK or REPLAY")])
            replay = opts.mode == bpb.REPLAY
            state = self.job_keys(opts.job_id) if replay else None
            # A job runs for hours over the data set as it is now: the marker is compared again
            # (the data set may have been re-created under this server since it started).
            self.verifier.store.recheck_dataset()
        except Exception as exc:  # noqa: BLE001 - mapped to a status by the shared mapper
            answer(context, exc, "Reverify")
            return
        log.info("bulk job %s started (%s)", opts.job_id or "-", bpb.BulkMode.Name(opts.mode))
        done = 0
        # A chunk runs as slices (SLICE_ALONE settlements, SLICE_BESIDE_POS while the process
        # serves POS calls), at most IN_REDIS of them submitted to Redis at a time (on `redis`,
        # one thread, so they reach Redis in order, as REPLAY needs). While Redis runs one slice
        # this thread plans the next, then waits for an event: it never holds the GIL for a whole
        # chunk, so POS calls in the same process wait out one slice's worth of Python at most
        # (docs/performance.md, "A bulk job beside POS traffic"). Requests are read by their own
        # thread, so an answer goes out as soon as its chunk is done, not when the next request
        # happens to arrive.
        redis = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracecode-bulk")
        events: queue.Queue = queue.Queue()
        # At most MAX_AHEAD chunks read but not answered: gRPC flow control then holds the client.
        ahead = threading.Semaphore(MAX_AHEAD)
        reader = threading.Thread(target=_read_requests, args=(request_iterator, events, ahead),
                                  name="tracecode-bulk-reader", daemon=True)
        reader.start()
        work: deque[_Chunk] = deque()  # chunks read and not yet answered, oldest first
        ending = None  # ("finish", Finish) or ("eof", None) once the stream has said so
        with metrics.bulk_job("replay" if replay else "check") as job:
            try:
                while True:
                    kind, item = events.get()
                    if kind == "error":
                        raise item
                    if kind == "chunk":
                        work.append(_Chunk(item))
                    elif kind in ("finish", "eof"):
                        ending = (kind, item)
                    # Finished slices into their chunk's answer, in order; finished chunks out.
                    while work:
                        chunk = work[0]
                        while chunk.running and chunk.running[0][2].done():
                            self._fill(chunk, *chunk.running.popleft(), job, state)
                        if chunk.todo or chunk.running:
                            break
                        work.popleft()
                        ahead.release()
                        done += len(chunk.resp.results)
                        chunk.resp.settlements_done = done
                        yield chunk.resp
                    # Plan and submit the next slices while fewer than IN_REDIS are in Redis.
                    in_redis = sum(len(c.running) for c in work)
                    for chunk in work:
                        while chunk.todo and in_redis < IN_REDIS:
                            size = SLICE_BESIDE_POS if priority.pos_traffic() else SLICE_ALONE
                            prepared = self._prepare(chunk.take(size), replay, state,
                                                     opts.insured_ids_are_pseudonyms)
                            future = redis.submit(self.verifier.bulk_run, prepared)
                            future.add_done_callback(lambda _f: events.put(("done", None)))
                            chunk.running.append((prepared, time.perf_counter(), future))
                            in_redis += 1
                    if ending and not work:
                        break
                if ending[0] == "finish":
                    if replay and ending[1].drop_namespace:
                        deleted = self.verifier.drop_job(state)
                        log.info("bulk job %s finished: %d settlements, namespace dropped (%d keys)",
                                 opts.job_id, done, deleted)
                    return
                job.outcome = "abandoned"
                log.info("bulk job %s: stream ended after %d settlements without Finish "
                         "(namespace kept)", opts.job_id or "-", done)
            except Exception as exc:  # noqa: BLE001 - mapped to a status by the shared mapper
                job.outcome = "failed"
                answer(context, exc, "Reverify")
            finally:
                redis.shutdown(wait=True, cancel_futures=True)
                # Let a reader waiting for a slot run into the ended stream and exit.
                for _ in range(MAX_AHEAD + 1):
                    ahead.release()

    def _insured(self, settlements, as_is: bool) -> list:
        """Per settlement its insured pseudonym ('' for none), or the InvalidRequest that makes it
        unjudgeable; a raw id goes no further than this."""
        sanctions = self.verifier.sanctions
        out: list[str | InvalidRequest] = []
        for s in settlements:
            raw = s.insured_id
            try:
                if not raw or sanctions is None:
                    out.append("")
                elif as_is:
                    if not Pseudonymizer.looks_like_pseudonym(raw):
                        raise InvalidRequest([("insured_id", "not a pseudonym (KEY_ID.32 hex), yet the job "
                                                             "says its insured ids are pseudonyms")])
                    out.append(raw)
                else:
                    out.append(sanctions.pseudonym(raw))
            except InvalidRequest as exc:
                out.append(exc)
        return out

    def _prepare(self, settlements, replay: bool, state, as_is: bool = False):
        rows = [(s.site_id, s.settlement_id, convert.ms(s.settled_at),
                 [Line(ln.raw_code, ln.product_id, ln.units) for ln in s.lines])
                for s in settlements]
        return self.verifier.bulk_prepare(rows, replay=replay, state=state, state_ttl_s=self.job_ttl_s,
                                          insured=self._insured(settlements, as_is))

    def _first_buyers(self, outcomes, state) -> dict[str, str]:
        """code -> first buyer's pseudonym, for the flagged lines that name a first dispense."""
        sanctions = self.verifier.sanctions
        codes = sorted({r.canonical_code for o in outcomes if not isinstance(o, str)
                        for r in o.results if r.verdict != "OK" and r.first_site_id})
        return sanctions.first_buyers(codes, state) if sanctions and codes else {}

    def _fill(self, chunk: "_Chunk", prepared, start: float, future, job, state=None) -> None:
        """A finished slice's outcomes into its chunk's response, and into metrics and progress."""
        outcomes = self.verifier.bulk_finish(prepared, future.result())
        buyers = self._first_buyers(outcomes, state)
        elapsed = (time.perf_counter() - start) / max(len(outcomes), 1)
        results = chunk.resp.results
        judged = []
        for o in outcomes:
            if isinstance(o, str):
                results.add(error=o)
                continue
            judged.append(o)
            # OK lines carry their verdict and code only: a job reports flagged lines in full.
            added = results.add(results=[convert.line_result(i, r) if r.verdict != "OK" else
                                         pb.LineResult(line_index=i, verdict=pb.OK, canonical_code=r.canonical_code)
                                         for i, r in enumerate(o.results)], replayed=o.replayed,
                                sanctions=[notice_pb(n) for n in o.sanctions], insured_id=o.insured)
            for line_pb in added.results:
                if line_pb.HasField("evidence") and line_pb.canonical_code in buyers:
                    line_pb.evidence.first_insured_id = buyers[line_pb.canonical_code]
        job.progress(*metrics.observe_settlements("bulk", judged, elapsed))

    @guarded
    def DropJob(self, request: bpb.DropJobRequest, context) -> bpb.DropJobResponse:
        self.authorize(context)
        return bpb.DropJobResponse(keys_deleted=self.verifier.drop_job(self.job_keys(request.job_id)))


class _Chunk:
    """A request chunk in progress: its settlements not yet planned, its slices submitted to
    Redis (prepared, start, future; in order), and its answer as far as finished slices go."""
    __slots__ = ("settlements", "next", "running", "resp")

    def __init__(self, chunk: bpb.SettlementChunk):
        if len(chunk.settlements) > MAX_CHUNK:
            raise InvalidRequest([("chunk.settlements", f"{len(chunk.settlements)} settlements, at most {MAX_CHUNK}")])
        self.settlements, self.next = chunk.settlements, 0
        self.running: deque = deque()
        self.resp = bpb.ReverifyResponse(chunk_seq=chunk.chunk_seq)

    @property
    def todo(self) -> bool:
        return self.next < len(self.settlements)

    def take(self, size: int) -> list:
        """The next slice of settlements to plan."""
        self.next += size
        return self.settlements[self.next - size:self.next]


def _read_requests(request_iterator, events: "queue.Queue", ahead: threading.Semaphore) -> None:
    """Feed the job's requests into `events` as ("chunk", SettlementChunk), ("finish", Finish),
    then ("eof", None); a bad message or a broken stream as ("error", exception). Takes a slot of
    `ahead` before reading each message (the answer to a chunk gives it back)."""
    try:
        while True:
            ahead.acquire()
            req = next(request_iterator, None)
            if req is None:
                break
            body = req.WhichOneof("body")
            if body not in ("chunk", "finish"):
                events.put(("error", InvalidRequest([("body", "expected a chunk or finish")])))
                return
            events.put((body, getattr(req, body)))
            if body == "finish":
                return
        events.put(("eof", None))
    except Exception as exc:  # noqa: BLE001 - the client went away: end the job like eof
        log.info("bulk stream read ended: %s", exc)
        events.put(("eof", None))
