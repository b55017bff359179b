"""clients/reverify.py as it was before issue 15 split its Report (commit b72bd8b), verbatim but
for this docstring and the absolute import of tracecode.clients.files. Test-only: the reference
of test_reverify_outputs.py, which runs one job through both and requires the same bytes in every
output. Delete it together with that test once the split version has been trusted for a while.
"""
from __future__ import annotations

import contextlib
import csv
import functools
import gc
import heapq
import io
import itertools
import json
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator

import grpc

from tracecode.v1 import bulk_pb2 as bpb
from tracecode.v1 import bulk_pb2_grpc
from tracecode.v1 import verification_pb2 as pb

from tracecode.clients.files import SETTLEMENT_FIELDS, ByteCounter, Row, RowError, read_rows

FLAGGED_EXTRA = ("verdict", "canonical_code", "reason", "first_site_id", "first_settlement_id",
                 "first_settled_at")
FLAGGED_FIELDS = tuple(SETTLEMENT_FIELDS) + FLAGGED_EXTRA
ERROR_FIELDS = ("file", "line", "field", "reason")
CHECKPOINT = "checkpoint.json"
_OK = pb.OK
# Seconds between checkpoints, stretched so that writing one (it grows with the sites and the
# duplicate network) takes at most 1/CHECKPOINT_COST_SHARE of the job's time. A checkpoint only
# bounds the work resent after a crash (resent settlements count once), so rarer is safe.
CHECKPOINT_EVERY = 5.0
CHECKPOINT_COST_SHARE = 50


@dataclass(slots=True)
class Settlement:
    at_ms: int
    file_index: int
    last_line: int  # highest physical line of the file consumed up to and including this settlement
    site_id: str = ""
    settlement_id: str = ""
    rows: list[Row] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)  # bad rows read since the previous settlement

    def __lt__(self, other: "Settlement") -> bool:
        return (self.at_ms, self.file_index) < (other.at_ms, other.file_index)


@functools.lru_cache(maxsize=1024)
def _parse_time(text: str) -> int:
    # Cached: every row of a settlement repeats its settled_at.
    t = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if t.tzinfo is None:
        raise ValueError("settled_at needs an offset, e.g. 2024-05-06T10:15:00+08:00")
    return int(t.timestamp() * 1000)


def _check_row(row: Row) -> RowError | None:
    f = row.fields
    try:
        f["_at"] = _parse_time(f["settled_at"])
    except ValueError as exc:
        return RowError(row.source, row.line, "settled_at", str(exc))
    n, units = f["line_no"], f.get("units") or "0"
    if n.isdigit() and units.isdigit() and int(n) >= 1:  # the common, valid row: one test
        return None
    for name, low in (("line_no", 1), ("units", 0)):
        v = f.get(name) or ("0" if name == "units" else "")
        if not v.isdigit() or int(v) < low:
            return RowError(row.source, row.line, name, f"{v!r} is not an integer >= {low}")
    return None


def settlements_of(path: str, file_index: int, skip_to: int, counter: ByteCounter) -> Iterator[Settlement]:
    """Adjacent rows of one (site, settlement) become one settlement. Rows with line <= skip_to
    were answered before an interruption and are skipped. Bad rows ride along with the next
    settlement (or a trailing empty one) so they are reported exactly once, in order."""
    cur: Settlement | None = None
    pending: list[RowError] = []
    last_line = skip_to
    for item in read_rows(path, SETTLEMENT_FIELDS, counter):
        if item.line <= skip_to:
            continue
        last_line = item.line
        if isinstance(item, RowError) or (err := _check_row(item)) is not None:
            bad = item if isinstance(item, RowError) else err
            if cur is not None:
                cur.errors.append(bad)
                cur.last_line = bad.line
            else:
                pending.append(bad)
            continue
        f = item.fields
        if cur is not None and cur.settlement_id == f["settlement_id"] and cur.site_id == f["site_id"]:
            cur.rows.append(item)
            cur.last_line = item.line
            continue
        if cur is not None:
            yield cur
        cur = Settlement(f["_at"], file_index, item.line, f["site_id"], f["settlement_id"], [item], pending)
        pending = []
    if cur is not None:
        yield cur
    if pending:
        yield Settlement(2 ** 62, file_index, last_line, errors=pending)


def _chunks(settlements: Iterator[Settlement], size: int) -> Iterator[list[Settlement]]:
    while batch := list(itertools.islice(settlements, size)):
        yield batch


def _line_no(r: Row) -> int:
    return int(r.fields["line_no"])


