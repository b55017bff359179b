"""Generated settlement histories: for the differential test against REPLAY, the model tests
and benchmarks/leads.py. Deterministic for a seed.

`history()` is a noisy history at a given size: resold packs (at other sites and the same
site), products swapped, expired, blocked, unknown and malformed codes, packs scanned in
another form (GS1 raw / Digital Link against a parenthesised issuance), split packs (拆零)
including over-asks, a pack twice in one settlement, and two files that overlap in time with
settlements repeated in both (REPLAY's idempotent replays) and settlement ids reused with other
lines (conflicts).
"""
from __future__ import annotations

import csv
import gzip
import json
import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pyarrow as pa
import pyarrow.parquet as pq

from tracecode import codec
from tracecode.rules.insured import resident_check_char

CST = timezone(timedelta(hours=8))
SETTLEMENT_COLUMNS = ["site_id", "settlement_id", "settled_at", "line_no", "code", "product_id", "units",
                      "insured_id", "amount"]
ISSUANCE_COLUMNS = ["code", "product_id", "expiry", "pack_units", "status"]


@dataclass
class History:
    issuance: list[dict] = field(default_factory=list)
    files: list[list] = field(default_factory=lambda: [[], []])  # settlement rows per file
    sites: list[dict] = field(default_factory=list)


class Codes:
    """Pack codes: 20-digit Chinese codes and GS1 (issued in parentheses, scanned in other forms)."""

    def __init__(self, rnd: random.Random):
        self.rnd, self.n = rnd, 0

    def cn20(self, product7: str) -> str:
        self.n += 1
        return f"{product7}{self.n:09d}{(self.n * 7919) % 10000:04d}"

    def gs1(self) -> tuple[str, list[str]]:
        """(issued form, other scan forms of the same pack)."""
        self.n += 1
        base = f"069{self.n % 10_000_000_000:010d}"
        gtin = base + str(codec.gtin_check_digit(base))
        serial = f"S{self.n:09d}"
        return f"(01){gtin}(21){serial}", [f"]d201{gtin}21{serial}", f"https://id.example.cn/01/{gtin}/21/{serial}"]


def resident_id(rnd: random.Random) -> str:
    """A realistic, valid resident id (居民身份证号): region, birth date, sequence, and the GB 11643
    check character (a lower-case x sometimes, as typed at counters; normalised to X)."""
    region = rnd.choice(("110101", "310104", "440305", "510107", "330106"))
    born = datetime(1940, 1, 1) + timedelta(days=rnd.randrange(80 * 365))
    first17 = f"{region}{born:%Y%m%d}{rnd.randrange(1000):03d}"
    check = resident_check_char(first17)
    return first17 + (check.lower() if check == "X" and rnd.random() < 0.5 else check)


def _at(t: datetime) -> str:
    return t.isoformat()


