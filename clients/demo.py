"""`tracecode demo`: the whole path in one command, on a throw-away embedded Redis.

Generates sample issuance records, starts a server, has pharmacy A sell two packs, then shows the
same pack (scanned in another form) flagged as DUPLICATE when pharmacy B settles it.
"""
from __future__ import annotations

import csv
import os
import random
import tempfile

from tracecode import codec
from tracecode.server.config import Config
from tracecode.server.app import Server, make_store
from tracecode.server.store import RedisProcess
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


def run() -> int:
    with tempfile.TemporaryDirectory(prefix="tracecode-demo-") as tmp:
        print(f"codec: {codec.IMPLEMENTATION}")
        redis_proc = RedisProcess(os.path.join(tmp, "redis")).start()
        config = Config(listen="127.0.0.1:0", metrics_port=0)
        store = make_store(config, redis_proc.url)
        server = Server(config, store).start()
        target = f"127.0.0.1:{server.port}"
        try:
            path = os.path.join(tmp, "issuance.csv")
            rows = sample_issuance(path)
            summary = AdminClient(target).upsert(read_rows(path, ISSUANCE_FIELDS), source=path)
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
            server.stop(0)
            store.close()
            redis_proc.stop()
    dup = [r for r in second.results if r.verdict == pb.DUPLICATE]
    ok = all(r.verdict == pb.OK for r in first.results) and len(dup) == 2
    print("\ndemo " + ("passed: the resold packs were flagged with the first pharmacy named" if ok else "FAILED"))
    return 0 if ok else 1
