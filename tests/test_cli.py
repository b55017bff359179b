"""The `tracecode` command as users run it (child processes): the demo end to end, and the Lua
scripts exactly as Redis runs them, whose rendered copies the tree keeps for reading."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tracecode.server.cli import RENDERED_DIR, SCRIPTS, rendered

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tracecode(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tracecode.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.backend_independent
def test_the_demo_flags_the_resold_packs_naming_the_first_pharmacy():
    out = tracecode("demo")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "demo passed" in out.stdout and out.stdout.count("DUPLICATE") == 2
    assert "already dispensed at site PHARMACY-A-0001" in out.stdout


@pytest.mark.parametrize("name", SCRIPTS)
def test_the_tree_keeps_each_script_as_redis_runs_it(name):
    """server/store/lua/rendered/ holds what `tracecode scripts render` writes: a changed part
    (a .lua, the schema, the precedence) without a fresh render fails here."""
    with open(os.path.join(ROOT, RENDERED_DIR, name), encoding="utf-8") as fh:
        kept = fh.read()
    assert kept == rendered(name), f"run `tracecode scripts render` and commit {RENDERED_DIR}/{name}"
    assert "--@" not in kept  # every placeholder spliced


def test_scripts_show_prints_the_loaded_text_and_refuses_an_unknown_name():
    out = tracecode("scripts", "show", "verify")
    assert out.returncode == 0 and out.stdout == rendered("verify.lua")
    bad = tracecode("scripts", "show", "nope")
    assert bad.returncode == 2 and "no script 'nope'" in bad.stderr
    listed = tracecode("scripts", "list")
    assert listed.stdout.split() == list(SCRIPTS)


def test_reverify_of_a_missing_file_is_one_line_and_exit_2(tmp_path):
    out = tracecode("reverify", str(tmp_path / "nope.csv"), "--server", "127.0.0.1:1", "--out", str(tmp_path / "r"),
                    "--quiet", timeout=60)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "nope.csv: cannot read the file: no such file" in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
