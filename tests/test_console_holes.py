"""Issue 23, the console's holes, as reproductions: bad numbers and malformed files refused
before anything is written (a page naming file, line and field, never a 500), pages that render
whatever is stored, formulas neutralised in what the console writes, history append-only on
SQLite too, concurrent approvals on SQLite, login throttling, password rules, file modes, no
foreign redirect, the auditor's POSTs, insured ids checked before they become pseudonyms.

In-process tests run on the suite's PostgreSQL (console_support); the SQLite ones run the console
in a child process (Django's settings are per process) on a data directory of their own."""
from __future__ import annotations

import csv
from http.cookiejar import CookieJar
import io
import json
import os
import re
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import date

import pytest
from console_support import http, make_user, unique

from tracecode.server.store import free_port

VALID_ID = "11010519491231002X"                   # GB 11643 check character X
FULL_WIDTH = "１１０１０５ １９４９１２３１\u200b００２ｘ"  # the same person as typed on a full-width keyboard
BAD_CHECK = "110105194912310021"                 # wrong check character
AMOUNT_MAX = "99999999999999.99"                 # Lead.amount: max_digits 16, decimal_places 2


def _csv(rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode("utf-8")


def _lead_row(subject, **over):
    row = {"lead_id": unique("L"), "model": "RESALE_BUYER", "model_version": "1", "subject_kind": "SITE",
           "subject_id": subject, "region": "R1", "score": "3", "risk": "HIGH", "packs": "1", "lines": "2",
           "amount": "12.50", "summary": "s", "window_start": "", "window_end": ""}
    row.update(over)
    return row


def _post_file(user, kind, name, data, **fields):
    return http(user).post("/import/", {"kind": kind, "file" if kind != "engine" else "leads": _named(name, data),
                                        **fields}, follow=True)


def _named(name, data):
    from django.core.files.uploadedfile import SimpleUploadedFile
    return SimpleUploadedFile(name, data)


def _page(r) -> str:
    assert r.status_code == 200, r.status_code
    import html
    return html.unescape(r.content.decode())


# --- 5, 6: imports validated before anything is written -----------------------------------


@pytest.mark.parametrize("field,value,expect", [
    ("amount", "1e20", "amount"),
    ("amount", "Infinity", "amount"),
    ("amount", "NaN", "amount"),
    ("amount", "12.345", "amount"),
    ("score", "nan", "score"),
    ("packs", "99999999999", "packs"),
    ("lines", "-1", "lines"),
    ("model", "M" * 60, "model"),
    ("region", "R" * 40, "region"),
    ("window_start", "yesterday", "window_start"),
    ("subject_id", "S\x00X", "subject_id"),
])
def test_a_bad_value_refuses_the_whole_leads_file(console_env, field, value, expect):
    from tracecode.console.ledger.models import Lead
    sup = make_user("supervisor")
    good, bad = unique("SG"), unique("SB")
    data = _csv([_lead_row(good), _lead_row(bad, **{field: value})])
    body = _page(_post_file(sup, "engine", "leads.csv", data))
    assert f"leads.csv:3: {expect}:" in body, body[-2000:]
    assert "未导入" in body  # nothing imported: the good row neither
    assert not Lead.objects.filter(subject_id__in=[good, bad]).exists()


def test_an_over_long_field_after_a_good_row_commits_nothing(console_env):
    from tracecode.console.ledger.models import Lead
    sup = make_user("supervisor")
    good = unique("SG")
    data = _csv([_lead_row(good), _lead_row(unique("SB"), summary="x" * 140_000)])
    body = _page(_post_file(sup, "engine", "leads.csv", data))
    assert "leads.csv:3: summary:" in body
    assert not Lead.objects.filter(subject_id=good).exists()


def test_files_that_are_not_what_they_say_answer_a_page(console_env):
    from tracecode.console.ledger.models import Batch
    sup = make_user("supervisor")
    garbage = b"PK\x03\x04 this is not a workbook" + os.urandom(200)
    body = _page(_post_file(sup, "engine", "leads.xlsx", garbage))
    assert "leads.xlsx: file:" in body and "XLSX" in body
    body = _page(_post_file(sup, "engine", "leads.parquet", garbage))
    assert "leads.parquet: file:" in body
    number = unique("B")
    body = _page(_post_file(sup, "batch", "batch.xlsx", garbage, source="NATIONAL", number=number,
                            received_on="2024-05-08"))
    assert "batch.xlsx: file:" in body
    assert not Batch.objects.filter(number=number).exists()
    body = _page(_post_file(sup, "sites", "sites.xlsx", garbage))
    assert "sites.xlsx: file:" in body
    body = _page(_post_file(sup, "sites", "sites.csv", b"site_id,region\nS1,R1\nS2,\xff\xfeR\n"))
    assert "sites.csv:3:" in body


def test_a_failed_batch_leaves_no_batch_record(console_env):
    from tracecode.console.ledger.models import Batch, Lead
    sup = make_user("supervisor")
    number, site = unique("B"), unique("S")
    bad = _csv([{"机构编码": site, "线索描述": "ok"}, {"机构编码": "S" * 70, "线索描述": "too long"}])
    body = _page(_post_file(sup, "batch", "batch.csv", bad, source="NATIONAL", number=number, received_on="2024-05-08"))
    assert "batch.csv:3: subject_id:" in body
    assert not Batch.objects.filter(number=number).exists() and not Lead.objects.filter(subject_id=site).exists()
    good = _csv([{"机构编码": site, "线索描述": "ok"}])
    body = _page(_post_file(sup, "batch", "batch.csv", good, source="NATIONAL", number=number, received_on="2024-05-09"))
    assert "新建线索 1 条" in body
    assert Batch.objects.get(number=number).received_on == date(2024, 5, 9)


def test_import_caps_are_settings(console_env):
    from django.test import override_settings
    from openpyxl import Workbook

    from tracecode.console.ledger.models import Batch
    sup = make_user("supervisor")
    wb = Workbook()
    wb.active.append(["机构编码", "线索描述"])
    for i in range(6):
        wb.active.append([unique("S"), f"row {i}"])
    buf = io.BytesIO()
    wb.save(buf)
    number = unique("B")
    with override_settings(TRACECODE_IMPORT_MAX_ROWS=5):
        body = _page(_post_file(sup, "batch", "big.xlsx", buf.getvalue(), source="NATIONAL", number=number,
                                received_on="2024-05-08"))
    assert "big.xlsx: file: more than 5 rows" in body
    assert not Batch.objects.filter(number=number).exists()
    # The default cap: the probe's 3,000-row batch (10 s in one request) is refused at once.
    wb = Workbook()
    wb.active.append(["机构编码", "线索描述"])
    for i in range(3000):
        wb.active.append([f"S{i}", f"row {i}"])
    buf = io.BytesIO()
    wb.save(buf)
    started = time.monotonic()
    body = _page(_post_file(sup, "batch", "big.xlsx", buf.getvalue(), source="NATIONAL", number=number,
                            received_on="2024-05-08"))
    assert "big.xlsx: file: more than 1000 rows (TRACECODE_IMPORT_MAX_ROWS)" in body
    assert time.monotonic() - started < 5 and not Batch.objects.filter(number=number).exists()
    with override_settings(TRACECODE_IMPORT_MAX_BYTES=1000):
        body = _page(_post_file(sup, "sites", "sites.csv", b"site_id,region\n" + b"S1,R1\n" * 400))
    assert "sites.csv: file:" in body and "at most 1000" in body


def test_pages_answer_200_with_an_amount_at_the_columns_maximum_on_postgresql(console_env):
    sup, aud = make_user("supervisor"), make_user("auditor")
    site = unique("SMAX")
    body = _page(_post_file(sup, "engine", "leads.csv", _csv([_lead_row(site, amount=AMOUNT_MAX)])))
    assert "新建线索 1 条" in body
    from tracecode.console.ledger.models import Lead
    lead = Lead.objects.get(subject_id=site)
    for user in (sup, aud):
        for url in ("/", "/?sort=amount", f"/leads/{lead.ref}/",
                    "/?batch=99999999999999999999999&subject=%00&region=a%00b&status=X&sort=X"):
            assert http(user).get(url).status_code == 200, url


# --- SQLite, in a child process ------------------------------------------------------------

PRELUDE = """
import json, os, sys
os.environ["DJANGO_SETTINGS_MODULE"] = "tracecode.console.settings"
import django
django.setup()
from django.core.management import call_command
call_command("migrate", interactive=False, verbosity=0)
from django.db import connection, transaction
from django.test import Client
from tracecode.console.ledger.roles import make_user
result = {}
def client(user):
    c = Client(HTTP_HOST="127.0.0.1", raise_request_exception=False)
    c.force_login(user)
    return c
"""


def _sqlite_env(data_dir) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACECODE_CONSOLE_", "DJANGO_", "TRACECODE_PSEUDONYM"))}
    env["TRACECODE_CONSOLE_DATA_DIR"] = str(data_dir)
    env["TRACECODE_CONSOLE_SERVER"] = f"127.0.0.1:{free_port()}"  # nothing there: calls stay owed
    return env


def _on_sqlite(data_dir, body: str) -> dict:
    script = PRELUDE + textwrap.dedent(body) + "\nprint('RESULT ' + json.dumps(result))\n"
    out = subprocess.run([sys.executable, "-c", script], env=_sqlite_env(data_dir), capture_output=True, text=True,
                         timeout=180)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-5000:]
    line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def test_pages_answer_200_whatever_amount_is_stored_on_sqlite(tmp_path):
    got = _on_sqlite(tmp_path / "data", f"""
        from tracecode.console.ledger.intake import import_engine
        from tracecode.console.ledger.models import Lead
        sup = make_user("chief", "a-long-enough-password", "supervisor")
        aud = make_user("audit", "a-long-enough-password", "auditor")
        rows = "lead_id,model,subject_kind,subject_id,amount\\nL1,M,SITE,SMAX,{AMOUNT_MAX}\\nL2,M,SITE,SBIG,1\\n"
        open("/tmp/{tmp_path.name}-leads.csv", "w").write(rows)
        rep = import_engine("/tmp/{tmp_path.name}-leads.csv")
        result["problems"] = [str(p) for p in rep.problems]
        big = Lead.objects.get(subject_id="SBIG")
        # A value stored before imports were checked (the probe's 1e20) must not break a page either.
        with connection.cursor() as cur:
            cur.execute("UPDATE ledger_lead SET amount = 1e20, score = 1e308 WHERE id = %s", [big.pk])
        result["pages"] = {{}}
        for name, user in (("sup", sup), ("aud", aud)):
            for url in ("/", "/?sort=amount", "/leads/" + Lead.objects.get(subject_id="SMAX").ref + "/",
                        "/leads/" + big.ref + "/", "/?batch=99999999999999999999999&status=X&sort=X&risk=%00"):
                result["pages"][name + " " + url] = client(user).get(url).status_code
    """)
    os.unlink(f"/tmp/{tmp_path.name}-leads.csv")
    assert got["problems"] == []
    assert set(got["pages"].values()) == {200}, got["pages"]


