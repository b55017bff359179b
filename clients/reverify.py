"""`tracecode reverify FILE...`: stream historical settlement exports through the server's checks.

    files --rows--> settlements (adjacent rows, merged across files by settled_at)
          --chunks--> BulkVerification.Reverify (bidi stream, at most `window` chunks in flight)
          --answers--> flagged rows, per-verdict / per-site counts, the duplicate network

Memory is bounded: rows are read lazily, at most `window` chunks are in flight, flagged rows go
straight to disk; what grows is one counter per site and per (first site -> later site) pair.

The report's pieces, one job each: a `Recorder` turns answers into a `Tally` (counts per verdict,
site and duplicate pair) and rows for a `FlaggedWriter` and an `ErrorWriter`; at the end a
`DuplicateNetwork` over the tally's pairs ranks them and finds the rings, and `write_network` /
`write_summary` write network.csv and summary.json; a `Checkpoint` is what resumes a job.

Interruption: after acknowledged chunks the job writes `checkpoint.json` (per-file position, the
byte length of each output, the counters). `--resume` truncates the outputs to those lengths,
restores the counters, skips the rows already answered and resends the rest; a REPLAY job's
settlements are idempotent on the server, so resent ones count once and the report is the same.
"""
from __future__ import annotations

import contextlib
import csv
import gc
import heapq
import itertools
import json
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from typing import Iterator, Mapping, NamedTuple, TextIO

import grpc

from tracecode.v1 import bulk_pb2 as bpb
from tracecode.v1 import bulk_pb2_grpc
from tracecode.v1 import verification_pb2 as pb

from tracecode.rules.cells import neutralise, neutralise_row
from tracecode.rules.rows import check_row, settled_at_ms

from .files import SETTLEMENT_FIELDS, SETTLEMENT_READ_FIELDS, ByteCounter, Row, RowError, check_readable, read_rows

FLAGGED_EXTRA = ("verdict", "canonical_code", "reason", "first_site_id", "first_settlement_id",
                 "first_settled_at", "first_insured_id", "sanction", "sanction_id")
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


def _check_row(row: Row) -> RowError | None:
    """The row rules every reader of settlement files applies (rules/rows.py: the leads engine
    applies the same ones column-wise). On success the parsed time (`_at`), the normalised
    insured id (`_insured`) and the amount in fen ride on the row's fields."""
    problem = check_row(row.fields)
    return None if problem is None else RowError(row.source, row.line, problem.field, problem.reason)


def settlements_of(path: str, file_index: int, skip_to: int, counter: ByteCounter) -> Iterator[Settlement]:
    """Adjacent rows of one (site, settlement) become one settlement. Rows with line <= skip_to
    were answered before an interruption and are skipped. Bad rows ride along with the next
    settlement (or a trailing empty one) so they are reported exactly once, in order."""
    cur: Settlement | None = None
    pending: list[RowError] = []
    last_line = skip_to
    for item in read_rows(path, SETTLEMENT_READ_FIELDS, counter):
        if item.line <= skip_to:
            continue
        last_line = item.line
        if isinstance(item, RowError) or (err := _check_row(item)) is not None:
            bad = item if isinstance(item, RowError) else err
            assert bad is not None
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
        cur = Settlement(f["_at"], file_index, item.line, f["site_id"], f["settlement_id"],  # type: ignore[arg-type]
                         [item], pending)
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
                settled_at={"seconds": s.at_ms // 1000, "nanos": (s.at_ms % 1000) * 1_000_000},
                insured_id=s.rows[0].fields.get("_insured") or "")
        line = m.lines.add
        for r in s.rows:
            f = r.fields
            line(raw_code=f["code"], product_id=f["product_id"], units=int(f.get("units") or 0))
    return req


# --- the report's pieces: counting, the duplicate network, the files ------------------------
# A job's answers go to a Recorder, which counts them in a Tally and writes the flagged and bad
# rows through their writers; at the end the Tally and the DuplicateNetwork over its pairs make
# summary.json and network.csv. A Checkpoint holds what resumes the job: file positions, the
# Tally, the writers' byte offsets.

