"""The ledger through its HTTP interface on a real PostgreSQL: roles enforced on the server,
the status workflow and its history, one open lead per subject, idempotent imports, pseudonyms."""
from __future__ import annotations

import csv
import io

import pytest
from console_support import http, make_user, unique

RAW_ID = "11010519491231002x"  # an insured person's id as typed (check character in lower case)


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _engine_files(tmp_path, site: str, lead_id: str, lines: int, model="RESALE_BUYER", region="R1"):
    leads = [{"lead_id": lead_id, "model": model, "model_version": "1", "subject_kind": "SITE", "subject_id": site,
              "region": region, "window_start": "2024-05-06T10:00:00+08:00", "window_end": "2024-05-07T10:00:00+08:00",
              "score": "3", "risk": "HIGH", "packs": str(lines), "lines": str(lines * 2), "amount": "",
              "summary": f"{site} 销售了已在他处销售的药品 {lines} 盒"}]
    ev = []
    for i in range(lines):
        code = f"81234560000{lead_id[-3:]}{i:05d}"
        ev.append({"lead_id": lead_id, "role": "first", "site_id": "FIRST-" + site, "settlement_id": f"s{i}",
                   "line_no": "1", "settled_at": f"2024-05-06T10:{i:02d}:00+08:00", "canonical_code": code,
                   "product_id": "P1", "insured_id": RAW_ID, "amount": "10.00"})
        ev.append({"lead_id": lead_id, "role": "later", "site_id": site, "settlement_id": f"t{i}",
                   "line_no": "1", "settled_at": f"2024-05-07T10:{i:02d}:00+08:00", "canonical_code": code,
                   "product_id": "P1", "insured_id": "", "amount": "12.50"})
    lp, ep = tmp_path / f"{lead_id}-leads.csv", tmp_path / f"{lead_id}-evidence.csv"
    lp.write_bytes(_csv(leads))
    ep.write_bytes(_csv(ev))
    return str(lp), str(ep)


def _import(sup, path_leads, path_ev):
    with open(path_leads, "rb") as a, open(path_ev, "rb") as b:
        return http(sup).post("/import/", {"kind": "engine", "leads": a, "evidence": b}, follow=True)


def _ledger_rows():
    """Every row of the ledger's tables, as comparable tuples."""
    from django.apps import apps
    out = {}
    for m in apps.get_app_config("ledger").get_models():
        out[m.__name__] = sorted(tuple(str(v) for v in r) for r in m.objects.values_list())
    return out


def _lead_of(subject):
    from tracecode.console.ledger.models import Lead
    return Lead.objects.get(subject_id=subject)


def test_engine_import_twice_changes_nothing_and_new_hits_join_the_open_lead(console_env, tmp_path):
    from tracecode.console.ledger.models import Evidence, Lead
    sup = make_user("supervisor")
    site = unique("SITE")
    lp, ep = _engine_files(tmp_path, site, unique("lead") + "001", 3)
    r = _import(sup, lp, ep)
    assert r.status_code == 200 and "新建线索 1 条" in r.content.decode()
    lead = _lead_of(site)
    assert (lead.lines, lead.packs, str(lead.amount)) == (6, 3, "37.50")  # amount: the `later` lines
    before = _ledger_rows()
    r = _import(sup, lp, ep)
    assert "未变化 1 条" in r.content.decode()
    assert _ledger_rows() == before

    # Another model run: a new lead id on the same subject and model joins the open lead.
    lp2, ep2 = _engine_files(tmp_path, site, unique("lead") + "002", 4)
    _import(sup, lp2, ep2)
    assert Lead.objects.filter(subject_id=site).count() == 1
    lead.refresh_from_db()
    assert lead.lines == 14 and lead.hits.count() == 2
    assert lead.entries.filter(kind="EVIDENCE").exists()
    # The raw insured id of the evidence is stored nowhere, only its pseudonym.
    from tracecode.console.ledger.intake import pseudonymizer
    assert Evidence.objects.filter(lead=lead, insured_pseudonym=pseudonymizer().pseudonym(RAW_ID)).count() == 7
    dump = console_env.pg.dump()
    assert RAW_ID not in dump and RAW_ID.upper() not in dump


def _lead_for(sup, tmp_path, region="R1"):
    site = unique("SITE")
    lp, ep = _engine_files(tmp_path, site, unique("lead") + "003", 2, region=region)
    _import(sup, lp, ep)
    return _lead_of(site)