def test_history_and_snapshots_are_append_only_on_sqlite(tmp_path):
    got = _on_sqlite(tmp_path / "data", """
        from datetime import date
        from django.db import DatabaseError
        from tracecode.console.ledger.intake import ImportReport, LeadFacts, arrive
        from tracecode.console.ledger.models import Entry, ReportSnapshot
        from tracecode.console.ledger.rules import Source
        lead = arrive(LeadFacts(Source.MODEL, "M", "SITE", "S1"), "T:S1", [], ImportReport())
        snap = ReportSnapshot.objects.create(region="R", week_start=date(2024, 5, 6), content="{}", sha256="0" * 64,
                                             submitted_by="x")
        e = Entry.objects.filter(lead=lead).first()
        result["refused"] = []
        for name, qs, change in (("entry update", Entry.objects.filter(pk=e.pk), {"reason": "x"}),
                                 ("entry delete", Entry.objects.filter(pk=e.pk), None),
                                 ("snapshot update", ReportSnapshot.objects.filter(pk=snap.pk), {"sha256": "1" * 64}),
                                 ("snapshot delete", ReportSnapshot.objects.filter(pk=snap.pk), None)):
            try:
                with transaction.atomic():
                    qs.update(**change) if change else qs.delete()
            except DatabaseError as exc:
                if "append-only" in str(exc):
                    result["refused"].append(name)
        result["entry"] = Entry.objects.get(pk=e.pk).reason
        result["snapshot"] = ReportSnapshot.objects.get(pk=snap.pk).sha256
        # A snapshot whose content does not match its hash (tampered) is a page, not a 500.
        sup = make_user("chief", "a-long-enough-password", "supervisor")
        r = client(sup).get(f"/reports/snapshots/{snap.pk}.xlsx")
        result["tampered"] = r.status_code
        result["weekly"] = client(sup).get("/reports/weekly/?region=R&week=2024-05-06").status_code
    """)
    assert got["refused"] == ["entry update", "entry delete", "snapshot update", "snapshot delete"]
    assert got["entry"] != "x" and got["snapshot"] == "0" * 64
    assert got["tampered"] == 409 and got["weekly"] == 200


