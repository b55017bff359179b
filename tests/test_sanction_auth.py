"""Who may do what with sanctions and insured pseudonyms, over real bearer tokens, gRPC and Redis:
a pharmacy cannot set, lift or list a sanction; an admin can; a pharmacy's GetCodeHistory shows
its own sales and only the first dispenser's site and time, an admin's everything."""
from __future__ import annotations

import grpc
import pytest

from tracecode.clients.admin import AdminClient
from tracecode.clients.pos import PosClient, line
from tracecode.server.api import auth
from tracecode.server.app import Server
from tracecode.rules.pseudonym import Pseudonymizer

from factories import cn20, issuance, load

P = "8123456"
SECRET = b"0123456789abcdef0123456789abcdef-sanction-secret"


def bearer(role: str, name: str) -> tuple:
    return (("authorization", f"Bearer {auth.issue_token(SECRET, role, name, 300)}"),)


@pytest.fixture
def deployment(config, store, tmp_path):
    secret = tmp_path / "token.secret"
    secret.write_bytes(SECRET + b"\n")
    cfg = config.replace(auth="token", auth_token_secret_file=str(secret))
    security = auth.from_config(cfg)
    server = Server(cfg, store, **security.server_kwargs()).start()
    target = f"127.0.0.1:{server.port}"
    clients = []

    def client(kind, role, name):
        c = (AdminClient(target, metadata=bearer(role, name), timeout_s=5) if kind == "admin"
             else PosClient(target, metadata=bearer(role, name), deadline_s=5, retries=0))
        clients.append(c)
        return c

    yield client
    for c in clients:
        c.close()
    server.stop(0)


def test_a_pharmacy_token_cannot_set_lift_or_list_sanctions(deployment, store):
    ops = deployment("admin", "admin", "ops1")
    as_pharmacy = deployment("admin", "site", "PH-A")
    s = ops.set_sanction("SUSPEND_SERVICE", request_id="auth-1", site_id="PH-B", reason="r")
    assert s.actor == "admin:ops1"  # no actor given: the caller's identity
    calls = [lambda: as_pharmacy.set_sanction("SUSPEND_SERVICE", request_id="auth-2", site_id="PH-B", reason="r"),
             lambda: as_pharmacy.set_sanction("BLACKLIST", request_id="auth-3", site_id="PH-A", reason="r"),
             lambda: as_pharmacy.lift_sanction(s.sanction_id, reason="mine now"),
             lambda: as_pharmacy.list_sanctions(include_history=True)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Nothing changed: still one sanction, in force, never lifted.
    (only,) = ops.list_sanctions(include_history=True)
    assert only.sanction_id == s.sanction_id and only.in_force and not only.HasField("lifted_at")
    lifted = ops.lift_sanction(s.sanction_id, reason="ok", actor="supervisor-li")
    assert lifted.lifted_by == "supervisor-li" and not lifted.in_force


def test_history_narrowed_for_a_pharmacy_full_for_an_admin(deployment, config):
    ops = deployment("admin", "admin", "ops1")
    code = cn20()
    load(ops, issuance(code, P))
    a, b = deployment("pos", "site", "PH-A"), deployment("pos", "site", "PH-B")
    a.verify("", [line(code, P)], settlement_id="SA-1", insured_id="BUYER-A")
    b.verify("", [line(code, P)], settlement_id="SB-1", insured_id="BUYER-B")  # DUPLICATE attempt
    pseudonym = Pseudonymizer.from_file(config.pseudonym_key_file).pseudonym("BUYER-A")

    seen_by_b = b.history(code)
    assert seen_by_b.first_dispense.first_site_id == "PH-A" and seen_by_b.first_dispense.HasField("first_settled_at")
    assert seen_by_b.first_dispense.first_settlement_id == ""  # another pharmacy's settlement
    assert seen_by_b.first_insured_id == "" and seen_by_b.first_dispense.first_insured_id == ""
    assert {e.site_id for e in seen_by_b.events} == {"PH-B"} and all(not e.insured_id for e in seen_by_b.events)

    seen_by_a = a.history(code)
    assert seen_by_a.first_dispense.first_settlement_id == "SA-1"
    assert {e.site_id for e in seen_by_a.events} == {"PH-A"} and seen_by_a.first_insured_id == ""

    admin_pos = deployment("pos", "admin", "inspector-1")
    full = admin_pos.history(code)
    assert {e.site_id for e in full.events} == {"PH-A", "PH-B"}
    assert full.first_insured_id == pseudonym and full.first_dispense.first_settlement_id == "SA-1"
    assert pseudonym in [e.insured_id for e in full.events]


def test_another_pharmacy_sees_site_and_time_only_in_every_answer(deployment):
    """Issue 23, 4: a pharmacy's CheckCodes and its DUPLICATE evidence named the first sale's
    settlement id of another pharmacy (GetCodeHistory hid it)."""
    ops = deployment("admin", "admin", "ops1")
    code = cn20()
    load(ops, issuance(code, P))
    a, b = deployment("pos", "site", "PH-A"), deployment("pos", "site", "PH-B")
    a.verify("", [line(code, P)], settlement_id="SA-SECRET-7", insured_id="BUYER-A")

    dup = b.verify("", [line(code, P)], settlement_id="SB-1").results[0]
    checked = b.check([line(code, P)]).results[0]
    for seen in (dup, checked):
        assert seen.evidence.first_site_id == "PH-A" and seen.evidence.HasField("first_settled_at")
        assert seen.evidence.first_settlement_id == "" and "SA-SECRET-7" not in str(seen)
    # The first pharmacy sees its own settlement; an admin identity sees it too.
    assert a.check([line(code, P)]).results[0].evidence.first_settlement_id == "SA-SECRET-7"
    admin_pos = deployment("pos", "admin", "inspector-1")
    assert admin_pos.check([line(code, P)], site_id="PH-C").results[0].evidence.first_settlement_id == "SA-SECRET-7"
