"""Redis memory per issued and per dispensed code, and Redis CPU per dispensed code, for the
store's key layout (store/keys.py: bucketed hashes with packed values; its version is
keys.LAYOUT). The machinery runs several layouts side by side in one run (lockstep below); this
checkout has one (layout 1 and its migration were removed before the first release), and a new
layout is measured against it by running this file from both trees.

    python benchmarks/memory.py [--codes 1000000] [--out memory.json]

For each layout, on a fresh redis-server with the same configuration (common.start_redis: the
listpack settings of store/embedded.py's LISTPACK_CONFIG, AOF off):
1. issue --codes records (half 20-digit codes, half GS1; several products, lots of --batch-size
   codes each, an expiry per lot) through Store.upsert_issuance in chunks: bytes per issued code
   is the used_memory delta over the codes;
2. dispense half of the codes (shuffled, so each half mixes both kinds) in 5-line settlements,
   then the other half in 1-line settlements, pipelined through Store.verify_batch (the same Lua
   call a POS settlement makes): sites S00000..S04999, an insured pseudonym on most settlements
   (rules/pseudonym.py's format), one phase's used_memory delta over its codes is bytes per
   dispensed code at that settlement size. Every line must come back OK, else the run fails.
   Before each phase CONFIG RESETSTAT: Redis CPU per dispensed code is the phase's evalsha usec
   (INFO commandstats) and the server's used_cpu_user + used_cpu_sys delta, over its codes.
3. a census of the keyspace after each step: keys per kind (the segment after the hash tag:
   i, d, h, s, b, audit, ...) and their MEMORY USAGE (every key of a kind with few keys, a random
   sample of the rest), which attributes the used_memory deltas to kinds of keys.

The layouts' servers run side by side and are driven in turn, one chunk each (lockstep): the
machine is shared, and a busy spell then slows both alike instead of whichever ran at the time.
commandstats usec is elapsed time inside Redis, inflated when the server is descheduled; used_cpu
is the process's CPU. Compare the layouts within one run, not figures of separate runs.

Writes benchmarks/results/memory.json (both layouts, their ratios, the command, the machine);
docs/scaling.md sizes a national cluster from it.

    python benchmarks/memory.py --codes 1000000 --baseline REV

measures another commit's layout in the same run (issue 29: today's layout against the new): the
tree at REV is exported to a temporary directory, built there (pip install --target, its own
Cython codec) and its own benchmarks/memory.py run with the same codes, lots, buckets and seed
AT THE SAME TIME as this checkout's layout, each on its own redis-server: the two share the
machine through the whole run, so a busy spell touches both. Both layouts land in one results
file with their ratios (new / baseline).

    python benchmarks/memory.py --live-state 20000 [--out memory_live.json]

measures instead the live rules' per-person state (rules/live.py, lua/_live.lua): that many
persons, each settling --live-settlements 1-line settlements of one product at as many sites
(the live rules on, the same verify.lua call as a POS settlement), and with --live-resold of
their packs resold elsewhere (RESALE_SOURCE credits): the used_memory delta per person, against
the same settlements with the live rules off, and MEMORY USAGE of the person's keys.

    python benchmarks/memory.py --receipts 200000 [--out memory_receipts.json]

measures the receiving check's state (入库核验, receive.lua): that many issued codes received
in deliveries of 100 packs by 5,000 sites, the used_memory delta per received pack split into
the code's entry (its `rs` field: the receiving site) and the rest (the delivery records, the
audit entries), and the same packs then sold at their receivers: what a receipt adds to a sold
pack's entry.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from tracecode import codec  # noqa: E402
from tracecode.server.app import make_store  # noqa: E402
from tracecode.server.config import Config  # noqa: E402
from tracecode.rules.pseudonym import Pseudonymizer  # noqa: E402
from tracecode.server.store import keys as keyspace  # noqa: E402
from tracecode.server.store.types import SettlementCall  # noqa: E402
from tracecode.server.verifier import Line, Verifier  # noqa: E402

SITES = 5000  # S00000..S04999
INSURED_SHARE = 0.9  # settlements that name an insured person (self-paid sales name none)
PERSONS = 200_000  # distinct insured persons the settlements are drawn from
# Codes per bucket hash that layout 2 is sized for (docs/scaling.md: 200-400, under the listpack
# limit of 512 entries with room for the binomial spread between hashes).
CODES_PER_HASH = 300
CHUNK_ISSUE = 2000
CHUNK_SETTLE = 1000  # settlements per pipelined verify_batch
CENSUS_EXACT = 5000  # kinds with at most this many keys are measured key by key, the rest sampled
CENSUS_SAMPLE = 1000


@dataclass(frozen=True)
class Nation:
    """The national deployment docs/scaling.md sizes, from public figures (assumptions, dated):
    about 3x10^8 traceability codes collected at dispensing a day in late 2025 (cumulative
    1.58x10^10 in January 2025, 4.18x10^10 in June 2025, about 1.01x10^11 by the end of 2025, as
    the press reported NHSA's statements), so about 10^11 dispensed codes a year; every issued
    pack taken as dispensed once in its life (issued = dispensed a year: the upper bound of the
    dispensed share), and a shelf life of about two years, so about 2x10^11 live codes."""
    dispensed_per_day: float = 3e8
    shelf_life_years: float = 2.0  # a code's record is kept until its pack's expiry + the return window
    # Settlement records serve retries and returns only: Config.settlement_ttl_days (its default).
    settlement_ttl_days: int = Config().settlement_ttl_days
    # With `tracecode archive` the streams are trimmed at the archived watermark: what stays is
    # the archiver's lag (an hour's entries, generously), not a per-code cost.
    audit_lag_hours: float = 1.0
    headroom: float = 1.3  # 30 % above the data
    data_per_master_gb: float = 48  # a 64 GB master holding ~48 GB of data

    @property
    def dispensed_per_year(self) -> float:
        return self.dispensed_per_day * 365

    @property
    def issued_per_year(self) -> float:
        return self.dispensed_per_year

    @property
    def live_codes(self) -> float:
        return self.issued_per_year * self.shelf_life_years

    @property
    def live_dispensed(self) -> float:
        """Dispensed codes whose state is still kept: the state lives as long as the code's record
        (a resold pack must be caught until it expires), so at most every live code."""
        return self.live_codes * self.dispensed_per_year / self.issued_per_year


def split_dispensed(run: dict, phase: str) -> dict:
    """A dispensed code's bytes (the used_memory delta of its phase) split into its settlement
    record's share ('s' keys), its audit entry ('audit') and the rest, its dispense state (state,
    history, the layout's other keys). MEMORY USAGE leaves out part of a key's cost (the main
    dict's bucket slot, the expires entry of a key with a TTL): that remainder is shared out in
    proportion to the keys each kind added."""
    p = run[phase]
    per_code = run["census_per_code"][phase]
    measured = sum(v["bytes_per_code"] for v in per_code.values())
    new_keys = sum(max(0, v["keys"]) for v in per_code.values())
    rest = p["bytes_per_dispensed_code"] - measured

    def share(kind: str) -> float:
        v = per_code.get(kind, {"keys": 0, "bytes_per_code": 0.0})
        return v["bytes_per_code"] + (rest * max(0, v["keys"]) / new_keys if new_keys else 0.0)

    record, audit = share("s"), share("audit")
    return {"state": round(p["bytes_per_dispensed_code"] - record - audit, 1),
            "settlement_record": round(record, 1), "audit_entry": round(audit, 1)}


def archived(run: dict, phase: str) -> float:
    """A dispensed code's bytes once its audit entry is archived: its state and its settlement
    record's share."""
    split = split_dispensed(run, phase)
    return round(split["state"] + split["settlement_record"], 1)


def national(run: dict, phase: str, nation: Nation) -> dict:
    """Terabytes of Redis data for the nation from one layout's figures at one settlement size;
    each part of a dispensed code's bytes lives for its own time."""
    split = split_dispensed(run, phase)
    tb = {
        "issued": nation.live_codes * run["bytes_per_issued_code"] / 1e12,
        "dispense_state": nation.live_dispensed * split["state"] / 1e12,
        "settlement_records": nation.dispensed_per_day * nation.settlement_ttl_days * split["settlement_record"] / 1e12,
        "audit_streams": nation.dispensed_per_day * nation.audit_lag_hours / 24 * split["audit_entry"] / 1e12,
    }
    total = sum(tb.values())
    return {"bytes_per_dispensed_code": split, "tb": {k: round(v, 2) for k, v in tb.items()}, "total_tb": round(total, 1),
            "masters": math.ceil(total * 1e12 * nation.headroom / (nation.data_per_master_gb * 1e9))}


def national_section(runs: dict) -> dict:
    """The national figures of every layout at both settlement sizes, and how the newest
    layout's masters move with shelf life and dispense rate."""
    nation = Nation()
    out: dict = {"assumptions": {**asdict(nation), "dispensed_per_year": nation.dispensed_per_year,
                                 "issued_per_year": nation.issued_per_year, "live_codes": nation.live_codes,
                                 "live_dispensed": nation.live_dispensed},
                 **{f"layout_{k}_{phase}": national(v, phase, nation) for k, v in runs.items()
                    for phase in ("dispense_5_lines", "dispense_1_line")}}
    newest = runs[max(runs, key=int)]
    out["masters_by_shelf_life_and_dispense_rate"] = {
        f"{years}y": {f"{per_day:.0e}/day": national(newest, "dispense_5_lines",
                                                     Nation(dispensed_per_day=per_day, shelf_life_years=years))["masters"]
                      for per_day in (1e8, 3e8, 5e8)}
        for years in (1.0, 2.0, 3.0)}
    return out


class Issued(NamedTuple):
    code: str  # canonical code, also the scan sent in a settlement line
    product: str


def layouts_available() -> list[int]:
    """The store layouts this checkout has: one, keys.LAYOUT."""
    return [keyspace.LAYOUT]


def code_buckets_for(codes: int) -> int:
    """Hashes per hash tag so that each holds about CODES_PER_HASH codes (docs/scaling.md)."""
    return max(1, round(codes / (keyspace.BUCKETS * CODES_PER_HASH)))


def make_codes(n: int, batch_size: int, seed: int) -> tuple[list[tuple], list[Issued]]:
    """n issuance records (upsert_issuance's tuples) and the issued codes. Half are 20-digit codes
    of a few products (7-digit product prefixes), half GS1 (GTIN + serial); each lot of
    batch_size codes belongs to one product and has its own batch id and expiry."""
    rnd = random.Random(seed)
    half = n // 2
    records: list[tuple] = []
    issued: list[Issued] = []
    lot = 0

    def lots(count: int):
        nonlocal lot
        for start in range(0, count, batch_size):
            lot += 1
            # Expiry between mid-2027 and end-2028: unexpired at the settlement date of the run.
            y, m = divmod(rnd.randrange(18), 12)
            yield start, min(batch_size, count - start), f"L{2026 - lot % 3}{lot:05d}", (2027 + y) * 10000 + (m + 1) * 100 + 28

    cn_products = [f"8{p:06d}" for p in (123456, 223344, 345678, 456789, 567890)]
    for start, size, batch, expiry in lots(half):
        product = cn_products[(start // batch_size) % len(cn_products)]
        for code in common.cn20_codes(size, seed=seed * 1000 + lot, product=product):
            records.append((code, product, "", batch, expiry, 10, "Demo Pharma Co., Ltd.", ""))
            issued.append(Issued(code, product))
    gtins = []
    for g in ("0690123456789", "0690123456790", "0690123456791", "0690987654321"):
        gtins.append(g + str(codec.gtin_check_digit(g)))
    serial = 0
    for start, size, batch, expiry in lots(n - half):
        gi = (start // batch_size) % len(gtins)
        gtin, product = gtins[gi], f"P-GS1-{gi:02d}"
        for _ in range(size):
            serial += 1
            code = f"01{gtin}21SN{serial:010d}"
            records.append((code, product, gtin, batch, expiry, 1, "Demo Pharma Co., Ltd.", ""))
            issued.append(Issued(code, product))
    return records, issued


def used(r) -> int:
    return int(r.info("memory")["used_memory"])


def server_cpu(r) -> float:
    info = r.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


def kind_of(key: str) -> str:
    """The kind of a key: the segment after its hash tag ('{p}:{tag}:i:code' -> 'i')."""
    close = key.find("}:")
    if close < 0:
        return key.split(":", 1)[0]
    return key[close + 2:].split(":", 1)[0]


def census(r, seed: int) -> dict:
    """Keys per kind and their MEMORY USAGE (measured for small kinds, estimated from a sample
    for large ones), plus the encoding of the sampled keys."""
    by_kind: dict[str, list[str]] = {}
    for key in r.scan_iter(count=10_000):
        by_kind.setdefault(kind_of(key), []).append(key)
    rnd = random.Random(seed)
    out = {}
    for kind, keys in sorted(by_kind.items()):
        sample = keys if len(keys) <= CENSUS_EXACT else rnd.sample(keys, CENSUS_SAMPLE)
        pipe = r.pipeline(transaction=False)
        for k in sample:
            pipe.memory_usage(k, samples=0)
            pipe.object("encoding", k)
        replies = pipe.execute()
        sizes = [int(x or 0) for x in replies[0::2]]
        encodings: dict[str, int] = {}
        for e in replies[1::2]:
            encodings[str(e)] = encodings.get(str(e), 0) + 1
        mean = sum(sizes) / len(sizes)
        out[kind] = {"keys": len(keys), "measured": len(sample), "mean_bytes": round(mean, 1),
                     "bytes": round(mean * len(keys)), "max_bytes": max(sizes), "encodings": encodings}
    return out


def census_delta(before: dict, after: dict, codes: int) -> dict:
    """Per kind, the change in keys and bytes per code of a phase."""
    out = {}
    for kind in sorted(set(before) | set(after)):
        b, a = before.get(kind, {}), after.get(kind, {})
        keys = a.get("keys", 0) - b.get("keys", 0)
        size = a.get("bytes", 0) - b.get("bytes", 0)
        if keys or size:
            out[kind] = {"keys": keys, "bytes_per_code": round(size / codes, 1)}
    return out


def commandstats(r) -> dict:
    return {name.removeprefix("cmdstat_"): {"calls": int(v["calls"]), "usec": int(v["usec"])}
            for name, v in r.info("commandstats").items()}


def settlements(issued: list[Issued], size: int, first: int, verifier: Verifier, pseudo: Pseudonymizer,
                rnd: random.Random, now: int, day: int):
    """SettlementCalls of `size` distinct codes each, as the POS path builds them (Verifier.dispense:
    plan, body digest, the insured pseudonym folded into the digest)."""
    for n, start in enumerate(range(0, len(issued), size), first):
        lines = [Line(c.code, c.product) for c in issued[start:start + size]]
        site = f"S{rnd.randrange(SITES):05d}"
        sid = f"JS{day}{n:010d}"
        at = now + n
        insured = pseudo.pseudonym(f"11010119{rnd.randrange(PERSONS):010d}") if rnd.random() < INSURED_SHARE else ""
        digest = verifier.digest(site, sid, at, False, lines)
        if insured:  # as Verifier.dispense: another person under a used settlement id is another body
            digest = "2." + hashlib.blake2b(f"{digest}\x1f{insured}".encode(), digest_size=16).hexdigest()
        plan, codes, _ = verifier.plan_lines(lines)
        yield SettlementCall(dispense=True, site=site, settlement_id=sid, settled_at_ms=at, settle_day=day,
                             digest=digest, all_or_nothing=False, lines=plan, codes=codes, insured=insured)


def dispense_phase(store, verifier, pseudo, issued: list[Issued], size: int, first: int, seed: int):
    """Dispense `issued` in settlements of `size` lines; returns the phase's memory, Redis CPU and
    verdicts. A generator: it yields after each pipelined chunk, so that lockstep() can run the
    layouts' phases chunk by chunk in turn (see main)."""
    r = store.r
    rnd = random.Random(seed)
    now = int(time.time() * 1000)
    day = verifier.settle_day(now)
    r.config_resetstat()
    mem0, cpu0 = used(r), server_cpu(r)
    busy = 0.0  # this layout's own seconds, not the other layout's turns
    verdicts: dict[str, int] = {}
    count = 0
    chunk: list[SettlementCall] = []

    def flush():
        for res in store.verify_batch(store.prepare_batch(chunk)):
            if isinstance(res, Exception):
                raise res
            for row in res.rows:
                verdicts[row.verdict] = verdicts.get(row.verdict, 0) + 1
        chunk.clear()

    first_call = None
    t0 = time.perf_counter()
    for call in settlements(issued, size, first, verifier, pseudo, rnd, now, day):
        first_call = first_call or call
        chunk.append(call)
        count += 1
        if len(chunk) == CHUNK_SETTLE:
            flush()
            busy += time.perf_counter() - t0
            yield
            t0 = time.perf_counter()
    if chunk:
        flush()
    busy += time.perf_counter() - t0
    cpu = server_cpu(r) - cpu0
    mem = used(r) - mem0
    stats = commandstats(r)
    codes = len(issued)
    script_usec = sum(v["usec"] for k, v in stats.items() if k in ("evalsha", "evalsha_ro", "eval", "eval_ro"))
    return {
        "lines_per_settlement": size, "settlements": count,
        "first_settlement": ({"site": first_call.site, "settlement_id": first_call.settlement_id}
                             if first_call else None),
        "codes": codes, "verdicts": verdicts,
        "seconds": round(busy, 1),
        "used_memory_delta": mem, "bytes_per_dispensed_code": round(mem / codes, 1),
        "redis_script_usec_per_code": round(script_usec / codes, 2),
        "redis_script_usec_per_settlement": round(script_usec / count, 2),
        "redis_server_cpu_usec_per_code": round(cpu * 1e6 / codes, 2),
        "commandstats": stats,
    }


def lockstep(runs: list) -> list:
    """Drive generators in turn, one step each, until all have returned; their return values.
    The machine is shared: in turn, a busy spell slows every layout alike, so their CPU figures
    compare even when the machine's load changes during the run."""
    out: list = [None] * len(runs)
    live = list(range(len(runs)))
    try:
        while live:
            for i in list(live):
                try:
                    next(runs[i])
                except StopIteration as done:
                    out[i] = done.value
                    live.remove(i)
    finally:
        for run in runs:  # one failed: the others' servers are stopped too (their finally)
            run.close()
    return out


def run_layout(layout: int, records: list[tuple], issued: list[Issued], code_buckets: int, seed: int,
               redis_args: list[str]):
    """One layout's whole run on its own fresh redis-server; a generator (yields between chunks,
    see lockstep) returning the layout's figures."""
    rp = common.start_redis(appendonly=False, extra=redis_args)
    config = Config(metrics_port=0, code_buckets=code_buckets)
    store = make_store(config, rp.url)
    r = store.r
    try:
        if layout != keyspace.LAYOUT:
            raise SystemExit(f"asked for store layout {layout}, this checkout has {keyspace.LAYOUT}")
        settings = {"store_layout": layout, "code_buckets": code_buckets,
                    "settlement_ttl_days": config.settlement_ttl_days, "history_max": config.history_max,
                    "audit_max": config.audit_max}
        # What the server runs with (the listpack limits decide layout 2's encoding).
        server = {k: v for k, v in r.config_get("hash-max-listpack-*").items()}
        out: dict = {"layout": layout, "config": settings, "redis_server_config": server}
        c0 = census(r, seed)
        base = used(r)
        t0 = time.perf_counter()
        busy = 0.0
        for i in range(0, len(records), CHUNK_ISSUE):
            store.upsert_issuance(records[i:i + CHUNK_ISSUE], replace=False)
            busy += time.perf_counter() - t0
            yield
            t0 = time.perf_counter()
        out["issue_seconds"] = round(busy, 1)
        issued_mem = used(r)
        out["bytes_per_issued_code"] = round((issued_mem - base) / len(records), 1)
        c1 = census(r, seed)
        out["recall_scan"] = recall_scan(store, records)
        verifier = Verifier(store, config)
        pseudo = Pseudonymizer(hashlib.sha256(b"tracecode memory benchmark").digest(), "k1")
        order = list(issued)
        random.Random(seed).shuffle(order)
        half = len(order) // 2
        five = yield from dispense_phase(store, verifier, pseudo, order[:half], 5, 0, seed + 1)
        c2 = census(r, seed)
        one = yield from dispense_phase(store, verifier, pseudo, order[half:], 1, five["settlements"], seed + 2)
        c3 = census(r, seed)
        for phase in (five, one):
            bad = {v: n for v, n in phase["verdicts"].items() if v != "OK"}
            if bad:
                raise SystemExit(f"layout {layout}, {phase['lines_per_settlement']}-line settlements: "
                                 f"lines not OK {bad}; the benchmark would measure the wrong thing")
        out["dispense_5_lines"], out["dispense_1_line"] = five, one
        out["dbsize"] = r.dbsize()
        out["used_memory"] = used(r)
        mem = r.info("memory")
        out["used_memory_rss"] = int(mem["used_memory_rss"])
        out["mem_fragmentation_ratio"] = float(mem["mem_fragmentation_ratio"])
        out["census_after_dispense"] = c3
        out["census_per_code"] = {"issue": census_delta(c0, c1, len(records)),
                                  "dispense_5_lines": census_delta(c1, c2, five["codes"]),
                                  "dispense_1_line": census_delta(c2, c3, one["codes"])}
        out["sample_keys"] = sample_keys(store, order, [five["first_settlement"], one["first_settlement"]])
        return out
    finally:
        store.close()
        rp.stop()


class Baseline:
    """Another commit's memory.py, built in a temporary tree and run as a subprocess beside this
    checkout's run (see the module docstring)."""

    def __init__(self, rev: str, args):
        self.rev = rev
        self.tmp = tempfile.mkdtemp(prefix="tracecode-baseline-")
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        self.sha = subprocess.run(["git", "-C", root, "rev-parse", rev], check=True, capture_output=True,
                                  text=True).stdout.strip()
        tree, site = os.path.join(self.tmp, "tree"), os.path.join(self.tmp, "site")
        os.makedirs(tree)
        archive = subprocess.run(["git", "-C", root, "archive", self.sha], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tree], input=archive, check=True)
        print(f"baseline {rev} ({self.sha[:10]}): building in {tree} ...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                        "--target", site, tree], check=True)
        self.out = os.path.join(self.tmp, "baseline.json")
        env = {**os.environ, "PYTHONPATH": site}
        cmd = [sys.executable, os.path.join(tree, "benchmarks", "memory.py"), "--codes", str(args.codes),
               "--batch-size", str(args.batch_size), "--code-buckets", str(args.code_buckets or code_buckets_for(args.codes)),
               "--seed", str(args.seed), "--out", self.out]
        if args.redis_args:
            cmd += ["--redis-args", args.redis_args]
        self.proc = subprocess.Popen(cmd, env=env, cwd=tree, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def result(self) -> tuple[int, dict]:
        """(layout, its figures) once the baseline's run has finished."""
        log_text, _ = self.proc.communicate()
        if self.proc.returncode:
            raise SystemExit(f"baseline {self.rev} failed (exit {self.proc.returncode}):\n{log_text[-3000:]}")
        with open(self.out, encoding="utf-8") as fh:
            doc = json.load(fh)
        (layout, run), = doc["layouts"].items()
        run["commit"] = self.sha
        return int(layout), run


def recall_scan(store, records: list[tuple]) -> dict:
    """What a recall costs Redis: the codes of the first lot's batch found by a scan of every tag's
    buckets (store.batch_codes, lua/batch.lua: the layout has no batch index), its evalsha time
    over the codes scanned."""
    r = store.r
    r.config_resetstat()
    product, batch = records[0][1], records[0][3]
    t0 = time.perf_counter()
    found = sum(len(chunk) for chunk in store.batch_codes(product, batch))
    wall = time.perf_counter() - t0
    st = r.info("commandstats").get("cmdstat_evalsha", {"usec": 0, "calls": 0})
    return {"codes_scanned": len(records), "codes_found": found, "calls": st["calls"], "wall_seconds": round(wall, 2),
            "redis_usec_per_code_scanned": round(st["usec"] / len(records), 3)}


def sample_keys(store, order: list[Issued], firsts: list[dict | None]) -> dict:
    """MEMORY USAGE, type and encoding of the keys of two codes (this layout's code_keys) and of
    the first settlement record of each size."""
    r = store.r
    out: dict = {}
    for name, code in (("cn20", next(c for c in order if c.code[0] == "8")),
                       ("gs1", next(c for c in order if c.code.startswith("01")))):
        out[name] = {key: key_facts(r, key) for key in store.keys.code_keys(code.code)}
    for name, first in zip(("settlement_5_lines", "settlement_1_line"), firsts):
        if first:
            key = store.keys.settlement(first["site"], first["settlement_id"])
            out[name] = {key: key_facts(r, key)}
    return out


def key_facts(r, key: str) -> dict:
    kind = r.type(key)
    if kind == "none":
        return {"type": "none"}
    facts = {"type": kind, "bytes": r.memory_usage(key, samples=0), "encoding": r.object("encoding", key)}
    if kind == "hash":
        facts["fields"] = r.hlen(key)
    elif kind == "list":
        facts["length"] = r.llen(key)
    return facts


def ratio(new: float, old: float) -> float | None:
    return round(new / old, 3) if old else None


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--codes", type=int, default=1_000_000, help="issued codes per layout (half dispensed in 5-line, "
                                                                 "half in 1-line settlements)")
    ap.add_argument("--batch-size", type=int, default=50_000,
                    help="codes per lot (batch id and expiry); lot size / 1024 = codes per lot and tag, as nationally")
    ap.add_argument("--code-buckets", type=int, default=0,
                    help=f"layout 2's hashes per hash tag; 0: about {CODES_PER_HASH} codes per hash")
    ap.add_argument("--layouts", default="", help="comma-separated layouts to run (default: every one available)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--redis-args", default="", help="more redis-server arguments for every layout, after LISTPACK_CONFIG "
                                                    "(what-if runs, e.g. '--hash-max-listpack-value 64': Redis's default)")
    ap.add_argument("--out", default=None, help="results file (a name under benchmarks/results/, or a path; default "
                                                "memory.json, memory_live.json with --live-state)")
    ap.add_argument("--renational", action="store_true",
                    help="recompute the national section of an existing results file (--out) from its figures")
    ap.add_argument("--baseline", default="", help="a commit (e.g. main~3) whose layout runs beside this checkout's, "
                                                    "built in a temporary tree")
    ap.add_argument("--live-state", type=int, default=0, help="measure the live rules' state of this many persons instead")
    ap.add_argument("--live-settlements", type=int, default=3, help="--live-state: settlements (sites) per person")
    ap.add_argument("--live-resold", type=int, default=1, help="--live-state: of their packs resold elsewhere")
    ap.add_argument("--receipts", type=int, default=0, help="measure the receiving check's state of this many packs instead")
    args = ap.parse_args()
    if args.receipts:
        args.out = args.out or "memory_receipts.json"
        return receipts_state(args)
    if args.live_state:
        args.out = args.out or "memory_live.json"
        return live_state(args)
    args.out = args.out or "memory.json"
    if args.renational:
        path = os.path.join(common.RESULTS, args.out)  # an absolute --out stays as it is
        with open(path, encoding="utf-8") as fh:
            doc = json.load(fh)
        doc["national"] = national_section({int(k): v for k, v in doc["layouts"].items()})
        print(common.write_results(path, doc))
        return 0
    layouts = [int(x) for x in args.layouts.split(",")] if args.layouts else layouts_available()
    missing = set(layouts) - set(layouts_available())
    if missing:
        raise SystemExit(f"layout(s) {sorted(missing)} not in this checkout (it has {layouts_available()})")
    buckets = args.code_buckets or code_buckets_for(args.codes)
    records, issued = make_codes(args.codes, args.batch_size, args.seed)
    print(f"layouts {layouts}: {args.codes} codes each, in turn chunk by chunk ...", flush=True)
    baseline = Baseline(args.baseline, args) if args.baseline else None
    load = os.getloadavg()[0]
    results = lockstep([run_layout(layout, records, issued, buckets, args.seed, args.redis_args.split())
                        for layout in layouts])
    runs = dict(zip(layouts, results))
    if baseline:
        old_layout, old_run = baseline.result()
        if old_layout in runs:
            raise SystemExit(f"baseline {args.baseline} has layout {old_layout}, the same as this checkout's")
        runs = {old_layout: old_run, **runs}
    # The machine is shared: how busy it was (the layouts ran in turn, so alike).
    load_average = {"start": round(load, 2), "end": round(os.getloadavg()[0], 2)}
    doc: dict = {
        "benchmark": "Redis memory per issued and per dispensed code, and Redis CPU per dispensed code, store layouts side by side",
        "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]),
        "machine": common.machine(),
        "redis_config": common.redis_config() + args.redis_args.split(),
        "codes": args.codes,
        "load_average_1min": load_average,
        "schedule": "the layouts' servers side by side, driven in turn: each issuance chunk and each pipelined chunk "
                    f"of {CHUNK_SETTLE} settlements alternates between them",
        "data": {"kinds": "half 20-digit codes (5 products), half GS1 (4 GTINs)", "batch_size": args.batch_size,
                 "lots": math.ceil(args.codes / 2 / args.batch_size) * 2,
                 "dispensed": "every code once, whole pack: a shuffled half in 5-line settlements, the other half in 1-line",
                 "sites": SITES, "insured_share": INSURED_SHARE, "persons": PERSONS,
                 "settlement_id": "JS<YYYYMMDD><10 digits>"},
        "dispense_includes": "dispense state, history beyond what the layout keeps with it, the settlement record "
                             "(results + ledger), the audit stream entries, the insured pseudonym",
        "layouts": {str(k): v for k, v in runs.items()},
    }
    summary = {str(k): {"bytes_per_issued_code": v["bytes_per_issued_code"],
                        "bytes_per_dispensed_code_5_lines": v["dispense_5_lines"]["bytes_per_dispensed_code"],
                        "bytes_per_dispensed_code_1_line": v["dispense_1_line"]["bytes_per_dispensed_code"],
                        "redis_script_usec_per_code_5_lines": v["dispense_5_lines"]["redis_script_usec_per_code"],
                        "redis_script_usec_per_code_1_line": v["dispense_1_line"]["redis_script_usec_per_code"],
                        "redis_server_cpu_usec_per_code_5_lines": v["dispense_5_lines"]["redis_server_cpu_usec_per_code"],
                        "redis_server_cpu_usec_per_code_1_line": v["dispense_1_line"]["redis_server_cpu_usec_per_code"],
                        "dbsize": v["dbsize"],
                        # With the audit stream archived (tracecode archive trims it): the state and the
                        # settlement record's share, what stays in Redis (issue 29's target).
                        "bytes_per_dispensed_code_5_lines_archived": archived(v, "dispense_5_lines"),
                        "bytes_per_dispensed_code_1_line_archived": archived(v, "dispense_1_line"),
                        } for k, v in runs.items()}
    doc["summary"] = summary
    doc["national"] = national_section(runs)
    ratios = None
    if len(summary) == 2:
        old, new = sorted(summary, key=int)
        ratios = {k: ratio(summary[new][k], summary[old][k]) for k in summary[old]}
        doc[f"ratio_layout{new}_to_layout{old}"] = ratios
    if baseline:
        doc["schedule"] = (f"the baseline ({args.baseline}, built from commit {baseline.sha[:10]} in a temporary tree) and "
                           "this checkout's layout ran at the same time, each on its own redis-server")
    print(common.write_results(args.out, doc))
    print_table(summary, ratios)
    return 0


def _live_run(on: bool, persons: int, per: int, resold: int, seed: int) -> dict:
    """One fresh Redis: every person's settlements (and resales), live rules on or off."""
    from tracecode.rules import live
    rp = common.start_redis(appendonly=False)
    store = make_store(Config(), rp.url)
    verifier = Verifier(store, Config())
    arg = live.load(None).lua_arg(store.keys.prefix, "J") if on else ""
    codes = common.cn20_codes(persons * per, seed=seed, product="8123456")
    common.load_issuance(store, codes)
    r = store.r
    before = used(r)
    at = int(time.time() * 1000)

    def call(site: str, sid: str, code: str, who: str) -> SettlementCall:
        ls = [Line(code, "8123456")]
        plan, distinct, _ = verifier.plan_lines(ls)
        return SettlementCall(dispense=True, site=site, settlement_id=sid, settled_at_ms=at,
                              settle_day=verifier.settle_day(at), all_or_nothing=False, lines=plan, codes=distinct,
                              digest=verifier.digest(site, sid, at, False, ls), insured=who, live=arg)
    try:
        batch = []
        for p in range(persons):
            who = f"k1.{hashlib.sha256(str(p).encode()).hexdigest()[:32]}"
            for k in range(per):
                batch.append(call(f"S{(p + k) % SITES:05d}", f"L{p}-{k}", codes[p * per + k], who))
            for k in range(resold):  # sold again elsewhere (no person): a credit to the first buyer
                batch.append(call(f"R{(p + k) % SITES:05d}", f"R{p}-{k}", codes[p * per + k], ""))
            if len(batch) >= 2000:
                store.verify_batch(batch)
                batch = []
        if batch:
            store.verify_batch(batch)
        delta = used(r) - before
        res: dict = {"used_memory_delta": delta, "bytes_per_person_all": round(delta / persons, 1)}
        if on:
            kinds: dict[str, list[int]] = {}
            for key in r.scan_iter(match=f"{store.keys.prefix}:*:v*", count=1000):
                kinds.setdefault(kind_of(key), []).append(int(r.memory_usage(key, samples=0)))
            res["keys"] = {k: {"count": len(v), "mean_bytes": round(sum(v) / len(v), 1)} for k, v in kinds.items()}
        return res
    finally:
        store.close()
        rp.stop()


def live_state(args) -> int:
    """--live-state: bytes of the live rules' state per person (module docstring)."""
    persons, per, resold = args.live_state, args.live_settlements, args.live_resold
    out = {name: _live_run(name == "on", persons, per, resold, args.seed) for name in ("off", "on")}
    on, off = out["on"], out["off"]
    doc = {"benchmark": "the live rules' per-person state (STOCKPILING, RESALE_SOURCE)",
           "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]), "machine": common.machine(),
           "persons": persons, "settlements_per_person": per, "packs_resold_per_person": resold,
           "runs": out,
           "bytes_per_person": round((on["used_memory_delta"] - off["used_memory_delta"]) / persons, 1)}
    print(common.write_results(args.out, doc))
    print(f"live rules' state: {doc['bytes_per_person']} bytes per person ({per} packs at {per} sites, "
          f"{resold} resold); keys {on.get('keys')}")
    return 0


def _entries_bytes(r, store) -> int:
    """MEMORY USAGE summed over every code bucket hash (the codes' entries)."""
    return sum(int(r.memory_usage(k, samples=0) or 0) for k in r.scan_iter(match=f"{store.keys.prefix}:*:c:*", count=1000))


def receipts_state(args) -> int:
    """--receipts: bytes of the receiving check's state per received pack (module docstring)."""
    from tracecode.server.receiving import DeliveryLine, ReceivingService
    n = args.receipts
    rp = common.start_redis(appendonly=False)
    cfg = Config(code_buckets=code_buckets_for(n))
    store = make_store(cfg, rp.url)
    verifier = Verifier(store, cfg)
    service = ReceivingService(verifier)
    try:
        codes = common.cn20_codes(n, seed=args.seed, product="8123456")
        common.load_issuance(store, codes)
        r = store.r
        base_used, base_entries = used(r), _entries_bytes(r, store)
        per = 100
        for d in range(0, n, per):
            service.receive(f"S{(d // per) % SITES:05d}", f"DN{d}", "华润医药", None,
                            [DeliveryLine(c, "8123456") for c in codes[d:d + per]])
        recv_used, recv_entries = used(r), _entries_bytes(r, store)
        # The same packs sold (1-line settlements) at their receivers, and again over codes never
        # received, to see what the receipt adds to a sold pack's entry.
        at = int(time.time() * 1000)
        batch = []
        for i, c in enumerate(codes):
            ls = [Line(c, "8123456")]
            plan, distinct, _ = verifier.plan_lines(ls)
            site = f"S{(i // per) % SITES:05d}"
            batch.append(SettlementCall(dispense=True, site=site, settlement_id=f"R{i}", settled_at_ms=at,
                                        settle_day=verifier.settle_day(at), all_or_nothing=False, lines=plan,
                                        codes=distinct, digest=verifier.digest(site, f"R{i}", at, False, ls)))
            if len(batch) >= 2000:
                store.verify_batch(batch)
                batch = []
        if batch:
            store.verify_batch(batch)
        sold_entries = _entries_bytes(r, store)
        doc = {"benchmark": "the receiving check's state per received pack (入库核验)",
               "command": "python benchmarks/memory.py " + " ".join(sys.argv[1:]), "machine": common.machine(),
               "packs": n, "packs_per_delivery": per, "sites": SITES,
               "bytes_per_received_pack_all": round((recv_used - base_used) / n, 1),
               "bytes_per_received_pack_entry": round((recv_entries - base_entries) / n, 1),
               "bytes_per_received_pack_records_and_audit": round(((recv_used - base_used) - (recv_entries - base_entries)) / n, 1),
               "entry_bytes_per_sold_received_pack": round(sold_entries / n, 1),
               "note": "the entry share stays in Redis while the pack lives; the delivery records expire with "
                       "settlement_ttl_days and the audit entries leave once archived"}
        print(common.write_results(args.out, doc))
        print(f"receipts: {doc['bytes_per_received_pack_all']} B per received pack, of which "
              f"{doc['bytes_per_received_pack_entry']} B in the code's entry")
        return 0
    finally:
        store.close()
        rp.stop()


def print_table(summary: dict, ratios: dict | None) -> None:
    cols = list(summary)
    print(f"{'':44}" + "".join(f"{'layout ' + c:>14}" for c in cols) + (f"{'new/old':>10}" if ratios else ""))
    for k in next(iter(summary.values())):
        row = f"{k:44}" + "".join(f"{summary[c][k]:>14}" for c in cols)
        if ratios:
            row += f"{ratios[k]:>10}"
        print(row)


if __name__ == "__main__":
    sys.exit(main())
