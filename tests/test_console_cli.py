"""`tracecode console ...` as a dispatcher to the console's Django management commands: every
command is one (so `tracecode console manage NAME` reaches it too), `register(subparsers)` puts
`console` on a top-level parser, and bad input gets a clear message and an exit code, never a
traceback. Real processes on a throwaway SQLite data directory."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

import pytest

from tracecode.console import cli

CLI = [sys.executable, "-m", "tracecode.console.cli"]


@pytest.fixture
def env(tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith(("TRACECODE_CONSOLE_", "DJANGO_"))}
    e["TRACECODE_CONSOLE_DATA_DIR"] = str(tmp_path / "data")
    return e


def run(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=timeout)


def test_every_console_command_is_a_management_command(env):
    out = run(env, "manage", "help")
    assert out.returncode == 0, out.stderr
    for name in cli.COMMANDS:
        if name != "manage":
            assert name.replace("-", "_") in out.stdout, name
    # Each parses its own arguments, under its `tracecode console` name.
    out = run(env, "consume", "-h")
    assert out.returncode == 0 and "usage: tracecode console consume" in out.stdout
    for option in ("--server", "--tls-ca", "--tls-cert", "--tls-key", "--token-file", "--from-start"):
        assert option in out.stdout, option
    assert "--redis-url" not in out.stdout and "--prefix" not in out.stdout


def test_help_and_unknown_commands_answer_without_a_traceback(env):
    out = run(env, "-h")
    assert out.returncode == 0 and all(name in out.stdout for name in cli.COMMANDS)
    out = run(env, "frobnicate")
    assert out.returncode == 2 and "unknown command 'frobnicate'" in out.stderr and "Traceback" not in out.stderr
    out = run(env, "import-batch", "x.csv", "--source", "NATIONAL", "--batch", "B", "--date", "5 May")
    assert out.returncode == 2 and "--date: '5 May' is not a date YYYY-MM-DD" in out.stderr
    assert "Traceback" not in out.stderr
    out = run(env, "user", "someone")  # --role missing: argparse's message, its exit code
    assert out.returncode == 2 and "--role" in out.stderr and "Traceback" not in out.stderr


def test_consume_refuses_a_half_tls_pair_and_a_missing_token_file(env, tmp_path):
    cert = tmp_path / "cert.pem"
    cert.write_text("not really\n")
    out = run(env, "consume", "--server", "127.0.0.1:1", "--tls-cert", str(cert), "--metrics-port", "0")
    assert out.returncode == 2 and "certificate and its key go together" in out.stderr
    assert "Traceback" not in out.stderr
    out = run(env, "consume", "--server", "127.0.0.1:1", "--token-file", str(tmp_path / "none"), "--metrics-port", "0")
    assert out.returncode == 2 and "No such file" in out.stderr and "Traceback" not in out.stderr


def test_consume_from_start_says_when_the_feed_is_away(env):
    from tracecode.server.store import free_port
    out = run(env, "consume", "--server", f"127.0.0.1:{free_port()}", "--from-start", "--metrics-port", "0")
    assert out.returncode == 2 and "replay refused: UNAVAILABLE" in out.stderr and "Traceback" not in out.stderr


def test_register_adds_console_to_a_top_level_parser(env, tmp_path, monkeypatch, capsys):
    parser = argparse.ArgumentParser(prog="tracecode")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    # Everything after `console` is the console's, options included.
    args = parser.parse_args(["console", "user", "chief", "--role", "supervisor", "--password-file", "pw"])
    assert args.command == "console" and args.rest == ["user", "chief", "--role", "supervisor", "--password-file", "pw"]
    args = parser.parse_args(["console", "-h"])
    assert args.func(args) == 0 and "import-leads" in capsys.readouterr().out
    # And through the real top-level command, a user is made (main returns the exit code).
    pw = tmp_path / "pw"
    pw.write_text("a-long-enough-password\n")
    out = subprocess.run([sys.executable, "-m", "tracecode.cli", "console", "user", "chief", "--role",
                          "supervisor", "--password-file", str(pw)], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "user chief: supervisor" in out.stdout, out.stderr
    pw.write_text("1\n")
    out = run(env, "user", "weak", "--role", "inspector", "--password-file", str(pw))
    assert out.returncode == 2 and "password refused" in out.stderr
