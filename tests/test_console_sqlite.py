"""`tracecode console` with nothing else installed: SQLite in its data directory, migrations
applied at start, a user made from the CLI, a login through the real HTTP server with CSRF."""
from __future__ import annotations

import http.cookiejar
import os
import re
import signal
import subprocess
import sys
import time
import urllib.parse
import urllib.request

from tracecode.server.store import free_port


def test_console_starts_on_sqlite(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACECODE_CONSOLE_", "DJANGO_"))}
    env["TRACECODE_CONSOLE_DATA_DIR"] = str(tmp_path / "data")
    pw = tmp_path / "pw"
    pw.write_text("a-long-enough-password\n")
    cli = [sys.executable, "-m", "tracecode.cli", "console"]
    out = subprocess.run([*cli, "user", "chief", "--role", "supervisor", "--password-file", str(pw)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "data" / "console.sqlite3").exists()
    port = free_port()
    proc = subprocess.Popen([*cli, "--listen", f"127.0.0.1:{port}"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        jar = http.cookiejar.CookieJar()
        opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
        deadline = time.monotonic() + 60
        while True:
            try:
                page = opener.open(base + "/login/", timeout=2).read().decode()
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read() if proc.poll() else "timeout"
                time.sleep(0.2)
        token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
        # Without the CSRF token the login is refused.
        try:
            opener.open(urllib.request.Request(base + "/login/", data=b"username=chief&password=x", method="POST"))
            raise AssertionError("POST without CSRF token accepted")
        except urllib.error.HTTPError as exc:
            assert exc.code == 403
        body = urllib.parse.urlencode({"username": "chief", "password": "a-long-enough-password",
                                       "csrfmiddlewaretoken": token}).encode()
        req = urllib.request.Request(base + "/login/", data=body, method="POST", headers={"Referer": base + "/login/"})
        listing = opener.open(req, timeout=5).read().decode()
        assert "线索列表" in listing and "chief（审核人）" in listing
        css = opener.open(base + "/static/ledger/console.css", timeout=5)
        assert css.status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def test_committed_migrations_match_the_models(tmp_path):
    """makemigrations finds nothing to do, whatever the hash seed (sets ordered differently)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRACECODE_CONSOLE_", "DJANGO_"))}
    env["TRACECODE_CONSOLE_DATA_DIR"] = str(tmp_path / "data")
    for seed in ("1", "2"):
        out = subprocess.run([sys.executable, "-m", "tracecode.console.cli", "manage", "makemigrations", "--check",
                              "--dry-run", "ledger"], env={**env, "PYTHONHASHSEED": seed}, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
