"""The receiving check (入库核验, issue 28) over real gRPC and Redis, on both backends: each pack of
a delivery judged as stock in one atomic call; a resold pack offered as stock refused naming its
first sale; accepted packs recorded as received and a later sale at another site carrying the
notice; idempotent on (site, delivery id); `tracecode receive FILE` for a shipment file."""
from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import grpc
import pytest

from tracecode.clients.pos import line
from tracecode.clients.receiving import ReceivingClient
from tracecode.v1 import verification_pb2 as pb

from factories import cn20, gs1, issuance, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
P, Q = "8123456", "8654321"


def names(resp):
    return [pb.Verdict.Name(r.verdict) for r in resp.results]


@pytest.fixture
def receiving(target):
    with ReceivingClient(target, timeout_s=10) as client:
        yield client


def test_each_pack_is_judged_as_stock_and_a_resold_one_names_its_first_sale(pos, admin, receiving):
    fresh, sold, locked, expired, other, gs = cn20(), cn20(), cn20(), cn20(), cn20(Q), gs1()
    unknown = cn20()
    past = (datetime.now() - timedelta(days=3)).strftime("%Y-%m-%d")
    load(admin, issuance(fresh, P), issuance(sold, P), issuance(locked, P, status="LOCKED"),
         issuance(expired, P, expiry=past), issuance(other, Q), issuance(gs, P))
    first = pos.verify("PH-A", [line(sold, P)], settlement_id="sale-1")
    assert first.recorded
    resp = receiving.receive("PH-B", "DN-1", [(fresh, P), (sold, P), (locked, P), (expired, P), (other, P),
                                              (unknown, P), ("not-a-code", P), (gs, ""), (fresh, P)],
                             supplier="国药控股")
    assert names(resp) == ["OK", "DUPLICATE", "BLOCKED", "EXPIRED", "PRODUCT_MISMATCH", "UNKNOWN", "MALFORMED",
                           "OK", "DUPLICATE_IN_REQUEST"]
    assert resp.accepted == 2 and not resp.replayed
    dup = resp.results[1]
    assert dup.evidence.first_site_id == "PH-A"
    assert abs(dup.evidence.first_settled_at.seconds - first.results[0].evidence.first_settled_at.seconds) <= 1 \
        or dup.evidence.first_settled_at.seconds > 0
    assert "PH-A" in dup.reason and "回流" in dup.reason and "sale-1" not in dup.reason
    assert all(r.reason for r, v in zip(resp.results, names(resp)) if v != "OK")
    # Receiving marks nothing as dispensed: the fresh pack still sells once, at the receiver.
    assert names(pos.verify("PH-B", [line(fresh, P)])) == ["OK"]
    # And the refused packs were not recorded as received (no notice when PH-C sells... the
    # locked one is still BLOCKED; the product mismatch sells with no notice at all).
    sale = pos.verify("PH-C", [line(other, Q)])
    assert names(sale) == ["OK"] and sale.results[0].receipt == pb.RECEIPT_NOTICE_NONE


def test_a_pack_received_by_one_site_and_sold_at_another_carries_the_notice(pos, admin, receiving):
    a, b, c = cn20(), cn20(), cn20()
    load(admin, issuance(a, P), issuance(b, P), issuance(c, P))
    assert receiving.receive("PH-A", "DN-7", [(a, P), (b, P)]).accepted == 2
    at_b = pos.verify("PH-B", [line(a, P)])
    r = at_b.results[0]
    assert names(at_b) == ["OK"] and r.receipt == pb.RECEIVED_ELSEWHERE and "串货" in r.receipt_text
    at_a = pos.verify("PH-A", [line(b, P)])
    assert at_a.results[0].receipt == pb.RECEIPT_NOTICE_NONE and not at_a.results[0].receipt_text
    # Never received anywhere: no notice while receipts are not required.
    assert pos.verify("PH-B", [line(c, P)]).results[0].receipt == pb.RECEIPT_NOTICE_NONE


def test_receipts_required_notices_a_pack_no_site_received(admin, make_server):
    target = make_server(receipts_required=True)
    from tracecode.clients.pos import PosClient
    code, got = cn20(), cn20()
    load(admin, issuance(code, P), issuance(got, P))
    with ReceivingClient(target) as rc, PosClient(target, deadline_s=5) as pos:
        rc.receive("PH-N", "DN-9", [(got, P)])
        out = pos.verify("PH-N", [line(code, P), line(got, P)])
    assert [r.receipt for r in out.results] == [pb.NOT_RECEIVED, pb.RECEIPT_NOTICE_NONE]
    assert "入库" in out.results[0].receipt_text


