"""The precedence of verdicts is written once (rules/verdicts.py) and rendered where it runs:
reordered in a copy of the tree, both the verdicts verify.lua gives over real Redis and those the
leads engine's SQL gives change with it; and no other source file lists it."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest

from tracecode.rules.verdicts import PRECEDENCE

from test_architecture import ROOT, _assemble

# A pack first sold at A, then billed at B under another product: it fails both DUPLICATE and
# PRODUCT_MISMATCH, and the precedence alone decides which it is.
PROBE = textwrap.dedent('''
    import csv, json, os, sys
    from tracecode.leads.run import Options, run
    from tracecode.server.app import make_store
    from tracecode.server.config import Config
    from tracecode.server.store import now_ms
    from tracecode.server.verifier import Line, Verifier

    url, prefix, out = sys.argv[1], sys.argv[2], sys.argv[3]
    code = "81234560000000424241"
    config = Config(key_prefix=prefix, code_buckets=1, redis_cluster=sys.argv[4] == "1")
    store = make_store(config, url)
    store.upsert_issuance([(code, "P1", "", "B", 20991231, 1, "Demo", "")], replace=False)
    v = Verifier(store, config)
    v.dispense("SITE-A", "S1", now_ms(), [Line(code, "P1")])
    lua = v.dispense("SITE-B", "S2", now_ms(), [Line(code, "P2")]).results[0].verdict
    store.close()

    with open(os.path.join(out, "iss.csv"), "w", newline="") as fh:
        w = csv.writer(fh); w.writerow(["code", "product_id", "expiry", "pack_units"]); w.writerow([code, "P1", "2099-12-31", 1])
    with open(os.path.join(out, "s.csv"), "w", newline="") as fh:
        w = csv.writer(fh); w.writerow(["site_id", "settlement_id", "settled_at", "line_no", "code", "product_id", "units"])
        w.writerow(["SITE-A", "S1", "2024-05-06T10:00:00+08:00", 1, code, "P1", 0])
        w.writerow(["SITE-B", "S2", "2024-05-07T10:00:00+08:00", 1, code, "P2", 0])
    run(Options(files=[os.path.join(out, "s.csv")], issuance=[os.path.join(out, "iss.csv")], out=os.path.join(out, "o"),
                lines_out=True, progress=False))
    with open(os.path.join(out, "o", "lines.csv")) as fh:
        sql = [r["verdict"] for r in csv.DictReader(fh)]
    print(json.dumps({"lua": lua, "sql": sql}))
''')


def _probe(tree: str, redis_server, prefix: str, tmp) -> dict:
    import json
    env = dict(os.environ, PYTHONPATH=tree, TRACECODE_NO_EXTENSIONS="1")  # the copy has no compiled twins
    out = subprocess.run([sys.executable, "-c", PROBE, redis_server.url, prefix, str(tmp),
                          "1" if redis_server.cluster else "0"], cwd=tree, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.backend_independent
def test_reordering_the_precedence_changes_the_lua_and_the_sql_verdicts(tmp_path, redis_server, config):
    as_is = _assemble(str(tmp_path / "as-is"))
    swapped = _assemble(str(tmp_path / "swapped"))
    path = os.path.join(swapped, "tracecode", "rules", "verdicts.py")
    text = open(path, encoding="utf-8").read()
    a, b = '    "DUPLICATE",\n', '    "PRODUCT_MISMATCH",\n'
    assert text.count(a) == 1 and text.count(b) == 1
    text = text.replace(a, "@@").replace(b, a).replace("@@", b)
    open(path, "w", encoding="utf-8").write(text)
    (tmp_path / "w1").mkdir()
    (tmp_path / "w2").mkdir()

    before = _probe(as_is, redis_server, f"{config.key_prefix}pa", tmp_path / "w1")
    after = _probe(swapped, redis_server, f"{config.key_prefix}pb", tmp_path / "w2")
    assert before == {"lua": "DUPLICATE", "sql": ["OK", "DUPLICATE"]}
    assert after == {"lua": "PRODUCT_MISMATCH", "sql": ["OK", "PRODUCT_MISMATCH"]}


def _ordered_lists(path: str, names: set[str]) -> list[int]:
    """Line numbers of order-bearing lists of three or more verdict names in a source file: a
    Python tuple or list of them, a SQL CASE naming them in THEN branches (inside a Python
    string), a Lua table constructor of them. Mappings keyed by verdict carry no order."""
    import ast
    text = open(path, encoding="utf-8").read()
    found = []
    then = re.compile(r"THEN\s+'(%s)'" % "|".join(map(re.escape, names)))
    if path.endswith(".py"):
        for n in ast.walk(ast.parse(text)):
            if isinstance(n, (ast.Tuple, ast.List)):
                if sum(isinstance(e, ast.Constant) and e.value in names for e in n.elts) >= 3:
                    found.append(n.lineno)
            elif isinstance(n, ast.Constant) and isinstance(n.value, str) and len(then.findall(n.value)) >= 3:
                found.append(n.lineno)
    else:
        for m in re.finditer(r"\{[^{}]*\}", text):
            if len(re.findall(r"'(%s)'" % "|".join(map(re.escape, names)), m.group(0))) >= 3:
                found.append(text.count("\n", 0, m.start()) + 1)
    return found


def test_no_other_source_file_lists_the_precedence():
    """rules/verdicts.py is the one list; every other file names verdicts in mappings or single
    conditions only (the rendered Lua copies, generated from it, are left out)."""
    names = set(PRECEDENCE) | {"OK"}
    offenders = []
    for folder in ("server", "ext", "clients", "rules", "leads", "console", "proto/tracecode"):
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            if root.endswith(os.path.join("lua", "rendered")):
                continue
            for f in files:
                path = os.path.join(root, f)
                if not f.endswith((".py", ".lua")) or "_pb2" in f or path.endswith(os.path.join("rules", "verdicts.py")):
                    continue
                offenders += [f"{os.path.relpath(path, ROOT)}:{n}" for n in _ordered_lists(path, names)]
    assert not offenders, "\n".join(offenders)
