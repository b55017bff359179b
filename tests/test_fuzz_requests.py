"""Fuzzing the request path (hypothesis) over real gRPC and real Redis: random settlements, checks,
returns and history reads with codes from issued packs to garbage and arbitrary Unicode, any
units, any times, any ids. Whatever comes in:

- the status is never INTERNAL, UNKNOWN or UNAVAILABLE (an unhandled error or a broken store);
- an answered settlement has exactly one result per line, each a real verdict with a reason
  when it is not OK and a canonical code unless MALFORMED;
- a refused one is INVALID_ARGUMENT with google.rpc.BadRequest field violations naming the field
  (and the line: `lines[i].raw_code`), or one of the specific statuses of its RPC;
- the state stays consistent: a pack's units used stay within [0, pack_units] and equal the units
  of its DISPENSED events minus those of its REVERSED events.

A second test sends raw bytes as request messages: gRPC itself answers what does not parse, and
the server keeps serving."""
from __future__ import annotations

import itertools
import re
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from google.protobuf import timestamp_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tracecode.v1 import verification_pb2 as pb
from tracecode.v1 import verification_pb2_grpc

from factories import cn20, gs1, gtin14, issuance, load

P1, P2 = "8123456", "P-FUZZ-2"
SITES = ("FZ-A", "FZ-B", "FZ-C")
SERIAL = itertools.count()
FIELD = re.compile(r"(site_id|settlement_id|settled_at|settled_at\.nanos|at|at\.nanos|policy|lines|line_indexes|raw_code|reason|"
                   r"lines\[(\d+)\]\.(raw_code|product_id|units))\Z")
NEVER = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
         grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.DATA_LOSS}
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


class Packs:
    """The issued packs the fuzz draws from, and what the server said about each."""

    def __init__(self, admin):
        today = datetime.now(timezone.utc).date()
        self.units: dict[str, int] = {}
        rows = []
        for i in range(12):
            code = cn20()
            self.units[code] = (1, 5, 10)[i % 3]
            rows.append(issuance(code, P1, pack_units=self.units[code]))
        g = gtin14()
        for i in range(6):
            expiry = (today + timedelta(days=(-30 if i % 3 == 0 else 400))).strftime("%y%m%d")
            code = gs1(g, expiry=expiry, batch="FZ1")
            self.units[code] = 2
            rows.append(issuance(code, P2, pack_units=2))
        load(admin, *rows)
        blocked = rows[0].fields["code"]
        admin.set_status(blocked, "RECALLED")
        self.raw = list(self.units)
        self.settled: list[tuple[str, str]] = []  # (site, settlement id) answered and recorded


def scans(packs: Packs):
    issued = st.sampled_from(packs.raw)
    return st.one_of(
        issued,
        # The same packs as scanners mangle them: whitespace, full-width digits, BOM.
        issued.map(lambda c: f"  {c}\r\n"),
        issued.map(lambda c: c.translate({ord(d): 0xFF10 + int(d) for d in "0123456789"})),
        issued.map(lambda c: "\ufeff" + c),
        st.text(alphabet="0123456789", min_size=18, max_size=22),  # near-miss 20-digit codes
        st.text(max_size=40),  # arbitrary Unicode, control characters included
        st.text(alphabet="()0123456789]dQ\x1d|", max_size=60),  # GS1-ish garbage
        st.text(min_size=500, max_size=530),  # around the length limit
    )


def products():
    return st.one_of(st.sampled_from([P1, P2, P1]), st.text(max_size=70))


def ids():
    return st.one_of(st.sampled_from(SITES), st.text(max_size=70))


def instants():
    now = datetime.now(timezone.utc)
    return st.one_of(
        st.just(None),
        st.integers(-300_000, 300_000).map(lambda ms: now + timedelta(milliseconds=ms)),  # within skew
        st.integers(-10**7, 10**7).map(lambda s: now + timedelta(seconds=s)),  # far out
        # Raw Timestamp fields, the calendar's edges among them (years 0, 10000, 2100).
        st.builds(lambda s, n: (s, n), st.one_of(
            st.integers(-2**62, 2**62),
            st.sampled_from([-62135596801, -1, 0, 4102444799, 4102444800, 253402300800, 2**62])),
            st.integers(-10**9, 10**9)),
    )


def timestamp(value) -> timestamp_pb2.Timestamp | None:
    if value is None:
        return None
    if isinstance(value, tuple):
        return timestamp_pb2.Timestamp(seconds=value[0], nanos=value[1])
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(value)
    return ts


