"""The live rules at the counter (rules/live.py, docs/verification.md "Live rules"): STOCKPILING
and RESALE_SOURCE judged at each VerifyDispense over real gRPC and real Redis (one node: in the
settlement's own call; a cluster: one more call in the person's slot), against the leads
engine's batch models over the same history, in notice and in refusal mode, with bounded,
expiring per-person state keyed by pseudonym only."""
from __future__ import annotations

import csv
import os
from datetime import datetime, timedelta, timezone

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tracecode.clients.pos import line
from tracecode.leads import synth
from tracecode.leads.config import load as load_leads_config
from tracecode.leads.inputs import Pseudonyms
from tracecode.leads.run import Options, run
from tracecode.rules import live
from tracecode.rules.insured import resident_check_char
from tracecode.rules.pseudonym import Pseudonymizer
from prometheus_client import REGISTRY
from tracecode.clients.pos import PosClient
from tracecode.rules.packing import code_field

from factories import cn20, issuance, load
from helpers import AuditTail, verdicts
from test_leads_models import RAW, planted

PRODUCT = "8123456"


@pytest.fixture
def now() -> datetime:
    """The time of this test's settlements: taken when the test starts, so a slow run of earlier
    tests never pushes it past the server's clock-skew bound."""
    return datetime.now(timezone.utc)


def live_count(outcome: str, model: str = "STOCKPILING") -> float:
    return REGISTRY.get_sample_value("tracecode_live_rule_results_total", {"model": model, "outcome": outcome}) or 0.0


def rid(n: int) -> str:
    """A valid resident id (GB 11643 check character)."""
    first17 = f"11010119900101{n:03d}"
    return first17 + resident_check_char(first17)


def person_of(pseudonym_key: str, raw: str) -> str:
    return Pseudonymizer.from_file(pseudonym_key).pseudonym(raw)


def notices(resp) -> list[tuple[str, int, int]]:
    return [(n.model, n.packs, n.sites) for n in resp.notices]


def _packs(admin, n: int, product: str = PRODUCT) -> list[str]:
    codes = [cn20(product) for _ in range(n)]
    load(admin, *[issuance(c, product) for c in codes])
    return codes


def _models_config(tmp_path, text: str) -> str:
    path = tmp_path / "models.toml"
    path.write_text(text)
    return str(path)


def test_stockpiling_notice_at_the_settlement_the_rule_first_holds(now, pos, admin, store, pseudonym_key):
    person = rid(13)
    codes = _packs(admin, 8)
    other = _packs(admin, 1, "8123457")
    tail = AuditTail(store)
    got = []
    for k, code in enumerate(codes[:5]):
        got.append(notices(pos.verify(f"G{k % 3}", [line(code, PRODUCT)], settled_at=now + timedelta(seconds=k),
                                      insured_id=person)))
    assert got == [[]] * 5
    # The sixth pack at the third site: six packs, three sites, counting this settlement.
    before = live_count("notice")
    resp = pos.verify("G2", [line(codes[5], PRODUCT)], settled_at=now + timedelta(seconds=6), insured_id=person)
    assert verdicts(resp) == ["OK"] and resp.recorded
    (n,) = resp.notices
    assert (n.model, n.model_version, n.state, n.packs, n.sites, n.product_id, n.window_hours) == (
        "STOCKPILING", 1, "NOTICE", 6, 3, PRODUCT, 720.0)
    assert "囤药" in n.text and "6 盒" in n.text and "3 家机构" in n.text
    assert live_count("notice") == before + 1
    # Another product is another count; the person's next pack of this one holds again.
    assert notices(pos.verify("G0", [line(other[0], "8123457")], settled_at=now + timedelta(seconds=7),
                              insured_id=person)) == []
    assert notices(pos.verify("G0", [line(codes[6], PRODUCT)], settled_at=now + timedelta(seconds=8),
                              insured_id=person)) == [("STOCKPILING", 7, 3)]
    # Audited: one NOTICE per notice, with the model, the packs, the product and the pseudonym only.
    audited = [e for e in tail.new() if e.get("t") == "NOTICE"]
    assert [(e["x"], e["u"], e["g"]) for e in audited] == [("STOCKPILING", "6", PRODUCT), ("STOCKPILING", "7", PRODUCT)]
    assert {e["p"] for e in audited} == {person_of(pseudonym_key, person)}
    assert all(person not in str(e) for e in audited)
    # A settlement without a person, or a replay, carries none.
    assert notices(pos.verify("G1", [line(codes[7], PRODUCT)], settled_at=now)) == []


