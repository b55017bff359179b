"""Bytes of Redis memory per issued code and per dispensed code, measured on real records.

    python benchmarks/memory.py [--codes 100000]

Loads issuance records (half 20-digit codes, half GS1 with batch and expiry), dispenses every
code once in single-line settlements through the store (the same Lua calls as the POS path), and
reads INFO memory before/after each phase plus MEMORY USAGE of sample keys.
Writes benchmarks/results/memory.json; docs/scaling.md quotes it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from tracecode import codec  # noqa: E402
from tracecode.server.store.types import SettlementCall  # noqa: E402
from tracecode.server.app import make_store  # noqa: E402
from tracecode.server.config import Config  # noqa: E402
from tracecode.server.verifier import Line, Verifier  # noqa: E402


def used(r) -> int:
    return int(r.info("memory")["used_memory"])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codes", type=int, default=100_000)
    args = ap.parse_args()
    rp = common.start_redis(appendonly=False)
    config = Config(metrics_port=0)
    store = make_store(config, rp.url)
    r = store.r
    try:
        half = args.codes // 2
        cn = common.cn20_codes(half)
        gtin13 = "0690123456789"
        gtin = gtin13 + str(codec.gtin_check_digit(gtin13))
        gs = [f"01{gtin}21SN{i:010d}" for i in range(args.codes - half)]
        base = used(r)
        records = [(c, "8123456", "", "B2401", 20271231, 10, "Demo Pharma Co., Ltd.", "") for c in cn]
        records += [(c, "P-AMOX-500", gtin, "L77", 20271231, 1, "Demo Pharma Co., Ltd.", "") for c in gs]
        for i in range(0, len(records), 2000):
            store.upsert_issuance(records[i:i + 2000], replace=False)
        issued = used(r)
        verifier = Verifier(store, config)
        now = int(time.time() * 1000)
        day = verifier.settle_day(now)
        for n, code in enumerate(cn + gs):
            lines = [Line(code, "8123456" if n < half else "P-AMOX-500")]
            plan, codes, _ = verifier._plan(lines)
            store.verify(SettlementCall(dispense=True, site=f"S{n % 5000:05d}", settlement_id=f"T{n:09d}", settled_at_ms=now,
                         settle_day=day, digest=verifier.digest("s", str(n), now, False, lines),
                         all_or_nothing=False, lines=plan, codes=codes))
        dispensed = used(r)
        sample_cn, sample_gs = cn[0], gs[0]
        usage = {}
        for name, code in (("cn20", sample_cn), ("gs1", sample_gs)):
            i, d, h = store.keys.code_keys(code)
            usage[name] = {"issuance_hash": r.memory_usage(i), "dispense_hash": r.memory_usage(d),
                           "history_list": r.memory_usage(h)}
        usage["settlement_record"] = r.memory_usage(store.keys.settlement("S00000", "T000000000"))
        doc = {
            "benchmark": "Redis memory per issued and per dispensed code",
            "command": f"python benchmarks/memory.py --codes {args.codes}",
            "machine": common.machine(),
            "codes": args.codes,
            "bytes_per_issued_code": round((issued - base) / args.codes, 1),
            "bytes_per_dispensed_code": round((dispensed - issued) / args.codes, 1),
            "dispense_includes": "dispense hash, history list (1 event), settlement record (1 line, results + ledger), "
                                 "audit stream entry, batch index membership",
            "memory_usage_sample_keys": usage,
        }
        print(common.write_results("memory.json", doc))
        print({k: doc[k] for k in ("bytes_per_issued_code", "bytes_per_dispensed_code")}, usage)
        return 0
    finally:
        store.close()
        rp.stop()


if __name__ == "__main__":
    sys.exit(main())