def lines(packs: Packs, wild: bool):
    """Lines of issued packs billed right (the path that records), mixed with anything at all."""
    good = st.sampled_from(packs.raw).flatmap(lambda c: st.builds(
        lambda u: pb.DispenseLine(raw_code=c, product_id=P2 if c.startswith("(01)") else P1, units=u),
        st.integers(0, packs.units[c] + 1)))
    anything = st.builds(lambda r, p, u: pb.DispenseLine(raw_code=r, product_id=p, units=u), scans(packs),
                         products(), st.one_of(st.integers(0, 12), st.integers(0, 2**32 - 1)))
    if wild:
        return st.lists(st.one_of(good, anything), min_size=0, max_size=8)
    # Any scan within the length limit, billed to a real product: a verdict for every line.
    scanned = st.builds(lambda r, p, u: pb.DispenseLine(raw_code=r, product_id=p, units=u),
                        scans(packs).filter(lambda r: len(r) <= 512), st.sampled_from([P1, P2]),
                        st.integers(0, 12))
    return st.lists(st.one_of(good, good, scanned), min_size=1, max_size=6)


def assert_refusal(err: grpc.RpcError, n_lines: int, allowed: set) -> None:
    code = err.code()
    assert code not in NEVER, f"{code}: {err.details()}"
    assert code in allowed | {grpc.StatusCode.INVALID_ARGUMENT}, f"{code}: {err.details()}"
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        status = rpc_status.from_call(err)
        assert status is not None, "INVALID_ARGUMENT without google.rpc.Status details"
        detail = error_details_pb2.BadRequest()
        assert len(status.details) == 1 and status.details[0].Unpack(detail)
        assert detail.field_violations
        for v in detail.field_violations:
            m = FIELD.match(v.field)
            assert m, f"violation names an unknown field {v.field!r}"
            assert v.description
            if m.group(2) is not None:
                assert int(m.group(2)) < n_lines, v.field


def assert_results(results, request_lines) -> None:
    assert len(results) == len(request_lines)
    for i, r in enumerate(results):
        assert r.line_index == i
        assert r.verdict in range(1, 10), r
        if r.verdict != pb.OK:
            assert r.reason and r.units_accepted == 0, r
        if r.verdict == pb.MALFORMED:
            assert r.canonical_code == ""
        else:
            assert r.canonical_code


def assert_consistent(stub, packs: Packs, codes) -> None:
    for code in codes:
        hist = stub.GetCodeHistory(pb.GetCodeHistoryRequest(raw_code=code), timeout=10)
        pack = packs.units[code]
        assert 0 <= hist.units_used <= pack, (code, hist.units_used, pack)
        assert hist.events_total == len(hist.events)  # nothing trimmed: the sum below is complete
        taken = sum(e.units for e in hist.events if e.type == pb.DISPENSED)
        given_back = sum(e.units for e in hist.events if e.type == pb.REVERSED)
        assert hist.units_used == taken - given_back, (code, list(hist.events))
        assert bool(hist.first_dispense.first_site_id) == (hist.units_used > 0)


@pytest.fixture
def packs(admin):
    return Packs(admin)


@pytest.fixture
def stub(target):
    channel = grpc.insecure_channel(target)
    yield verification_pb2_grpc.VerificationStub(channel)
    channel.close()