def history(n_lines: int, seed: int = 1, start: datetime | None = None, noise: float = 1.0) -> History:
    """About n_lines settlement lines over two overlapping files; `noise` scales the rates of
    every irregularity (1.0: a few percent of lines are flagged)."""
    rnd = random.Random(seed)
    codes = Codes(rnd)
    h = History()
    n_sites = max(12, n_lines // 2500)
    sites = [f"S{i:05d}" for i in range(n_sites)]
    regions = [f"R{i:02d}" for i in range(max(1, n_sites // 40))]
    for i, s in enumerate(sites):
        if i % 7:  # some sites are not in the registry
            h.sites.append({"site_id": s, "site_kind": "PHARMACY" if i % 3 else "INSTITUTION",
                            "region": regions[i % len(regions)], "name": f"site {i}"})
    people = [resident_id(rnd) for _ in range(max(20, n_lines // 6))]
    products = [f"8{rnd.randrange(10**6):06d}" for _ in range(max(10, min(400, n_lines // 500)))]
    t0 = start or datetime(2024, 3, 1, 8, 0, tzinfo=CST)
    clock = [t0, t0 + timedelta(minutes=3)]
    sold: list[tuple[str, str, str, int]] = []  # (scan, product, site, pack_units) of dispensed packs
    r = lambda p: rnd.random() < p * noise  # noqa: E731
    lines = 0
    n = 0
    while lines < n_lines:
        n += 1
        fi = n % 2
        clock[fi] += timedelta(seconds=rnd.randint(1, 40))
        site = rnd.choice(sites)
        person = rnd.choice(people) if rnd.random() < 0.9 else ""
        rows = []
        for ln in range(1, rnd.choice((1, 1, 1, 2, 2, 3)) + 1):
            product = rnd.choice(products)
            units = ""
            if r(0.012) and sold:  # a pack sold before, again (usually elsewhere)
                scan, product, _, pu = rnd.choice(sold[-5000:])
            elif r(0.004):
                scan = codes.cn20(product)  # never issued: UNKNOWN
            elif r(0.004):
                scan = rnd.choice(["12345", "8" * 19, "(01)00000000000000(21)X", "]d2019", codes.cn20(product)[:-1] + "A"])
            else:
                pu = 1
                status, expiry = "", ""
                if r(0.02):  # a pack sold in parts
                    pu = rnd.choice((4, 10))
                    units = str(rnd.choice((1, 2, 3, pu)))
                if r(0.003):
                    status = rnd.choice(["RECALLED", "LOCKED", "STOLEN"])
                if r(0.004):
                    expiry = (clock[fi] - timedelta(days=rnd.randint(1, 90))).date().isoformat()
                elif r(0.05):
                    expiry = (clock[fi] + timedelta(days=365)).date().isoformat()
                if r(0.1):
                    issued, scans = codes.gs1()
                    scan = rnd.choice(scans + [issued])
                else:
                    issued = scan = codes.cn20(product)
                h.issuance.append({"code": issued, "product_id": product, "expiry": expiry,
                                   "pack_units": str(pu) if pu > 1 or r(0.1) else "", "status": status})
                sold.append((scan, product, site, pu))
            billed = product
            if r(0.006):  # 串换: billed for another product
                billed = rnd.choice(products)
            if r(0.004):
                units = str(rnd.choice((2, 5, 20)))  # more units than a pack holds, or a part
            rows.append({"site_id": site, "settlement_id": f"T{n:07d}", "settled_at": _at(clock[fi]),
                         "line_no": str(ln), "code": scan, "product_id": billed, "units": units,
                         "insured_id": person, "amount": f"{rnd.randint(100, 20000) / 100:.2f}"})
            # A split pack continued later, at the same site (or another).
            if units and units not in ("", "20") and sold and r(0.3):
                s2, p2, site2, pu2 = sold[-1]
                later = {"site_id": site if rnd.random() < 0.8 else rnd.choice(sites),
                         "settlement_id": f"U{n:07d}", "settled_at": _at(clock[fi] + timedelta(hours=2)),
                         "line_no": "1", "code": s2, "product_id": p2, "units": str(rnd.choice((1, 2, 3))),
                         "insured_id": person, "amount": "1.00"}
                h.files[fi].append(("later", later))
        if r(0.002) and rows:  # the same pack twice in one settlement
            rows.append({**rows[0], "line_no": str(len(rows) + 1)})
        lines += len(rows)
        for row in rows:
            h.files[fi].append(("now", row))
        if r(0.01):  # the settlement also exported in the other file: a replay
            for row in rows:
                h.files[1 - fi].append(("now", dict(row)))
        elif r(0.002):  # its id reused with other lines in the other file: a conflict
            h.files[1 - fi].append(("now", {**rows[0], "code": codes.cn20(rnd.choice(products))}))
    # Keep each file in settled_at order (the spec's input contract), with deferred split lines
    # slotted in by time (stable, so the rows of one settlement stay adjacent).
    for fi in (0, 1):
        h.files[fi] = [row for _, row in sorted(h.files[fi], key=lambda kr: kr[1]["settled_at"])]
    return h


# ------------------------------------------------------------------ writing

def write_csv(path: str, rows: list[dict], columns: list[str]) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, columns, extrasaction="ignore")
        w.writeheader()
        for row in rows:
            w.writerow(row)
    return path


def write_jsonl(path: str, rows: list[dict]) -> str:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def write_parquet(path: str, rows: list[dict], columns: list[str]) -> str:
    pq.write_table(pa.table({c: pa.array([r.get(c, "") for r in rows], pa.string()) for c in columns}), path)
    return path