def test_roles_are_enforced_over_http(console_env, tmp_path):
    from tracecode.console.ledger.models import Entry, SanctionRequest
    sup, sup2 = make_user("supervisor"), make_user("supervisor")
    ins_a, ins_b, aud = make_user("inspector"), make_user("inspector"), make_user("auditor")
    lead = _lead_for(sup, tmp_path)
    url = f"/leads/{lead.ref}/"

    # Nobody but a supervisor assigns; the auditor changes nothing.
    # (an inspector does not even see a lead not assigned to them: 404)
    assert http(ins_a).post(url + "assign", {"assignee": ins_a.pk}).status_code == 404
    assert http(aud).post(url + "assign", {"assignee": ins_a.pk}).status_code == 403
    assert http().get(url).status_code == 302  # anonymous: to the login page
    r = http(sup).post(url + "assign", {"assignee": ins_a.pk, "reason": "请核查"})
    assert r.status_code == 302
    lead.refresh_from_db()
    assert lead.assignee_id == ins_a.pk and lead.status == "IN_PROGRESS"

    # Another inspector neither sees nor changes it; the list does not show it either.
    b = http(ins_b)
    assert b.get(url).status_code == 404
    assert lead.ref not in b.get("/").content.decode()
    assert b.post(url + "transition", {"to": "CONFIRMED", "cause": "FRAUD_RESALE", "reason": "x"}).status_code == 404
    assert b.post(url + "note", {"text": "x"}).status_code == 404
    assert lead.ref in http(ins_a).get("/").content.decode()
    assert http(ins_a).post(url + "assign", {"assignee": ins_b.pk}).status_code == 403
    assert lead.ref in http(aud).get("/").content.decode()
    assert http(aud).get(url).status_code == 200
    assert http(aud).post(url + "note", {"text": "x"}).status_code == 403

    # The assigned inspector confirms; a technical cause cannot be 查证属实.
    a = http(ins_a)
    a.post(url + "transition", {"to": "CONFIRMED", "cause": "TECH_DOUBLE_SCAN", "reason": "重复扫码"})
    lead.refresh_from_db()
    assert lead.status == "IN_PROGRESS"
    a.post(url + "transition", {"to": "CONFIRMED", "cause": "FRAUD_RESALE", "reason": "回流药属实"})
    lead.refresh_from_db()
    assert (lead.status, lead.cause) == ("CONFIRMED", "FRAUD_RESALE")

    # The inspector proposes a sanction but cannot impose it; nobody approves their own proposal.
    a.post(url + "sanction", {"action_code": "SUSPEND_SERVICE", "subject_id": lead.subject_id, "reason": "回流药"})
    req = SanctionRequest.objects.get(lead=lead)
    assert req.state == "PROPOSED" and req.proposed_by_id == ins_a.pk
    assert a.post(f"/sanctions/{req.request_id}/approve").status_code == 403
    assert http(aud).post(f"/sanctions/{req.request_id}/approve").status_code == 403
    http(sup).post(url + "sanction", {"action_code": "BLACKLIST", "subject_id": lead.subject_id, "reason": "黑名单"})
    own = SanctionRequest.objects.get(lead=lead, action_code="BLACKLIST")
    assert http(sup).post(f"/sanctions/{own.request_id}/approve").status_code == 403
    own.refresh_from_db()
    assert own.state == "PROPOSED" and own.call == ""
    # The other supervisor may (the call itself is the gateway's business: tested elsewhere).
    assert http(sup2).post(f"/sanctions/{own.request_id}/reject", {"reason": "证据不足"}).status_code == 302
    own.refresh_from_db()
    assert own.state == "REJECTED"

    # History cannot be altered over HTTP: no method edits or deletes an entry.
    entries = list(Entry.objects.filter(lead=lead).values_list("id", "at", "actor", "kind", "before", "after", "reason"))
    assert len(entries) >= 6
    for method in ("put", "patch", "delete"):
        assert getattr(a, method)(url).status_code == 405
    a.post(url + "note", {"text": "更正：理由补充"})
    after = list(Entry.objects.filter(lead=lead).values_list("id", "at", "actor", "kind", "before", "after", "reason"))
    assert after[:len(entries)] == entries and len(after) == len(entries) + 1