_PAIR_SEP = "\x1f"  # joins a pair's two site ids into one JSON key in a checkpoint


@dataclass(slots=True)
class Tally:
    """The job's counters: rows judged (`records`), settlements answered, bad rows, and per
    verdict, per site and per (first site, later site) duplicate pair."""
    records: int = 0
    settlements: int = 0
    bad_records: int = 0
    verdicts: Counter[str] = field(default_factory=Counter)
    per_site: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    pairs: Counter[tuple[str, str]] = field(default_factory=Counter)
    sanctioned: Counter[str] = field(default_factory=Counter)  # settlements, by refusal reason

    @classmethod
    def from_state(cls, state: dict) -> "Tally":
        """The inverse of state(), from a checkpoint."""
        return cls(state.get("records", 0), state.get("settlements", 0), state.get("bad_records", 0),
                   Counter(state.get("verdicts", {})),
                   defaultdict(Counter, {k: Counter(v) for k, v in state.get("per_site", {}).items()}),
                   Counter({tuple(k.split(_PAIR_SEP, 1)): v for k, v in state.get("pairs", {}).items()}),
                   Counter(state.get("sanctioned", {})))

    def state(self) -> dict:
        return {"records": self.records, "settlements": self.settlements, "bad_records": self.bad_records,
                "verdicts": dict(self.verdicts), "per_site": {k: dict(v) for k, v in self.per_site.items()},
                "pairs": {_PAIR_SEP.join(k): v for k, v in self.pairs.items()},
                "sanctioned": dict(self.sanctioned)}


class Pair(NamedTuple):
    """One edge of the duplicate network: packs first dispensed at one site, then at another."""
    first_site_id: str
    later_site_id: str
    duplicates: int


class DuplicateNetwork:
    """The (first site -> later site) duplicate pairs as a directed graph: its edges ranked by
    weight, and its rings (groups of sites that resell to each other)."""

    def __init__(self, pairs: Mapping[tuple[str, str], int]):
        self.pairs = pairs

    def ranked(self) -> list[Pair]:
        """Every pair, most duplicates first, then by site ids."""
        return [Pair(a, b, n) for (a, b), n in sorted(self.pairs.items(), key=lambda kv: (-kv[1], kv[0]))]

    def rings(self, min_count: int = 2) -> list[list[str]]:
        """Strongly connected components (size >= 2) of the network, keeping pairs seen at least
        min_count times; each ring's sites sorted, the rings sorted."""
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


def _open_resumable(path: str, offset: int | None, header: tuple[str, ...] | None) -> TextIO:
    """A new output file (with its CSV header, if any), or, resuming, the old one cut back to the
    byte length a checkpoint recorded, positioned at its end."""
    if offset is None:
        fh = open(path, "w", newline="", encoding="utf-8")
        if header is not None:
            csv.writer(fh).writerow(neutralise_row(header))
        return fh
    fh = open(path, "r+", newline="", encoding="utf-8")
    fh.truncate(offset)
    fh.seek(offset)
    return fh


class FlaggedWriter:
    """flagged.csv or flagged.jsonl: one row per line that did not get OK, the export's own
    fields (in their order) then FLAGGED_EXTRA."""

    def __init__(self, out_dir: str, fmt: str, offset: int | None = None):
        self.path = os.path.join(out_dir, f"flagged.{fmt}")
        self.fh = _open_resumable(self.path, offset, FLAGGED_FIELDS if fmt == "csv" else None)
        self._csv = csv.DictWriter(self.fh, FLAGGED_FIELDS, extrasaction="ignore") if fmt == "csv" else None

    def write(self, row: dict[str, str]) -> None:
        if self._csv:
            # A spreadsheet must not run a cell as a formula (rules/cells.py); JSONL is data.
            self._csv.writerow({k: neutralise(v) for k, v in row.items()})
        else:
            self.fh.write(json.dumps(row, ensure_ascii=False) + "\n")

    def offset(self) -> int:
        self.fh.flush()
        return self.fh.tell()

    def close(self) -> None:
        self.fh.close()