def test_resale_source_credits_the_first_buyer(pos, admin):
    buyer, other = rid(21), rid(48)
    a, b, c, fresh = _packs(admin, 4)
    for code in (a, b, c):
        pos.verify("A1", [line(code, PRODUCT)], insured_id=buyer)
    # One pack resold twice (counts once), another once: two packs of the buyer's resold.
    for site, code in (("B1", a), ("B2", a), ("B1", b)):
        resp = pos.verify(site, [line(code, PRODUCT)], insured_id=other)
        assert verdicts(resp) == ["DUPLICATE"]
        assert [m for m, *_ in notices(resp)] == []  # the reseller's customer is not the buyer
    # The same site selling its own pack again is no resale elsewhere (leads.md): no credit.
    pos.verify("A1", [line(c, PRODUCT)])
    resp = pos.verify("A2", [line(fresh, PRODUCT)], insured_id=buyer)
    (n,) = resp.notices
    assert (n.model, n.packs, n.state) == ("RESALE_SOURCE", 2, "NOTICE")
    assert "倒卖" in n.text


def test_refusal_mode_refuses_naming_the_rule_and_marks_nothing(make_server, admin, tmp_path, pseudonym_key):
    cfg = _models_config(tmp_path, '[STOCKPILING]\nmin_packs = 3\nmin_sites = 2\nlive = "REFUSE"\n')
    person = rid(56)
    codes = _packs(admin, 4)
    with PosClient(make_server(models_config=cfg), deadline_s=5) as pos:
        pos.verify("G1", [line(codes[0], PRODUCT)], insured_id=person)
        pos.verify("G2", [line(codes[1], PRODUCT)], insured_id=person)
        with pytest.raises(grpc.RpcError) as err:
            pos.verify("G2", [line(codes[2], PRODUCT), line(codes[3], PRODUCT)], settlement_id="r-1",
                       insured_id=person)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        status = rpc_status.from_call(err.value)
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info)
        assert info.reason == "STOCKPILING" and info.metadata["packs"] == "4" and info.metadata["sites"] == "2"
        assert "拒绝结算" in status.message
        # Nothing marked: both packs are still unused, the id unused (another person may buy them).
        for code in codes[2:]:
            assert pos.history(code).units_used == 0
        resp = pos.verify("G3", [line(codes[2], PRODUCT), line(codes[3], PRODUCT)], settlement_id="r-1")
        assert verdicts(resp) == ["OK", "OK"] and resp.notices == []


def test_a_rule_set_off_is_not_judged_and_thresholds_come_from_the_models_file(make_server, admin, tmp_path):
    cfg = _models_config(tmp_path, '[STOCKPILING]\nmin_packs = 2\nmin_sites = 2\nversion = 4\n'
                                   '[RESALE_SOURCE]\nlive = "OFF"\n[SWAP]\nmin_lines = 5\n')
    # One file for both: the batch engine reads the same thresholds and version.
    batch = load_leads_config(cfg).model("STOCKPILING")
    assert (batch.params, batch.version) == (live.load(cfg).rule("STOCKPILING").params, 4)
    codes = _packs(admin, 2)
    with PosClient(make_server(models_config=cfg), deadline_s=5) as pos:
        pos.verify("G1", [line(codes[0], PRODUCT)], insured_id=rid(64))
        resp = pos.verify("G2", [line(codes[1], PRODUCT)], insured_id=rid(64))
        assert [(n.model, n.model_version, n.packs) for n in resp.notices] == [("STOCKPILING", 4, 2)]


def test_a_wrong_models_file_is_refused_naming_file_and_key(tmp_path):
    bad = _models_config(tmp_path, '[STOCKPILING]\nlive = "SOMETIMES"\n')
    with pytest.raises(ValueError, match=r"models.toml: \[STOCKPILING\] live"):
        live.load(bad)
    bad = _models_config(tmp_path, '[RESALE_SOURCE]\nmin_pack = 2\n')
    with pytest.raises(ValueError, match=r"\[RESALE_SOURCE\] min_pack: unknown key"):
        live.load(bad)