def test_history_is_append_only_in_the_database(console_env, tmp_path):
    from django.db import connection, transaction
    from django.db.utils import DatabaseError

    from tracecode.console.ledger.models import AppendOnly, Entry
    lead = _lead_for(make_user("supervisor"), tmp_path)
    e = Entry.objects.filter(lead=lead).first()
    e.reason = "edited"
    with pytest.raises(AppendOnly):
        e.save()
    with pytest.raises(AppendOnly):
        e.delete()
    for sql in ("UPDATE ledger_entry SET reason = 'x' WHERE id = %s", "DELETE FROM ledger_entry WHERE id = %s"):
        with pytest.raises(DatabaseError, match="append-only"):
            with transaction.atomic(), connection.cursor() as cur:
                cur.execute(sql, [e.pk])
    assert Entry.objects.get(pk=e.pk).reason != "x"


def test_workflow_history_and_handed_down_close(console_env, tmp_path):
    from tracecode.console.ledger.models import Lead
    sup, ins = make_user("supervisor"), make_user("inspector")
    number = unique("第一批")
    path = tmp_path / "batch.csv"
    site = unique("SITE")
    path.write_bytes(_csv([{"机构编码": site, "线索描述": "疑似回流药", "统筹区": "R9", "extra": "ignored"},
                           {"机构编码": site, "线索描述": "疑似回流药", "统筹区": "R9", "extra": "ignored"},
                           {"机构编码": "", "线索描述": "缺对象", "统筹区": "R9", "extra": ""}]))
    c = http(sup)
    with open(path, "rb") as fh:
        r = c.post("/import/", {"kind": "batch", "source": "NATIONAL", "number": number, "received_on": "2024-12-03",
                                "file": fh}, follow=True)
    text = r.content.decode()
    # All or nothing per file: the row without a subject refuses the file, named by file, line and field.
    assert "整份文件未导入" in text and "batch.csv:4: subject_id: required" in text and "unknown columns ignored: extra" in text
    assert not Lead.objects.filter(subject_id=site).exists()
    path.write_bytes(_csv([{"机构编码": site, "线索描述": "疑似回流药", "统筹区": "R9", "extra": "ignored"},
                           {"机构编码": site, "线索描述": "疑似回流药", "统筹区": "R9", "extra": "ignored"}]))
    for _ in range(2):
        with open(path, "rb") as fh:
            r = c.post("/import/", {"kind": "batch", "source": "NATIONAL", "number": number, "received_on": "2024-12-03",
                                    "file": fh}, follow=True)
        assert "新建线索 1 条" in r.content.decode() or "未变化 2 条" in r.content.decode()
    assert Lead.objects.filter(subject_id=site).count() == 1
    lead = Lead.objects.get(subject_id=site)
    assert lead.source == "NATIONAL" and lead.batch.number == number
    url = f"/leads/{lead.ref}/"
    c.post(url + "assign", {"assignee": ins.pk})
    i = http(ins)
    i.post(url + "transition", {"to": "UNFOUNDED", "cause": "TECH_DATA_ERROR", "reason": "赋码数据错误"})
    # A handed-down lead does not close without its handling report.
    r = c.post(url + "transition", {"to": "CLOSED", "reason": "办结"}, follow=True)
    assert "须提交处理报告" in r.content.decode()
    lead.refresh_from_db()
    assert lead.status == "UNFOUNDED"
    i.post(url + "report", {"text": "经核查系赋码数据错误，已通知企业更正。"})
    assert i.post(url + "transition", {"to": "CLOSED", "reason": "办结"}).status_code == 403  # inspectors do not close
    c.post(url + "transition", {"to": "CLOSED", "reason": "办结"})
    lead.refresh_from_db()
    assert lead.status == "CLOSED" and lead.closed_at is not None
    moves = [(e.actor, e.before, e.after, e.reason) for e in lead.entries.filter(kind="STATUS")]
    assert moves == [(sup.username, "NEW", "IN_PROGRESS", "分派核查"),
                     (ins.username, "IN_PROGRESS", "UNFOUNDED", "赋码数据错误"),
                     (sup.username, "UNFOUNDED", "CLOSED", "办结")]
    # A new row on the closed subject in another batch opens a new lead, marked as a repeat.
    path.write_bytes(_csv([{"机构编码": site, "线索描述": "再次移交"}]))
    with open(path, "rb") as fh:
        c.post("/import/", {"kind": "batch", "source": "NATIONAL", "number": number + "b", "received_on": "2024-12-10",
                            "file": fh})
    newer = Lead.objects.filter(subject_id=site).exclude(pk=lead.pk).get()
    assert newer.repeat_count == 1
    # Repeat subjects rank first in the default list.
    body = c.get("/?region=R9").content.decode() if newer.region == "R9" else c.get(f"/?subject={site}").content.decode()
    assert body.index(newer.ref) < body.index(lead.ref)