class ErrorWriter:
    """errors.csv: one row per bad row of the files or refused settlement (ERROR_FIELDS)."""

    def __init__(self, out_dir: str, offset: int | None = None):
        self.path = os.path.join(out_dir, "errors.csv")
        self.fh = _open_resumable(self.path, offset, ERROR_FIELDS)
        self._csv = csv.writer(self.fh)

    def write(self, e: RowError) -> None:
        self._csv.writerow(neutralise_row([e.source, e.line, e.field, e.reason]))

    def offset(self) -> int:
        self.fh.flush()
        return self.fh.tell()

    def close(self) -> None:
        self.fh.close()


def write_network(path: str, ranked: list[Pair]) -> None:
    """network.csv: every duplicate pair, ranked."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["first_site_id", "later_site_id", "duplicates"])
        for p in ranked:
            w.writerow(neutralise_row(p))


def summary_of(meta: dict, tally: Tally, network: DuplicateNetwork, top: int = 50) -> dict:
    """summary.json's content: the job's meta, the counts (sorted), the top pairs, the rings."""
    return {**meta, "records": tally.records, "settlements": tally.settlements,
            "bad_records": tally.bad_records, "verdicts": dict(sorted(tally.verdicts.items())),
            "per_site": {k: dict(sorted(v.items())) for k, v in sorted(tally.per_site.items())},
            "top_pairs": [p._asdict() for p in network.ranked()[:top]],
            "rings": network.rings(), "sanctioned_settlements": dict(sorted(tally.sanctioned.items()))}


def write_summary(path: str, summary: dict) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, ensure_ascii=False, indent=2)


class Recorder:
    """Turns the server's answers into the Tally and the flagged and bad rows."""

    def __init__(self, tally: Tally, flagged: FlaggedWriter, errors: ErrorWriter):
        self.tally, self.flagged, self.errors = tally, flagged, errors

    def bad(self, e: RowError) -> None:
        self.tally.bad_records += 1
        self.errors.write(e)

    def settlement(self, s: Settlement, result: bpb.BulkSettlementResult) -> None:
        t = self.tally
        t.settlements += 1
        if result.error:
            for r in s.rows:
                self.bad(RowError(r.source, r.line, "settlement", result.error))
            return
        ok = 0  # OK rows (most of them) are counted once per settlement
        # A settlement made while a sanction bound its site or person: every line is reported.
        sanction = result.sanctions[0] if result.sanctions else None
        if sanction is not None:
            t.sanctioned[sanction.reason] += 1
        for row, res in zip(s.rows, result.results):
            if res.verdict == _OK and sanction is None:
                ok += 1
                continue
            t.records += 1
            verdict = pb.Verdict.Name(res.verdict)
            t.verdicts[verdict] += 1
            t.per_site[s.site_id][verdict] += 1
            ev = res.evidence
            first_at = ""
            duplicate = res.verdict == pb.DUPLICATE
            if duplicate and ev.first_site_id:
                t.pairs[ev.first_site_id, s.site_id] += 1
                first_at = datetime.fromtimestamp(ev.first_settled_at.seconds).astimezone().isoformat()
            out = {k: v for k, v in row.fields.items() if not k.startswith("_")}
            # The person as the server pseudonymised them: a raw id from the file goes no further.
            out["insured_id"] = result.insured_id
            out.update(verdict=verdict, canonical_code=res.canonical_code, reason=res.reason,
                       first_site_id=ev.first_site_id if duplicate else "",
                       first_settlement_id=ev.first_settlement_id if duplicate else "",
                       first_settled_at=first_at, first_insured_id=ev.first_insured_id,
                       sanction=sanction.reason if sanction else "",
                       sanction_id=sanction.sanction_id if sanction else "")
            self.flagged.write(out)
        if ok:
            t.records += ok
            t.verdicts["OK"] += ok
            t.per_site[s.site_id]["OK"] += ok

    def close(self) -> None:
        self.flagged.close()
        self.errors.close()


class Offsets(NamedTuple):
    """Byte lengths of flagged and errors when a checkpoint was taken (None: not begun)."""
    flagged: int | None = None
    errors: int | None = None