def test_history_and_snapshots_are_append_only_on_postgresql(console_env, tmp_path):
    from django.db import DatabaseError, transaction

    from tracecode.console.ledger.intake import ImportReport, LeadFacts, arrive
    from tracecode.console.ledger.models import Entry, ReportSnapshot
    from tracecode.console.ledger.rules import Source
    site = unique("S")
    lead = arrive(LeadFacts(Source.MODEL, "M", "SITE", site), f"T:{site}", [], ImportReport())
    region = unique("R")
    snap = ReportSnapshot.objects.create(region=region, week_start=date(2024, 5, 6), content="{}",
                                         sha256="0" * 64, submitted_by="x")
    e = Entry.objects.filter(lead=lead).first()
    for qs, change in ((Entry.objects.filter(pk=e.pk), {"reason": "x"}), (Entry.objects.filter(pk=e.pk), None),
                       (ReportSnapshot.objects.filter(pk=snap.pk), {"sha256": "1" * 64}),
                       (ReportSnapshot.objects.filter(pk=snap.pk), None)):
        with pytest.raises(DatabaseError, match="append-only"):
            with transaction.atomic():
                qs.update(**change) if change else qs.delete()
    sup = make_user("supervisor")
    r = http(sup).get(f"/reports/snapshots/{snap.pk}.xlsx")
    assert r.status_code == 409 and "SHA-256" in r.content.decode()
    page = _page(http(sup).get(f"/reports/weekly/?region={region}&week=2024-05-06"))
    assert "与其 SHA-256 不符" in page