def test_a_delivery_is_idempotent_and_another_body_under_its_id_is_refused(admin, receiving):
    codes = [cn20() for _ in range(12)]
    load(admin, *(issuance(c, P) for c in codes))
    at = datetime.now(timezone.utc) - timedelta(minutes=5)
    first = receiving.receive("PH-I", "DN-42", [(c, P) for c in codes], received_at=at)
    again = receiving.receive("PH-I", "DN-42", [(c, P) for c in codes], received_at=at)
    assert first.accepted == 12 and again.replayed and names(again) == names(first) == ["OK"] * 12
    with pytest.raises(grpc.RpcError) as err:
        receiving.receive("PH-I", "DN-42", [(c, P) for c in codes[:-1]], received_at=at)
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    # The same delivery id at another site is another delivery: those packs are OK there too
    # (a transfer), each naming that another site had received it before.
    other = receiving.receive("PH-J", "DN-42", [(codes[0], P)])
    assert names(other) == ["OK"] and other.results[0].received_elsewhere_before
    assert other.results[0].received_before_site_id == "PH-I"  # no authentication: every field


def test_bad_requests_name_the_field(receiving):
    for site, delivery, lines, field in (("", "D1", [("x", "")], "site_id"), ("PH", "", [("x", "")], "delivery_id"),
                                         ("PH", "D2", [], "lines"), ("PH", "D3", [("x", "a\u202eb")], "lines[0].product_id")):
        with pytest.raises(grpc.RpcError) as err:
            receiving.receive(site, delivery, lines)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in err.value.details(), field


@pytest.mark.backend_independent
def test_tracecode_receive_sends_each_delivery_of_a_shipment_file(pos, admin, target, tmp_path):
    good = [cn20() for _ in range(3)]
    sold = cn20()
    load(admin, *(issuance(c, P) for c in [*good, sold]))
    pos.verify("PH-X", [line(sold, P)])
    path = tmp_path / "shipment.csv"
    path.write_text("delivery_id,code,product_id,supplier\n"
                    f"DN-100,{good[0]},{P},华润医药\n"
                    f"DN-100,{sold},{P},华润医药\n"
                    f"DN-200,{good[1]},{P},九州通\n"
                    f"DN-200,,{P},九州通\n"          # line 5: no code: DN-200 is not sent at all
                    f"DN-300,{good[2]},{P},九州通\n", encoding="utf-8")
    p = subprocess.run([sys.executable, "-m", "tracecode.cli", "receive", str(path), "--site", "PH-R",
                        "--server", target], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1, p.stderr
    assert "delivery DN-100 at site PH-R: 1 of 2 packs received, 1 flagged" in p.stdout
    assert f"{path}:3: DUPLICATE" in p.stdout and "PH-X" in p.stdout
    assert f"{path}:5: code" in p.stderr and "DN-200: NOT sent" in p.stderr
    assert "delivery DN-300 at site PH-R: 1 of 1 packs received" in p.stdout
    # DN-200's good pack was not received: a sale of it elsewhere carries no notice.
    assert pos.verify("PH-Y", [line(good[1], P)]).results[0].receipt == pb.RECEIPT_NOTICE_NONE
    assert pos.verify("PH-Y", [line(good[2], P)]).results[0].receipt == pb.RECEIVED_ELSEWHERE
    # A row of no known delivery (no delivery id): nothing of that file is sent.
    more = [cn20() for _ in range(2)]
    load(admin, *(issuance(c, P) for c in more))
    path2 = tmp_path / "shipment2.csv"
    path2.write_text(f"delivery_id,code\nDN-400,{more[0]}\n,{more[1]}\n", encoding="utf-8")
    p = subprocess.run([sys.executable, "-m", "tracecode.cli", "receive", str(path2), "--site", "PH-R",
                        "--server", target], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and f"{path2}:3: delivery_id" in p.stderr and "nothing sent" in p.stderr
    assert pos.verify("PH-Y", [line(more[0], P)]).results[0].receipt == pb.RECEIPT_NOTICE_NONE