def test_person_state_is_keyed_by_pseudonym_bounded_and_expires(now, make_server, admin, store, pseudonym_key):
    person = rid(72)
    p = person_of(pseudonym_key, person)
    codes = _packs(admin, 3)
    t0 = now - timedelta(days=40)
    pos = PosClient(make_server(clock_skew_s=60 * 86400), deadline_s=5)
    # A purchase 40 days ago, one 31 days ago, one now: the window (30 days) keeps one.
    for k, when in enumerate((t0, t0 + timedelta(days=9), now)):
        pos.verify(f"G{k}", [line(codes[k], PRODUCT)], settled_at=when, insured_id=person)
    _, vr, vc, vt = store.live_keys(p, [PRODUCT])
    assert p in vc and person not in vc and vc.startswith(f"{store.keys.prefix}:{live.person_tag(p)}:")
    # Only the pack bought now is in the window; the site with it.
    assert store.r.zrange(vc, 0, -1) == [code_field(codes[2])]  # packed (rules/packing.py)
    assert store.r.zrange(vt, 0, -1) == ["G2"]
    for key in (vc, vt):
        assert 720 * 3600 < store.r.ttl(key) <= 720 * 3600 + 3600
    # Credits expire with RESALE_SOURCE's own window (90 days by default).
    pos.verify("B9", [line(codes[2], PRODUCT)])
    assert store.r.zrange(vr, 0, -1) == [code_field(codes[2])]
    assert 2160 * 3600 < store.r.ttl(vr) <= 2160 * 3600 + 3600
    pos.close()


def test_a_rule_that_cannot_be_judged_says_so_and_the_settlement_stands(pos, admin, store, pseudonym_key,
                                                                         redis_server):
    person = rid(99)
    _, vr = store.live_keys(person_of(pseudonym_key, person))
    store.r.set(vr, "not a sorted set")  # the person's slot answers an error to the second call
    (code,) = _packs(admin, 1)
    before = live_count("unjudged")
    if not redis_server.cluster:
        # One node: the rules run inside the settlement's own call, before its first write, so
        # they fail with it and nothing is marked: once the key is sound, the pack settles OK.
        with pytest.raises(grpc.RpcError):
            pos.verify("G1", [line(code, PRODUCT)], insured_id=person, settlement_id="g1-broken")
        store.r.delete(vr)
        assert verdicts(pos.verify("G2", [line(code, PRODUCT)], insured_id=person)) == ["OK"]
        assert live_count("unjudged") == before
        return
    resp = pos.verify("G1", [line(code, PRODUCT)], insured_id=person)
    assert verdicts(resp) == ["OK"] and resp.recorded
    assert {(n.model, n.state) for n in resp.notices} == {("STOCKPILING", "UNJUDGED"), ("RESALE_SOURCE", "UNJUDGED")}
    assert all("未能判断" in n.text for n in resp.notices)
    assert live_count("unjudged") == before + 1


# ------------------------------------------------------------------ the differential test

def _first_held(evidence: list[dict], model: str, params: dict) -> dict[str, tuple[str, str]]:
    """Per person the batch found, the (site, settlement id) at which the rule first held,
    computed from the leads engine's evidence alone (docs/leads.md, Precise rules)."""
    out: dict[str, tuple[str, str]] = {}
    by: dict[str, list[dict]] = {}
    for e in evidence:
        by.setdefault(e["subject_id"], []).append(e)
    for person, rows in by.items():
        rows.sort(key=lambda e: (e["settled_at"], e["settlement_id"]))
        if model == "STOCKPILING":
            w = timedelta(hours=params["window_hours"])
            for k, e in enumerate(rows):
                t = datetime.fromisoformat(e["settled_at"])
                window = [r for r in rows[:k + 1] if r["product_id"] == e["product_id"]
                          and datetime.fromisoformat(r["settled_at"]) >= t - w]
                if (len({r["canonical_code"] for r in window}) >= params["min_packs"]
                        and len({r["site_id"] for r in window}) >= params["min_sites"]):
                    out[person] = (e["site_id"], e["settlement_id"])
                    break
        else:  # RESALE_SOURCE: the time its min_packs-th distinct pack was resold
            seen: set[str] = set()
            for e in (r for r in rows if r["role"] == "later"):
                seen.add(e["canonical_code"])
                if len(seen) >= params["min_packs"]:
                    out[person] = (datetime.fromisoformat(e["settled_at"]), e["settlement_id"])
                    break
    return out