def test_fuzz_request_path(stub, packs):
    @FUZZ
    @given(data=st.data())
    def run(data):
        op = data.draw(st.sampled_from(["verify", "verify", "verify", "check", "check", "reverse", "history"]))
        # Mostly well-formed envelopes (so settlements record and state builds up), sometimes
        # anything at all.
        wild = data.draw(st.sampled_from([False, False, True]))
        if op == "verify":
            ls = data.draw(lines(packs, wild))
            req = pb.VerifyDispenseRequest(
                # Fresh ids mostly (hypothesis would otherwise reuse the same few, ALREADY_EXISTS),
                # reused ones sometimes.
                settlement_id=data.draw(st.one_of(st.sampled_from(["s1", "s2", "s3"]), ids())
                                        if wild else st.sampled_from([f"fz-{next(SERIAL)}"] * 5 + ["s1"])),
                site_id=data.draw(ids() if wild else st.sampled_from(SITES)), lines=ls,
                policy=data.draw(st.sampled_from([0, 1, 2, 7] if wild else [0, 1, 2])))
            at = timestamp(data.draw(instants() if wild else st.just(datetime.now(timezone.utc))))
            if at is not None:
                req.settled_at.CopyFrom(at)
            try:
                resp = stub.VerifyDispense(req, timeout=10)
            except grpc.RpcError as err:
                assert_refusal(err, len(ls), {grpc.StatusCode.ALREADY_EXISTS})
            else:
                assert_results(resp.results, ls)
                assert resp.recorded == any(r.units_accepted > 0 for r in resp.results)
                if resp.recorded:
                    packs.settled.append((resp.site_id, resp.settlement_id))
        elif op == "check":
            ls = data.draw(lines(packs, wild))
            req = pb.CheckCodesRequest(site_id=data.draw(st.one_of(st.just(""), ids())), lines=ls)
            at = timestamp(data.draw(instants()))
            if at is not None:
                req.at.CopyFrom(at)
            try:
                resp = stub.CheckCodes(req, timeout=10)
            except grpc.RpcError as err:
                assert_refusal(err, len(ls), set())
            else:
                assert_results(resp.results, ls)
                assert all(r.units_accepted == 0 or r.verdict == pb.OK for r in resp.results)
        elif op == "reverse":
            # What is drawn must not depend on earlier examples (hypothesis replays examples to
            # shrink them): draw a position, and map it onto the settlements recorded so far.
            pick, site, sid = data.draw(st.integers(0, 1000)), data.draw(ids()), data.draw(ids())
            if packs.settled and data.draw(st.booleans()):
                site, sid = packs.settled[pick % len(packs.settled)]
            req = pb.ReverseDispenseRequest(
                site_id=site, settlement_id=sid, reason=data.draw(st.text(max_size=300)),
                line_indexes=data.draw(st.lists(st.one_of(st.integers(0, 9), st.integers(0, 2**32 - 1)), max_size=4)))
            try:
                resp = stub.ReverseDispense(req, timeout=10)
            except grpc.RpcError as err:
                assert_refusal(err, 0, {grpc.StatusCode.NOT_FOUND, grpc.StatusCode.FAILED_PRECONDITION})
            else:
                assert all(ln.units_returned <= 100_000 for ln in resp.lines)
        else:
            raw = data.draw(scans(packs))
            try:
                stub.GetCodeHistory(pb.GetCodeHistoryRequest(raw_code=raw), timeout=10)
            except grpc.RpcError as err:
                assert_refusal(err, 0, set())
        # Every pack keeps its invariants after every example (not only at the end, so a
        # failure shrinks to the example that broke them).
        assert_consistent(stub, packs, packs.raw)

    run()
    assert_consistent(stub, packs, packs.raw)
    # The fuzz did reach the interesting paths, not only refusals.
    dispensed = sum(stub.GetCodeHistory(pb.GetCodeHistoryRequest(raw_code=c), timeout=10).units_used > 0
                    for c in packs.raw)
    assert dispensed >= 3, "the fuzz never recorded a dispense: its strategies are off"


@pytest.mark.backend_independent
def test_raw_bytes_as_requests_never_break_the_server(target, packs):
    channel = grpc.insecure_channel(target)
    try:
        methods = {name: channel.unary_unary(f"/tracecode.v1.Verification/{name}")
                   for name in ("VerifyDispense", "CheckCodes", "ReverseDispense", "GetCodeHistory")}

        @FUZZ
        @given(name=st.sampled_from(sorted(methods)), body=st.binary(max_size=300))
        def run(name, body):
            try:
                methods[name](body, timeout=10)
            except grpc.RpcError as err:
                code = err.code()
                if code == grpc.StatusCode.INTERNAL:
                    # gRPC's own answer to bytes that are no protobuf message (as in every
                    # gRPC implementation): the handler never ran.
                    assert "deserializ" in err.details().lower(), err.details()
                else:
                    assert code not in NEVER, f"{code}: {err.details()}"

        run()
        # Still serving, and nothing the garbage did broke the packs.
        stub = verification_pb2_grpc.VerificationStub(channel)
        assert_consistent(stub, packs, packs.raw)
    finally:
        channel.close()


def test_codec_fuzz_target_holds_on_a_mutated_corpus():
    """The atheris script's target (fuzz/fuzz_codec.py, run outside CI for >= 1M inputs) on a few
    thousand deterministic mutations of its seed corpus: keeps the script and its properties
    honest between long runs."""
    import importlib.util
    import os
    import random
    if os.environ.get("TRACECODE_NO_EXTENSIONS", "") not in ("", "0"):
        pytest.skip("compiled codec disabled by TRACECODE_NO_EXTENSIONS: nothing to compare")
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "fuzz", "fuzz_codec.py")
    spec = importlib.util.spec_from_file_location("fuzz_codec", path)
    fuzz = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fuzz)
    rnd = random.Random(20260615)
    corpus = fuzz.seeds()
    for s in corpus:
        fuzz.check_one(s)
    for _ in range(4000):
        data = bytearray(rnd.choice(corpus))
        for _ in range(rnd.randint(1, 4)):
            op = rnd.randrange(3)
            pos = rnd.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(pos, len(data) - 1)] = rnd.randrange(256)
            elif op == 1:
                data[pos:pos] = bytes(rnd.randrange(256) for _ in range(rnd.randint(1, 3)))
            elif len(data) > 1:
                del data[pos:pos + rnd.randint(1, 3)]
        fuzz.check_one(bytes(data))
