"""Bulk re-verification: the BulkVerification servicer.

One stream is one job: options, then chunks of settlements answered one by one in order, then
Finish. The servicer pulls one chunk at a time from the request stream, so gRPC flow control makes
a fast client wait for a slow server instead of either side buffering the data set.
"""
from __future__ import annotations

import logging
import re
import time

import grpc

from tracecode.v1 import bulk_pb2 as bpb
from tracecode.v1 import bulk_pb2_grpc
from tracecode.v1 import verification_pb2 as pb

from . import metrics
from .errors import InvalidRequest
from .keys import KeySpace
from .servicer import _guarded, _ms, _result
from .verifier import Line, Verifier

log = logging.getLogger("tracecode.bulk")

_JOB_ID = re.compile(r"[A-Za-z0-9._\-]{1,64}\Z")
MAX_CHUNK = 5000  # settlements per chunk: bounds one pipelined Redis round trip


class BulkServicer(bulk_pb2_grpc.BulkVerificationServicer):
    def __init__(self, verifier: Verifier, *, job_ttl_s: int = 7 * 86400, authorize=None):
        self.verifier = verifier
        self.job_ttl_s = job_ttl_s  # an abandoned REPLAY namespace expires by itself
        self.authorize = authorize or (lambda context: None)

    def job_keys(self, job_id: str) -> KeySpace:
        if not _JOB_ID.match(job_id):
            raise InvalidRequest([("job_id", "required: 1-64 characters of A-Z a-z 0-9 . _ -")])
        return KeySpace(f"{self.verifier.store.keys.prefix}-job-{job_id}")

    def Reverify(self, request_iterator, context):
        # A generator handler: _guarded cannot wrap it, so errors are mapped per step.
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
        except Exception as exc:  # noqa: BLE001 - mapped to a status by the shared mapper
            _guarded(_raise(exc))(self, None, context)
            return
        log.info("bulk job %s started (%s)", opts.job_id or "-", bpb.BulkMode.Name(opts.mode))
        done = 0
        with metrics.bulk_job("replay" if replay else "check") as job:
            for req in request_iterator:
                body = req.WhichOneof("body")
                if body == "finish":
                    if replay and req.finish.drop_namespace:
                        deleted = self.verifier.store.drop_namespace(state)
                        log.info("bulk job %s finished: %d settlements, namespace dropped (%d keys)",
                                 opts.job_id, done, deleted)
                    return
                if body != "chunk":
                    job.outcome = "failed"
                    _guarded(_raise(InvalidRequest([("body", "expected a chunk or finish")])))(self, None, context)
                    return
                try:
                    resp = self._chunk(req.chunk, replay, state)
                except Exception as exc:  # noqa: BLE001
                    job.outcome = "failed"
                    _guarded(_raise(exc))(self, None, context)
                    return
                done += len(resp.results)
                resp.settlements_done = done
                records = sum(len(r.results) for r in resp.results)
                flagged = sum(1 for r in resp.results for line in r.results if line.verdict != 1)
                job.progress(records, flagged)
                yield resp
            job.outcome = "abandoned"
            log.info("bulk job %s: stream ended after %d settlements without Finish (namespace kept)",
                     opts.job_id or "-", done)

    def _chunk(self, chunk: bpb.SettlementChunk, replay: bool, state) -> bpb.ReverifyResponse:
        if len(chunk.settlements) > MAX_CHUNK:
            raise InvalidRequest([("chunk.settlements", f"{len(chunk.settlements)} settlements, at most {MAX_CHUNK}")])
        start = time.perf_counter()
        settlements = [(s.site_id, s.settlement_id, _ms(s.settled_at),
                        [Line(ln.raw_code, ln.product_id, ln.units) for ln in s.lines])
                       for s in chunk.settlements]
        outcomes = self.verifier.bulk(settlements, replay=replay, state=state, state_ttl_s=self.job_ttl_s)
        elapsed = (time.perf_counter() - start) / max(len(outcomes), 1)
        resp = bpb.ReverifyResponse(chunk_seq=chunk.chunk_seq)
        for o in outcomes:
            if isinstance(o, str):
                resp.results.add(error=o)
                continue
            metrics.observe_settlement("bulk", o, elapsed)
            # OK lines carry their verdict and code only: a job reports flagged lines in full.
            resp.results.add(results=[_result(i, r) if r.verdict != "OK" else
                                      pb.LineResult(line_index=i, verdict=pb.OK, canonical_code=r.canonical_code)
                                      for i, r in enumerate(o.results)], replayed=o.replayed)
        return resp

    @_guarded
    def DropJob(self, request: bpb.DropJobRequest, context) -> bpb.DropJobResponse:
        self.authorize(context)
        return bpb.DropJobResponse(keys_deleted=self.verifier.store.drop_namespace(self.job_keys(request.job_id)))


def _raise(exc: Exception):
    """A handler that raises exc, so the shared error mapper turns it into the right status."""
    def handler(self, request, context):
        raise exc
    return handler