def test_the_counter_agrees_with_the_batch_models(pos, admin, tmp_path, pseudonym_key, make_server):
    """Replay the planted-pattern history of test_leads_models (each model's pattern and its
    near-miss decoys) through VerifyDispense in settled_at order and through the leads engine: every
    person the batch STOCKPILING / RESALE_SOURCE model finds got a notice at the settlement where the
    rule first held, and nobody else got one."""
    p, expected = planted()
    # Each planted person buys once more after the history (RESALE_SOURCE speaks at the person's
    # next settlement): a fresh pack of an unrelated product, which changes no batch finding.
    end = max(datetime.fromisoformat(r["settled_at"]) for r in p.rows) + timedelta(days=1)
    for k, name in enumerate(RAW):
        p.sale("Z1", end + timedelta(minutes=k), [p.pack("8399999")], RAW[name], billed="8399999")
    cfg = _models_config(tmp_path, "[RESALE_SOURCE]\nmin_packs = 2\n[STOCKPILING]\nwindow_hours = 720\n")
    pz = Pseudonymizer.from_file(pseudonym_key)
    files = {"issuance": synth.write_csv(str(tmp_path / "issuance.csv"), p.issuance,
                                         ["code", "product_id", "pack_units"]),
             "settlements": synth.write_csv(str(tmp_path / "settlements.csv"), p.rows, synth.SETTLEMENT_COLUMNS)}
    out = str(tmp_path / "leads")
    run(Options(files=[files["settlements"]], issuance=[files["issuance"]], out=out, engine="duckdb",
                pseudonyms=Pseudonyms(pz), config=load_leads_config(cfg), progress=False))
    with open(os.path.join(out, "leads.csv"), newline="", encoding="utf-8") as fh:
        leads = list(csv.DictReader(fh))
    with open(os.path.join(out, "evidence.csv"), newline="", encoding="utf-8") as fh:
        evidence = list(csv.DictReader(fh))
    names = {pz.pseudonym(raw): name for name, raw in RAW.items()}
    models = ("STOCKPILING", "RESALE_SOURCE")
    batch = {m: {ld["subject_id"] for ld in leads if ld["model"] == m} for m in models}
    assert {m: {names[s] for s in batch[m]} for m in models} == {m: expected[m] for m in models}
    ids = {ld["lead_id"]: ld for ld in leads}
    params = {m: load_leads_config(cfg).model(m).params for m in models}
    held = {m: _first_held([dict(e, subject_id=ids[e["lead_id"]]["subject_id"]) for e in evidence
                            if ids[e["lead_id"]]["model"] == m], m, params[m]) for m in models}

    # The service, over the same issuance and the same file in settled_at order.
    load(admin, *[issuance(r["code"], r["product_id"], **({"pack_units": r["pack_units"]} if r["pack_units"] else {}))
                  for r in p.issuance])
    settlements: dict[tuple[str, str], list[dict]] = {}
    for r in p.rows:
        settlements.setdefault((r["site_id"], r["settlement_id"]), []).append(r)
    replay = []  # (settled_at, site, settlement id, person's pseudonym, {model})
    with PosClient(make_server(models_config=cfg, clock_skew_s=10 ** 9), deadline_s=10) as live_pos:
        for (site, sid), rows in settlements.items():
            resp = live_pos.verify(site, [line(r["code"], r["product_id"], int(r["units"] or 0)) for r in rows],
                                   settlement_id=sid, settled_at=datetime.fromisoformat(rows[0]["settled_at"]),
                                   insured_id=rows[0]["insured_id"])
            assert all(n.state == "NOTICE" for n in resp.notices)
            replay.append((datetime.fromisoformat(rows[0]["settled_at"]), site, sid, pz.pseudonym(rows[0]["insured_id"]),
                           {n.model for n in resp.notices}))
    for m in models:
        noticed = {who for _, _, _, who, got in replay if m in got}
        assert {names.get(s, s) for s in noticed} == expected[m], m  # every found person, no decoy
        for person in batch[m]:
            first = next((at, site, sid) for at, site, sid, who, got in replay if who == person and m in got)
            if m == "STOCKPILING":
                assert first[1:] == held[m][person]
            else:  # the person's first settlement after their second pack was resold
                resold_at = held[m][person][0]
                assert first == next((at, site, sid) for at, site, sid, who, _ in replay
                                     if who == person and at > resold_at)


def test_a_persons_state_is_capped(now, pos, admin, store, pseudonym_key):
    """However much one person buys, their STOCKPILING state keeps at most MAX_ENTRIES codes
    (the newest); the counts stay above every threshold."""
    person = rid(101)
    codes = _packs(admin, live.MAX_ENTRIES + 4)
    half = len(codes) // 2
    pos.verify("G1", [line(c, PRODUCT) for c in codes[:half]], settled_at=now, insured_id=person)
    resp = pos.verify("G2", [line(c, PRODUCT) for c in codes[half:]], settled_at=now + timedelta(seconds=1),
                      insured_id=person)
    _, _, vc, vt = store.live_keys(person_of(pseudonym_key, person), [PRODUCT])
    assert store.r.zcard(vc) == live.MAX_ENTRIES
    assert set(store.r.zrange(vc, 0, -1)) >= {code_field(c) for c in codes[half:]}  # the oldest went first
    assert store.r.zcard(vt) == 2
    assert notices(resp) == []  # two sites: below min_sites however many packs