@dataclass(slots=True)
class Checkpoint:
    """checkpoint.json: which job over which files, how far each file was answered, the Tally so
    far and the byte length of flagged and errors then. On disk the tally and the offsets share
    one "report" object (the layout of every earlier version, which still resumes)."""
    job_id: str
    files: list[str]
    mode: str
    positions: list[int]
    tally: Tally = field(default_factory=Tally)
    offsets: Offsets = Offsets()

    @classmethod
    def load(cls, path: str) -> "Checkpoint":
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
        report = state["report"]
        offsets = report.get("offsets", {})
        return cls(state["job_id"], state["files"], state["mode"], state["positions"],
                   Tally.from_state(report), Offsets(offsets.get("flagged"), offsets.get("errors")))

    def save(self, path: str) -> None:
        """Atomically: written to a temporary file, synced, renamed over the old one."""
        report = {**self.tally.state(), "offsets": self.offsets._asdict()}
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            # dumps, not dump: json.dump encodes in pure Python, several times slower.
            fh.write(json.dumps({"job_id": self.job_id, "files": self.files, "mode": self.mode,
                                 "positions": self.positions, "report": report}))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)


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
    for path in files:  # a missing or unreadable file stops the job before it writes anything
        check_readable(path)
    os.makedirs(out_dir, exist_ok=True)
    ckpt_path = os.path.join(out_dir, CHECKPOINT)
    if os.path.exists(ckpt_path):
        if not resume:
            raise RuntimeError(f"{out_dir} holds an interrupted job ({CHECKPOINT}): pass --resume, or use another --out")
        ckpt = Checkpoint.load(ckpt_path)
        if ckpt.job_id != job_id or ckpt.files != files or ckpt.mode != mode:
            raise RuntimeError(f"{ckpt_path} is for job {ckpt.job_id!r} over {ckpt.files} ({ckpt.mode})")
    else:
        ckpt = Checkpoint(job_id, files, mode, [0] * len(files))
    positions, tally = ckpt.positions, ckpt.tally
    recorder = Recorder(tally, FlaggedWriter(out_dir, fmt, ckpt.offsets.flagged),
                        ErrorWriter(out_dir, ckpt.offsets.errors))
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
        ckpt.offsets = Offsets(recorder.flagged.offset(), recorder.errors.offset())
        ckpt.save(ckpt_path)

    next_ckpt = 0.0  # the first answer writes one: from then on the job is resumable
    try:
        while not state_of["exhausted"]:
            for resp in stub.Reverify(requests(), metadata=metadata):
                batch = in_flight.pop(resp.chunk_seq)
                results = iter(resp.results)
                for s in batch:
                    for e in s.errors:
                        recorder.bad(e)
                    if s.rows:
                        recorder.settlement(s, next(results))
                    positions[s.file_index] = max(positions[s.file_index], s.last_line)
                slots.release()
                bar.show(tally.records + tally.bad_records)
                if (now := time.monotonic()) >= next_ckpt:
                    checkpoint()
                    done = time.monotonic()
                    next_ckpt = done + max(CHECKPOINT_EVERY, CHECKPOINT_COST_SHARE * (done - now))
    except grpc.RpcError:
        checkpoint()
        recorder.close()
        raise
    if failure:
        checkpoint()
        recorder.close()
        raise failure[0]
    bar.show(tally.records + tally.bad_records, final=True)
    elapsed = time.monotonic() - started
    network = DuplicateNetwork(tally.pairs)
    write_network(os.path.join(out_dir, "network.csv"), network.ranked())
    summary = summary_of({"job_id": job_id, "mode": mode, "files": files, "seconds_this_run": round(elapsed, 3)},
                         tally, network)
    write_summary(os.path.join(out_dir, "summary.json"), summary)
    recorder.close()
    os.remove(ckpt_path) if os.path.exists(ckpt_path) else None
    if isinstance(target, str):
        channel.close()
    return summary


# settled_at as a job reads it (tests and tools; the rule itself is rules/rows.py).
def parse_time(text: str) -> int:
    """settled_at as epoch ms (rules/rows.py); ValueError with the rule's text."""
    ms = settled_at_ms(text)
    if isinstance(ms, str):
        raise ValueError(ms)
    return ms
