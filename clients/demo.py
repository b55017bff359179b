"""`tracecode demo`: the whole path in one command, on a throw-away embedded Redis.

Generates sample issuance records, starts `tracecode serve` (a child process with its embedded
Redis in a temporary directory, as an operator would run it), has pharmacy A sell two packs, then
shows the same pack (scanned in another form) flagged as DUPLICATE when pharmacy B settles it.
"""
from __future__ import annotations

import csv
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading

from tracecode import codec
from tracecode.v1 import verification_pb2 as pb

from .admin import AdminClient
from .files import ISSUANCE_FIELDS, read_rows
from .pos import PosClient, line


def sample_issuance(path: str, n: int = 20, seed: int = 7) -> list[dict]:
    """n 20-digit packs of product 8123456 and n GS1 packs of one GTIN, as an issuer uploads them."""
    rnd = random.Random(seed)
    gtin13 = "0690123456789"
    gtin = gtin13 + str(codec.gtin_check_digit(gtin13))
    rows = []
    for i in range(n):
        rows.append({"code": "8123456" + f"{rnd.randrange(10**9):09d}" + f"{rnd.randrange(10**4):04d}",
                     "product_id": "8123456", "batch": "B2401", "expiry": "2027-12-31", "pack_units": 10,
                     "manufacturer": "Demo Pharma"})
        rows.append({"code": f"(01){gtin}(17)271231(10)L77(21)SN{i:06d}", "product_id": "P-AMOX-500",
                     "gtin": gtin, "batch": "L77", "pack_units": 1, "manufacturer": "Demo Pharma"})
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=list(ISSUANCE_FIELDS))
        w.writeheader()
        w.writerows(rows)
    return rows


def _show(title: str, resp) -> None:
    print(f"\n== {title}")
    print(f"   settlement {resp.settlement_id} at {resp.site_id}: {'recorded' if resp.recorded else 'not recorded'}")
    for r in resp.results:
        print(f"   line {r.line_index + 1}: {pb.Verdict.Name(r.verdict):<10} {r.canonical_code}")
        if r.reason:
            print(f"           {r.reason}")


def start_server(data_dir: str, timeout_s: float = 60.0) -> tuple[subprocess.Popen, int]:
    """`tracecode serve` on a free port over an embedded Redis in data_dir; (process, port) once
    it says it listens."""
    proc = subprocess.Popen([sys.executable, "-m", "tracecode.cli", "serve", "--data-dir", data_dir,
                             "--listen", "127.0.0.1:0", "--metrics-port", "0", "--workers", "1",
                             "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    found: list[int] = []
    done = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for out in proc.stdout:
            m = re.match(r"tracecode listening on port (\d+)", out)
            if m:
                found.append(int(m.group(1)))
                break
        done.set()

    threading.Thread(target=read, daemon=True).start()
    if not done.wait(timeout_s) or not found:
        proc.kill()
        err = proc.stderr.read() if proc.stderr else ""
        raise RuntimeError(f"tracecode serve did not start: {err.strip()[-2000:]}")
    return proc, found[0]


def run() -> int:
    with tempfile.TemporaryDirectory(prefix="tracecode-demo-") as tmp:
        print(f"codec: {codec.IMPLEMENTATION}")
        server, port = start_server(os.path.join(tmp, "data"))
        target = f"127.0.0.1:{port}"
        try:
            path = os.path.join(tmp, "issuance.csv")
            rows = sample_issuance(path)
            admin = AdminClient(target)
            try:
                summary = admin.upsert(read_rows(path, ISSUANCE_FIELDS), source=path)
            finally:
                admin.close()
            print(f"loaded issuance records: created={summary.created} rejected={summary.rejected}")

            cn20, gs1 = rows[0]["code"], rows[1]["code"]
            with PosClient(target) as pos:
                first = pos.verify("PHARMACY-A-0001", [line(cn20, "8123456", 3), line(gs1, "P-AMOX-500")],
                                   settlement_id="A-20240506-0001")
                _show("pharmacy A sells 3 units of a split pack and a whole GS1 pack", first)
                # The same physical GS1 pack, scanned raw (]d2 + GS separators) at another pharmacy.
                g = codec.parse(gs1)
                raw = f"]d201{g[2]}17271231\x1d10L77\x1d21{g[3]}"
                second = pos.verify("PHARMACY-B-0420", [line(raw, "P-AMOX-500"), line(cn20, "8123456", 1)],
                                    settlement_id="B-20240506-0917")
                _show("pharmacy B settles the same packs (resold: 回流药)", second)
        finally:
            server.send_signal(signal.SIGTERM)  # drains, then stops its embedded Redis
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
    dup = [r for r in second.results if r.verdict == pb.DUPLICATE]
    ok = all(r.verdict == pb.OK for r in first.results) and len(dup) == 2
    print("\ndemo " + ("passed: the resold packs were flagged with the first pharmacy named" if ok else "FAILED"))
    return 0 if ok else 1