# --- 7: formulas neutralised in what the console writes ------------------------------------


def _cells(data: bytes):
    from openpyxl import load_workbook
    wb = load_workbook(io.BytesIO(data))
    return [c for ws in wb.worksheets for row in ws.iter_rows() for c in row if c.value is not None]


@pytest.mark.parametrize("writer", ["weekly.xlsx", "snapshot.xlsx"])
def test_spreadsheets_hold_no_formula_from_user_data(console_env, writer):
    """One test per writer: the live weekly report and a submitted snapshot's workbook."""
    sup = make_user("supervisor")
    region = unique("R")
    evil = '=HYPERLINK("http://evil.example/","x")'
    data = _csv([{"机构编码": unique("S"), "线索描述": "=1+1", "统筹区": region}])
    body = _page(_post_file(sup, "batch", "b.csv", data, source="NATIONAL", number=evil + unique("n"),
                            received_on="2024-12-03"))
    assert "新建线索 1 条" in body
    c = http(sup)
    url = f"/reports/weekly.xlsx?region={region}&week=2024-12-03"
    if writer == "snapshot.xlsx":
        c.post("/reports/weekly/submit", {"region": region, "week": "2024-12-03"})
        from tracecode.console.ledger.models import ReportSnapshot
        url = f"/reports/snapshots/{ReportSnapshot.objects.get(region=region).pk}.xlsx"
    r = c.get(url)
    assert r.status_code == 200
    cells = _cells(r.content)
    assert not [x.coordinate for x in cells if x.data_type == "f" or str(x.value).startswith("=")]
    batch_cells = [x for x in cells if str(x.value).startswith("'" + evil)]
    assert batch_cells and all(x.data_type == "s" for x in batch_cells)
    assert any(isinstance(x.value, (int, float)) and x.data_type == "n" for x in cells)  # numbers stay numbers


