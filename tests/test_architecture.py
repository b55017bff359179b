"""The rooms of server/ hold (pyproject.toml [tool.importlinter]): import-linter over the package
as it is installed, once as it is and once with a deliberate violation that must fail; and no
module imports another module's private name."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The design card's folders -> the one `tracecode` tree setup.py installs (package_dir).
TREE = {"": "proto/tracecode", "codec": "ext", "server": "server", "clients": "clients", "rules": "rules"}
for optional in ("leads", "console", "archive"):
    if os.path.isdir(os.path.join(ROOT, optional)):
        TREE[optional] = optional


def _assemble(dest: str) -> str:
    """Copy the Python sources into dest/tracecode as setup.py maps them; return dest."""
    pkg = os.path.join(dest, "tracecode")
    for sub, folder in TREE.items():
        shutil.copytree(os.path.join(ROOT, folder), os.path.join(pkg, sub) if sub else pkg,
                        dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__", "*.c", "*.so", "*.html"))
    return dest


def _lint(tree: str) -> subprocess.CompletedProcess:
    exe = shutil.which("lint-imports") or pytest.fail("lint-imports not installed (the test extra has it)")
    env = dict(os.environ, PYTHONPATH=tree)
    return subprocess.run([exe, os.path.join(ROOT, "pyproject.toml"), "--no-cache"],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return _assemble(str(tmp_path_factory.mktemp("installed")))


def test_import_contracts_hold(tree):
    out = _lint(tree)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 7 kept, 0 broken" in out.stdout, out.stdout


@pytest.mark.parametrize("module,line,contract", [
    ("server/verifier.py", "import redis", "Only the store speaks Redis"),
    ("server/store/keys.py", "import grpc", "Only the API speaks gRPC"),
    ("server/store/store.py", "from tracecode.server import verifier", "Every server module in its layer"),
    ("server/metrics.py", "from tracecode.server import sanctions", "Every server module in its layer"),
    ("server/logs.py", "from tracecode.server import metrics", "Every server module in its layer"),
    ("clients/pos.py", "from tracecode.server import config", "The clients speak to the server over gRPC only"),
    ("console/ledger/packs.py", "from tracecode.server.store import keys",
     "The console and the leads engine stay out of the server's rooms"),
    ("leads/canon.py", "from tracecode.server.api import convert",
     "The console and the leads engine stay out of the server's rooms"),
    ("rules/insured.py", "from tracecode.server import config", "The rules core imports nothing of tracecode"),
    ("codec/wire.py", "from tracecode.server import errors", "The codec stands on the rules core alone"),
    ("archive/dataset.py", "import redis", "Only the store speaks Redis"),
    ("archive/archiver.py", "import grpc", "Only the API speaks gRPC"),
])
def test_a_deliberate_violation_breaks_its_contract(tmp_path, module, line, contract):
    scratch = _assemble(str(tmp_path))
    path = os.path.join(scratch, "tracecode", module)
    with open(path, "a") as fh:
        fh.write(f"\n{line}  # deliberate violation\n")
    out = _lint(scratch)
    assert out.returncode != 0
    assert f"{contract}" in out.stdout and "BROKEN" in out.stdout, out.stdout


# Private *modules* addressed on purpose: the compiled codec and wire module, beside their pure-Python twins.
_PRIVATE_MODULES = {"_codec", "_wire"}
_PRIVATE_IMPORT = re.compile(r"^\s*from\s+(\S+)\s+import\s+\(?([^\n]*)", re.M)


def test_no_module_imports_a_private_name_of_another():
    offenders = []
    for folder in ("server", "ext", "clients", "rules", "proto/tracecode", "benchmarks", "tests",
                   *(f for f in ("leads", "console", "archive") if os.path.isdir(os.path.join(ROOT, f)))):
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py"):
                    continue
                text = open(os.path.join(root, f), encoding="utf-8").read()
                for m in _PRIVATE_IMPORT.finditer(text):
                    names = [n.strip().split(" as ")[0] for n in m.group(2).split(",")]
                    bad = [n for n in names if n.startswith("_") and not n.startswith("__")
                           and n not in _PRIVATE_MODULES]
                    if bad and m.group(1).startswith(("tracecode", ".")):  # ours, not a library's
                        offenders.append(f"{os.path.relpath(os.path.join(root, f), ROOT)}: {m.group(0).strip()}")
    assert not offenders, "\n".join(offenders)


def _tool(name: str) -> str:
    return shutil.which(name) or os.path.join(os.path.dirname(sys.executable), name)


def test_ruff_is_clean():
    out = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_is_clean(tree):
    packages = [a for sub in TREE if sub for a in ("-p", f"tracecode.{sub}")]
    out = subprocess.run([_tool("mypy"), "--config-file", os.path.join(ROOT, "pyproject.toml"), "--no-incremental",
                          *packages], cwd=tree, env=dict(os.environ, MYPYPATH=tree), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr


def test_script_layout_is_one_definition():
    """verify.lua reads its arguments and writes its rows through the spliced layout tables, and
    the Python seam types have the same fields in the same order."""
    from tracecode.server.store.layout import LINE_FIELDS, VERIFY_ARGV, lua_layout
    from tracecode.server.store.store import script_text
    from tracecode.server.store.types import PlanLine, ScriptRow

    assert PlanLine._fields == LINE_FIELDS[:-1]  # the store appends line_index
    text = script_text("verify.lua")
    assert lua_layout() in text and "--@LAYOUT@--" not in text
    # No bare ARGV position or row index is left in the scripts that use the layout.
    body = text.split("local function make_row", 1)[-1]
    assert not re.search(r"ARGV\[\d+\]", body)
    for name in ("verify.lua", "commit.lua"):  # commit.lua rewrites rows verify.lua stored
        assert not re.search(r"\bres\[\d+\]", script_text(name).split("local function make_row", 1)[-1]), name
    assert f"local LINE0, STRIDE = {len(VERIFY_ARGV) + 1}, {len(LINE_FIELDS)}" in text
    assert "make_row(t) return {" + ", ".join(f"t.{f}" for f in ScriptRow._fields) in text


# Library names that are private by spelling but documented API (namedtuple's, Django's _meta,
# argparse's parser internals read by the CLI), and gRPC's server internals the in-process
# settlement benchmark drives (no public way to run a handler through the interceptors).
_LIBRARY_PRIVATE = {"_replace", "_fields", "_asdict", "_make", "_field_defaults", "_meta", "_exit", "_getframe",
                    "_current_frames", "_subparsers", "_group_actions", "_actions", "_HandlerCallDetails", "_state"}


def _defined_private(tree) -> set[str]:
    """The private names a file defines itself: functions, classes, assignment targets (names and
    attributes), annotated fields, arguments, and __slots__ strings."""
    import ast
    out = set()
    for n in ast.walk(tree):
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(n.name)
        elif isinstance(n, ast.Attribute) and isinstance(n.ctx, (ast.Store, ast.Del)):
            out.add(n.attr)
        elif isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
            out.add(n.id)
        elif isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
            out.add(n.target.id)
        elif isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value.isidentifier():
            out.add(n.value)
        elif isinstance(n, ast.arg):
            out.add(n.arg)
    return {x for x in out if x.startswith("_")}


def test_no_module_reaches_into_another_modules_private_attributes():
    """`store._run` from prune.py, `verifier._plan` from a benchmark: an attribute with a private
    name read off anything but self or cls must be one the reading file defines itself."""
    import ast
    offenders = []
    for folder in ("server", "ext", "clients", "rules", "proto/tracecode", "benchmarks", "tests",
                   *(f for f in ("leads", "console", "archive") if os.path.isdir(os.path.join(ROOT, f)))):
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if not f.endswith(".py") or "_pb2" in f:
                    continue
                path = os.path.join(root, f)
                tree = ast.parse(open(path, encoding="utf-8").read())
                own = _defined_private(tree) | _LIBRARY_PRIVATE
                for n in ast.walk(tree):
                    if (isinstance(n, ast.Attribute) and isinstance(n.ctx, ast.Load) and n.attr.startswith("_")
                            and not n.attr.startswith("__") and n.attr not in own
                            and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))):
                        offenders.append(f"{os.path.relpath(path, ROOT)}:{n.lineno}: .{n.attr}")
    assert not offenders, "\n".join(offenders)