def _chunk_pb(seq: int, batch: list[Settlement]) -> bpb.ReverifyRequest:
    """The request of one chunk (settlements without rows left out); sorts each settlement's
    rows by line_no, the order of the answers. Built in place with add(): a message passed to a
    constructor is copied, which was most of the cost per settlement."""
    req = bpb.ReverifyRequest()
    chunk = req.chunk
    chunk.chunk_seq = seq
    add = chunk.settlements.add
    for s in batch:
        if not s.rows:
            continue
        if len(s.rows) > 1:
            s.rows.sort(key=_line_no)
        m = add(site_id=s.site_id, settlement_id=s.settlement_id,
                settled_at={"seconds": s.at_ms // 1000, "nanos": (s.at_ms % 1000) * 1_000_000})
        line = m.lines.add
        for r in s.rows:
            f = r.fields
            line(raw_code=f["code"], product_id=f["product_id"], units=int(f.get("units") or 0))
    return req


class Report:
    """Counters of the job, and its output files (flagged rows, bad rows)."""

    def __init__(self, out_dir: str, fmt: str, state: dict | None = None):
        self.out_dir, self.fmt = out_dir, fmt
        state = state or {}
        self.records = state.get("records", 0)
        self.settlements = state.get("settlements", 0)
        self.bad_records = state.get("bad_records", 0)
        self.verdicts = Counter(state.get("verdicts", {}))
        self.per_site: dict[str, Counter] = defaultdict(Counter, {k: Counter(v) for k, v in state.get("per_site", {}).items()})
        self.pairs = Counter({tuple(k.split("\x1f", 1)): v for k, v in state.get("pairs", {}).items()})
        offsets = state.get("offsets", {})
        self.flagged_path = os.path.join(out_dir, f"flagged.{fmt}")
        self.errors_path = os.path.join(out_dir, "errors.csv")
        self.flagged = self._open(self.flagged_path, offsets.get("flagged"), FLAGGED_FIELDS, fmt)
        self.errors = self._open(self.errors_path, offsets.get("errors"), ERROR_FIELDS, "csv")
        self.flagged_writer = csv.DictWriter(self.flagged, FLAGGED_FIELDS, extrasaction="ignore") if fmt == "csv" else None
        self.errors_writer = csv.writer(self.errors)

    @staticmethod
    def _open(path: str, offset: int | None, header, fmt: str):
        if offset is None:
            fh = open(path, "w", newline="", encoding="utf-8")
            if fmt == "csv":
                csv.writer(fh).writerow(header)
            return fh
        fh = open(path, "r+", newline="", encoding="utf-8")
        fh.truncate(offset)
        fh.seek(offset)
        return fh

    def bad(self, e: RowError) -> None:
        self.bad_records += 1
        self.errors_writer.writerow([e.source, e.line, e.field, e.reason])

    def settlement(self, s: Settlement, result: bpb.BulkSettlementResult) -> None:
        self.settlements += 1
        if result.error:
            for r in s.rows:
                self.bad(RowError(r.source, r.line, "settlement", result.error))
            return
        ok = 0  # OK rows (most of them) are counted once per settlement
        for row, res in zip(s.rows, result.results):
            if res.verdict == _OK:
                ok += 1
                continue
            self.records += 1
            verdict = pb.Verdict.Name(res.verdict)
            self.verdicts[verdict] += 1
            self.per_site[s.site_id][verdict] += 1
            ev = res.evidence
            first_at = ""
            if res.verdict == pb.DUPLICATE and ev.first_site_id:
                self.pairs[ev.first_site_id, s.site_id] += 1
                first_at = datetime.fromtimestamp(ev.first_settled_at.seconds).astimezone().isoformat()
            out = {k: v for k, v in row.fields.items() if not k.startswith("_")}
            out.update(verdict=verdict, canonical_code=res.canonical_code, reason=res.reason,
                       first_site_id=ev.first_site_id if res.verdict == pb.DUPLICATE else "",
                       first_settlement_id=ev.first_settlement_id if res.verdict == pb.DUPLICATE else "",
                       first_settled_at=first_at)
            if self.flagged_writer:
                self.flagged_writer.writerow(out)
            else:
                self.flagged.write(json.dumps(out, ensure_ascii=False) + "\n")
        if ok:
            self.records += ok
            self.verdicts["OK"] += ok
            self.per_site[s.site_id]["OK"] += ok

    def state(self) -> dict:
        self.flagged.flush()
        self.errors.flush()
        return {"records": self.records, "settlements": self.settlements, "bad_records": self.bad_records,
                "verdicts": dict(self.verdicts), "per_site": {k: dict(v) for k, v in self.per_site.items()},
                "pairs": {"\x1f".join(k): v for k, v in self.pairs.items()},
                "offsets": {"flagged": self.flagged.tell(), "errors": self.errors.tell()}}

    def close(self) -> None:
        self.flagged.close()
        self.errors.close()

    def rings(self, min_count: int = 2) -> list[list[str]]:
        """Groups of sites that resell to each other: strongly connected components (size >= 2)
        of the duplicate network, keeping pairs seen at least min_count times."""
        graph: dict[str, list[str]] = defaultdict(list)
        for (a, b), n in self.pairs.items():
            if n >= min_count and a != b:
                graph[a].append(b)
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on: set[str] = set()
        out: list[list[str]] = []
        counter = 0
        for root in sorted(graph):
            if root in index:
                continue
            # Iterative Tarjan: recursion depth would follow the data.
            work = [(root, iter(sorted(graph[root])))]
            index[root] = low[root] = counter
            counter += 1
            stack.append(root)
            on.add(root)
            while work:
                node, children = work[-1]
                child = next(children, None)
                if child is not None:
                    if child not in index:
                        index[child] = low[child] = counter
                        counter += 1
                        stack.append(child)
                        on.add(child)
                        work.append((child, iter(sorted(graph.get(child, ())))))
                    elif child in on:
                        low[node] = min(low[node], index[child])
                    continue
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    comp = []
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.append(w)
                        if w == node:
                            break
                    if len(comp) > 1:
                        out.append(sorted(comp))
        return sorted(out)

    def write_final(self, meta: dict) -> dict:
        ranked = sorted(self.pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        with open(os.path.join(self.out_dir, "network.csv"), "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["first_site_id", "later_site_id", "duplicates"])
            for (a, b), n in ranked:
                w.writerow([a, b, n])
        summary = {**meta, "records": self.records, "settlements": self.settlements,
                   "bad_records": self.bad_records, "verdicts": dict(sorted(self.verdicts.items())),
                   "per_site": {k: dict(sorted(v.items())) for k, v in sorted(self.per_site.items())},
                   "top_pairs": [{"first_site_id": a, "later_site_id": b, "duplicates": n} for (a, b), n in ranked[:50]],
                   "rings": self.rings()}
        with open(os.path.join(self.out_dir, "summary.json"), "w", encoding="utf-8") as fh:
            json.dump(summary, fh, ensure_ascii=False, indent=2)
        return summary


class Progress:
    def __init__(self, total_bytes: int, counter: ByteCounter, enabled: bool):
        self.total, self.counter, self.enabled = max(total_bytes, 1), counter, enabled
        self.start = time.monotonic()
        self.last = 0.0

    def show(self, records: int, final: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not final and now - self.last < 0.5):
            return
        self.last = now
        elapsed = now - self.start
        frac = min(self.counter.read / self.total, 1.0)
        eta = elapsed * (1 - frac) / frac if frac > 0 else 0
        print(f"\r{records:,} records  {records / max(elapsed, 1e-9):,.0f}/s  {frac:6.1%}  ETA {eta:5.0f} s",
              end="\n" if final else "", file=sys.stderr, flush=True)


@contextlib.contextmanager
def fewer_gc_passes(threshold: int = 10_000):
    """A job allocates a few objects per record, nearly all freed at once by reference counting.
    At the default threshold (700) the cyclic collector still ran ~500 times per 100k records,
    each pass walking every row in flight: ~10 % of the CLI's CPU. A higher first-generation
    threshold keeps collecting cycles (memory stays bounded) in a few passes. Process-wide, so
    the CLI (one job per process) sets it, not run_job."""
    old = gc.get_threshold()
    if 0 < old[0] < threshold:  # 0: automatic collection is off; leave it so
        gc.set_threshold(threshold, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


def run_job(target: str | grpc.Channel, files: list[str], out_dir: str, *, job_id: str,
            mode: str = "replay", fmt: str = "csv", resume: bool = False, keep_namespace: bool = False,
            chunk_size: int = 500, window: int = 4, progress: bool = True, max_rate: float = 0,
            metadata=(), credentials=None, stream_chunks: int = 200) -> dict:
    """Run (or resume) one job; returns the summary. max_rate caps settlements/s so a daytime
    job leaves Redis to the live POS traffic (0: no cap)."""
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    state = None
    if os.path.exists(ckpt_path):
        if not resume:
            raise RuntimeError(f"{out_dir} holds an interrupted job ({CHECKPOINT}): pass --resume, or use another --out")
        with open(ckpt_path, encoding="utf-8") as fh:
            state = json.load(fh)
        if state["job_id"] != job_id or state["files"] != files or state["mode"] != mode:
            raise RuntimeError(f"{ckpt_path} is for job {state['job_id']!r} over {state['files']} ({state['mode']})")
    positions = state["positions"] if state else [0] * len(files)
    report = Report(out_dir, fmt, state["report"] if state else None)
    counter = ByteCounter()
    bar = Progress(sum(os.path.getsize(f) for f in files), counter, progress)
    sources = [settlements_of(p, i, positions[i], counter) for i, p in enumerate(files)]
    merged = sources[0] if len(sources) == 1 else heapq.merge(*sources)

    if isinstance(target, str):
        channel = grpc.secure_channel(target, credentials) if credentials else grpc.insecure_channel(target)
    else:
        channel = target
    stub = bulk_pb2_grpc.BulkVerificationStub(channel)
    started = time.monotonic()
    slots = threading.Semaphore(window)  # chunks in flight: bounds memory on both sides
    in_flight: dict[int, list[Settlement]] = {}
    failure: list[BaseException] = []

    def pace(sent: int) -> None:
        if max_rate > 0:
            ahead = sent / max_rate - (time.monotonic() - started)
            if ahead > 0:
                time.sleep(ahead)

    # One stream carries at most `stream_chunks` chunks; then the job goes on in a new stream
    # under the same job id (a REPLAY namespace outlives a stream that ends without Finish).
    # gRPC Python's client keeps memory per message of a stream until the stream ends, so this
    # is what keeps the CLI's memory flat over tens of millions of records.
    chunks = _chunks(merged, chunk_size)
    state_of = {"seq": 0, "sent": 0, "exhausted": False}

    def requests():
        yield bpb.ReverifyRequest(options=bpb.JobOptions(job_id=job_id, mode=bpb.BulkMode.Value(mode.upper())))
        try:
            for n, batch in enumerate(chunks, 1):
                pace(state_of["sent"])
                state_of["sent"] += len(batch)
                slots.acquire()
                state_of["seq"] += 1
                seq = state_of["seq"]
                in_flight[seq] = batch
                yield _chunk_pb(seq, batch)
                if n >= stream_chunks:
                    break
            else:
                state_of["exhausted"] = True
            # Every chunk answered before the stream ends, so the namespace is not dropped under them.
            for _ in range(window):
                slots.acquire()
            for _ in range(window):
                slots.release()
            if state_of["exhausted"]:
                yield bpb.ReverifyRequest(finish=bpb.Finish(drop_namespace=not keep_namespace))
        except Exception as exc:  # a file error: stop the stream, report it after
            state_of["exhausted"] = True
            failure.append(exc)

    def checkpoint() -> None:
        tmp = ckpt_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            # dumps, not dump: json.dump encodes in pure Python, several times slower.
            fh.write(json.dumps({"job_id": job_id, "files": files, "mode": mode, "positions": positions,
                                 "report": report.state()}))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, ckpt_path)

    next_ckpt = 0.0  # the first answer writes one: from then on the job is resumable
    try:
        while not state_of["exhausted"]:
            for resp in stub.Reverify(requests(), metadata=metadata):
                batch = in_flight.pop(resp.chunk_seq)
                results = iter(resp.results)
                for s in batch:
                    for e in s.errors:
                        report.bad(e)
                    if s.rows:
                        report.settlement(s, next(results))
                    positions[s.file_index] = max(positions[s.file_index], s.last_line)
                slots.release()
                bar.show(report.records + report.bad_records)
                if (now := time.monotonic()) >= next_ckpt:
                    checkpoint()
                    done = time.monotonic()
                    next_ckpt = done + max(CHECKPOINT_EVERY, CHECKPOINT_COST_SHARE * (done - now))
    except grpc.RpcError:
        checkpoint()
        report.close()
        raise
    if failure:
        checkpoint()
        report.close()
        raise failure[0]
    bar.show(report.records + report.bad_records, final=True)
    elapsed = time.monotonic() - started
    summary = report.write_final({"job_id": job_id, "mode": mode, "files": files,
                                  "seconds_this_run": round(elapsed, 3)})
    report.close()
    os.remove(ckpt_path) if os.path.exists(ckpt_path) else None
    if isinstance(target, str):
        channel.close()
    return summary