# --- 9: concurrent approvals on SQLite, over real HTTP -------------------------------------

SETUP = """
from tracecode.console.ledger import workflow
from tracecode.console.ledger.intake import ImportReport, LeadFacts, arrive
from tracecode.console.ledger.rules import Source, Status
pw = "a-long-enough-password"
sup_a, sup_b = make_user("sup_a", pw, "supervisor"), make_user("sup_b", pw, "supervisor")
ins = make_user("ins", pw, "inspector")
result["requests"] = []
for i in range(10):
    site = f"SITE{i}"
    lead = arrive(LeadFacts(Source.MODEL, "M", "SITE", site), f"T:{site}", [], ImportReport())
    workflow.assign(lead, ins, sup_a)
    lead = workflow.transition(lead, Status.CONFIRMED, ins, "属实", "FRAUD_RESALE")
    req = workflow.propose_sanction(lead, workflow.SanctionProposal("SUSPEND_SERVICE", site, "回流药"), ins)
    result["requests"].append([str(req.request_id), lead.ref])
"""


class Browser:
    """A logged-in session against a live console: cookies, CSRF token, no redirect following
    beyond what urllib does."""

    def __init__(self, base, username, password):
        self.base = base
        self.jar = CookieJar()
        self.opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(self.jar))
        page = self.opener.open(base + "/login/", timeout=10).read().decode()
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        self.post("/login/", {"username": username, "password": password, "csrfmiddlewaretoken": token})

    def token(self):
        return next(c.value for c in self.jar if c.name == "csrftoken")

    def post(self, path, fields):
        fields = {"csrfmiddlewaretoken": self.token(), **fields}
        req = urllib.request.Request(self.base + path, data=urllib.parse.urlencode(fields).encode(), method="POST")
        try:
            with self.opener.open(req, timeout=60) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")