def test_xlsx_batch_and_search_by_raw_insured_id(console_env, tmp_path):
    from openpyxl import Workbook

    from tracecode.console.ledger.intake import pseudonymizer
    from tracecode.console.ledger.models import Lead
    sup = make_user("supervisor")
    raw = f"  {unique('4401')}x "
    wb = Workbook()
    wb.active.append(["参保人证件号", "线索描述"])
    wb.active.append([raw, "多处购药"])
    path = tmp_path / "complaints.xlsx"
    wb.save(path)
    c = http(sup)
    for _ in range(2):
        with open(path, "rb") as fh:
            c.post("/import/", {"kind": "batch", "source": "COMPLAINT", "number": unique("TS"), "received_on": "2024-12-05",
                                "file": fh})
    pseudonym = pseudonymizer().pseudonym(raw)
    leads = Lead.objects.filter(subject_id=pseudonym)
    assert leads.count() == 2 and all(lead.subject_kind == "INSURED" for lead in leads)  # two batches, two leads
    r = c.post("/search/person", {"insured_id": raw.strip().upper()}, follow=True)
    assert r.status_code == 200
    body = r.content.decode()
    assert all(lead.ref in body for lead in leads)
    assert raw.strip() not in body and raw.strip().upper() not in body
    dump = console_env.pg.dump()
    assert raw.strip() not in dump and raw.strip().upper() not in dump


def test_pages_render_in_chinese(console_env, tmp_path):
    sup = make_user("supervisor")
    lead = _lead_for(sup, tmp_path)
    c = http(sup)
    page = c.get(f"/leads/{lead.ref}/").content.decode()
    assert "办理记录（不可修改、不可删除）" in page and "转售链条" in page and "<svg" in page
    assert "待核查" in page
    login = http().get("/login/").content.decode()
    assert "登录" in login and 'lang="zh-Hans"' in login


def test_parquet_leads_filters_and_sorting(console_env, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from tracecode.console.ledger.intake import import_engine
    sup = make_user("supervisor")
    region = unique("RG")
    a, b, c = unique("SA"), unique("SB"), unique("SC")
    rows = [
        dict(lead_id=unique("p"), model="ABNORMAL_SITE", model_version="1", subject_kind="SITE", subject_id=a,
             region=region, score="inf", risk="HIGH", packs="0", lines="12", summary="异常机构"),
        dict(lead_id=unique("p"), model="SWAP", model_version="1", subject_kind="SITE", subject_id=b,
             region=region, score="3", risk="LOW", packs="3", lines="3", summary="串换"),
        dict(lead_id=unique("p"), model="SWAP", model_version="1", subject_kind="SITE", subject_id=c,
             region=region, score="5", risk="MEDIUM", packs="4", lines="4", summary="串换"),
        dict(lead_id=unique("p"), model="SWAP", model_version="1", subject_kind="PERSON", subject_id="x",
             region=region, score="1", risk="LOW", packs="1", lines="1", summary="bad kind"),
    ]
    path = tmp_path / "leads.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    rep = import_engine(str(path))  # all or nothing: the PERSON row refuses the file
    assert rep.refused and rep.leads_created == 0 and [(p.line, p.field) for p in rep.problems] == [(5, "subject_kind")]
    pq.write_table(pa.Table.from_pylist(rows[:3]), path)
    rep = import_engine(str(path))
    assert rep.leads_created == 3 and not rep.problems
    assert import_engine(str(path)).unchanged == 3
    http_c = http(sup)

    def refs(query):
        body = http_c.get(f"/?region={region}&{query}").content.decode()
        return [s for s in (a, b, c) if s in body], body

    assert refs("model=SWAP")[0] == [b, c]
    assert refs("risk=HIGH")[0] == [a]
    assert refs("source=MODEL&status=NEW")[0] == [a, b, c]
    assert refs("status=CLOSED")[0] == []
    _, body = refs("sort=risk")
    assert body.index(a) < body.index(c) < body.index(b)  # HIGH, MEDIUM, LOW
    _, body = refs("sort=score")
    assert body.index(a) < body.index(c) < body.index(b)  # +inf first
    assert http_c.get(f"/leads/{_lead_of(a).ref}/").status_code == 200