@pytest.fixture(scope="module")
def sqlite_console(tmp_path_factory):
    data = tmp_path_factory.mktemp("sqlite-console") / "data"
    got = _on_sqlite(data, SETUP)
    env = _sqlite_env(data)
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tracecode.console.cli", "serve", "--listen", f"127.0.0.1:{port}",
                             "--threads", "8"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(base + "/login/", timeout=2).read()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() is not None else "timeout"
            time.sleep(0.2)
    try:
        yield base, data, got["requests"], env
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def test_two_supervisors_approving_at_once_on_sqlite(sqlite_console):
    base, data, requests, _ = sqlite_console
    a, b = Browser(base, "sup_a", "a-long-enough-password"), Browser(base, "sup_b", "a-long-enough-password")
    answers: list[tuple[int, str]] = []
    lock = threading.Lock()
    for request_id, _ref in requests:
        gate = threading.Barrier(2)

        def approve(browser, gate, request_id):
            gate.wait()
            got = browser.post(f"/sanctions/{request_id}/approve", {})
            with lock:
                answers.append(got)
        threads = [threading.Thread(target=approve, args=(x, gate, request_id)) for x in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    codes = [code for code, _ in answers]
    assert codes.count(500) == 0 and set(codes) == {200}, codes
    assert sum("已由" in body and "批准" in body for _, body in answers) == len(requests)  # the second: already approved
    db = sqlite3.connect(f"file:{data / 'console.sqlite3'}?mode=ro", uri=True)
    try:
        per = dict(db.execute("SELECT sanction_id, COUNT(*) FROM ledger_action GROUP BY sanction_id").fetchall())
        states = {s for (s,) in db.execute("SELECT state FROM ledger_sanctionrequest")}
    finally:
        db.close()
    assert len(per) == len(requests) and set(per.values()) == {1} and states == {"APPROVED"}


def test_data_directory_and_database_files_are_private(sqlite_console):
    base, data, _, _ = sqlite_console
    Browser(base, "ins", "a-long-enough-password")  # a write (session) through the server
    assert stat.S_IMODE(os.stat(data).st_mode) == 0o700
    names = sorted(os.listdir(data))
    assert {"console.sqlite3", "console.sqlite3-wal", "console.sqlite3-shm"} <= set(names), names  # WAL mode
    for name in names:
        assert stat.S_IMODE(os.stat(data / name).st_mode) == 0o600, name


def test_cli_applies_the_password_validators(sqlite_console, tmp_path):
    _, data, _, env = sqlite_console
    pw = tmp_path / "pw"
    for weak in ("1", "password123", "12345678901234"):
        pw.write_text(weak + "\n")
        out = subprocess.run([sys.executable, "-m", "tracecode.console.cli", "user", "weakling", "--role", "inspector",
                              "--password-file", str(pw)], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0 and "password" in out.stderr.lower() and "Traceback" not in out.stderr, out.stderr
    db = sqlite3.connect(f"file:{data / 'console.sqlite3'}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT COUNT(*) FROM auth_user WHERE username = 'weakling'").fetchone() == (0,)
    finally:
        db.close()


def test_cli_imports_refuse_a_bad_file_whole_and_say_where(sqlite_console, tmp_path):
    _, data, _, env = sqlite_console
    bad = tmp_path / "batch.csv"
    bad.write_bytes(_csv([{"机构编码": "CLI-S1", "线索描述": "ok"}, {"机构编码": "CLI-S2", "线索描述": "a\x1bb"}]))
    garbage = tmp_path / "sites.xlsx"
    garbage.write_bytes(b"not a workbook")
    cli = [sys.executable, "-m", "tracecode.console.cli"]
    out = subprocess.run([*cli, "import-batch", str(bad), "--source", "NATIONAL", "--batch", "CLI1", "--date", "2024-05-08"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "nothing imported" in out.stdout
    assert "batch.csv:3: description: character U+001B" in out.stderr and "Traceback" not in out.stderr
    out = subprocess.run([*cli, "import-sites", str(garbage)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "sites.xlsx: file: not an XLSX workbook" in out.stderr and "Traceback" not in out.stderr
    db = sqlite3.connect(f"file:{data / 'console.sqlite3'}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT COUNT(*) FROM ledger_batch WHERE number = 'CLI1'").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM ledger_lead WHERE subject_id LIKE 'CLI-%'").fetchone() == (0,)
    finally:
        db.close()


# --- 10: login throttling, redirects, the auditor --------------------------------------------


def _login(addr, username, password):
    from django.test import Client
    c = Client(HTTP_HOST="127.0.0.1", REMOTE_ADDR=addr)
    r = c.post("/login/", {"username": username, "password": password})
    return r, "_auth_user_id" in c.session


def test_login_is_throttled_per_user_and_per_address(console_env):
    from django.test import override_settings
    with override_settings(TRACECODE_LOGIN_MAX_FAILURES_USER=5, TRACECODE_LOGIN_MAX_FAILURES_ADDRESS=20,
                           TRACECODE_LOGIN_WINDOW_S=600):
        _throttled()


def _throttled():
    from django.test import override_settings
    u, v = make_user("inspector"), make_user("inspector")
    n = next(_addr)
    for _ in range(30):
        assert _login(f"10.{n}.0.1", u.username, "wrong")[1] is False
    r, ok = _login(f"10.{n}.0.1", u.username, u.raw_password)
    assert not ok and "次数过多" in r.content.decode()
    assert _login(f"10.{n}.0.2", u.username, u.raw_password)[1] is False  # the user is locked from anywhere
    assert _login(f"10.{n}.0.3", v.username, v.raw_password)[1] is True   # others are not
    # One address trying many names is locked whatever the name.
    for _ in range(20):
        _login(f"10.{n}.0.4", unique("nobody"), "wrong")
    r, ok = _login(f"10.{n}.0.4", v.username, v.raw_password)
    assert not ok and "次数过多" in r.content.decode()
    assert _login(f"10.{n}.0.5", v.username, v.raw_password)[1] is True
    # The lock ends with its window.
    with override_settings(TRACECODE_LOGIN_WINDOW_S=1):
        time.sleep(1.2)
        assert _login(f"10.{n}.0.1", u.username, u.raw_password)[1] is True


_addr = iter(range(1, 250))


def test_no_redirect_to_a_foreign_referer(console_env):
    sup = make_user("supervisor")
    r = http(sup).get("/reports/weekly.xlsx", HTTP_REFERER="http://evil.example/phish")
    assert r.status_code == 302 and "evil.example" not in r["Location"]
    r = http(sup).get("/reports/weekly.xlsx", HTTP_REFERER="http://127.0.0.1/reports/weekly/")
    assert r.status_code == 302 and r["Location"] == "http://127.0.0.1/reports/weekly/"


def test_every_auditor_post_is_403(console_env):
    aud = make_user("auditor")
    c = http(aud)
    assert c.post("/search/person", {"insured_id": VALID_ID}).status_code == 403
    assert c.post("/import/", {"kind": "sites"}).status_code == 403
    assert c.post("/reports/weekly/submit", {"region": "R", "week": "2024-05-06"}).status_code == 403
    assert 'id="person-search"' not in c.get("/").content.decode()


# --- insured ids: checked before they become pseudonyms --------------------------------------


def test_person_search_normalises_and_checks_the_id(console_env):
    from tracecode.console.ledger.intake import pseudonymizer
    sup = make_user("supervisor")
    pseudonym = pseudonymizer().pseudonym(VALID_ID)
    for typed in (VALID_ID, VALID_ID.lower(), FULL_WIDTH, "110105-19491231-002x"):
        r = http(sup).post("/search/person", {"insured_id": typed})
        assert r.status_code == 302 and r["Location"].endswith(f"?subject={pseudonym}"), typed
    r = http(sup).post("/search/person", {"insured_id": BAD_CHECK}, follow=True)
    body = _page(r)
    assert "check character" in body and BAD_CHECK not in body and "?subject=" not in r.redirect_chain[-1][0]


def test_batch_insured_ids_are_checked_named_by_line_and_never_echoed(console_env):
    from tracecode.console.ledger.intake import pseudonymizer
    from tracecode.console.ledger.models import Batch, Lead
    sup = make_user("supervisor")
    number = unique("B")
    data = _csv([{"参保人证件号": FULL_WIDTH, "线索描述": "多处购药"}, {"参保人证件号": BAD_CHECK, "线索描述": "x"}])
    body = _page(_post_file(sup, "batch", "p.csv", data, source="COMPLAINT", number=number, received_on="2024-05-08"))
    assert "p.csv:3: insured_id:" in body and "check character" in body and BAD_CHECK not in body
    assert not Batch.objects.filter(number=number).exists()
    already = pseudonymizer().pseudonym(unique("G") + "1")
    data = _csv([{"参保人证件号": FULL_WIDTH, "线索描述": "多处购药"}, {"参保人证件号": already, "线索描述": "x"}])
    body = _page(_post_file(sup, "batch", "p.csv", data, source="COMPLAINT", number=number, received_on="2024-05-08"))
    assert "新建线索 2 条" in body
    subjects = set(Lead.objects.filter(batch__number=number).values_list("subject_id", flat=True))
    assert subjects == {pseudonymizer().pseudonym(VALID_ID), already}
    dump = console_env.pg.dump()
    assert VALID_ID not in dump and BAD_CHECK not in dump


def test_a_nul_in_a_reason_is_an_error_not_a_500(console_env):
    from tracecode.console.ledger import workflow
    from tracecode.console.ledger.intake import ImportReport, LeadFacts, arrive
    from tracecode.console.ledger.models import SanctionRequest
    from tracecode.console.ledger.rules import Source, Status
    sup, sup2, ins = make_user("supervisor"), make_user("supervisor"), make_user("inspector")
    site = unique("S")
    lead = arrive(LeadFacts(Source.MODEL, "M", "SITE", site), f"T:{site}", [], ImportReport())
    workflow.assign(lead, ins, sup)
    lead = workflow.transition(lead, Status.CONFIRMED, ins, "属实", "FRAUD_RESALE")
    req = workflow.propose_sanction(lead, workflow.SanctionProposal("BLACKLIST", site, "黑名单"), ins)
    r = http(sup2).post(f"/sanctions/{req.request_id}/reject", {"reason": "a\x00b"}, follow=True)
    assert r.status_code == 200 and "理由" in _page(r)
    assert SanctionRequest.objects.get(pk=req.pk).state == "PROPOSED"
