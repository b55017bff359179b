"""Codes per second of the scan-code codec: compiled vs pure-Python twin vs biip, in one run.

    python benchmarks/codec.py [--size 50000] [--chunk 1000] [--rounds 15] [--cpu 0]

All three parse the SAME deterministic mixed corpus (20-digit codes, raw GS1 element strings,
parenthesised, Digital Link, codes in URLs, some malformed) on one pinned core. Results:
benchmarks/results/codec.json. Acceptance (issue 3): compiled >= 20x the twin, >= 50x biip,
>= 2M codes/s.

Measured per implementation:
  parse_many  -- one call per chunk of --chunk scans (a settlement / bulk chunk), the server's path
  parse       -- one Python-level call per scan
  keys_many   -- the key column alone over the whole corpus in one call (the leads engine's path),
                 beside parse_many over the whole corpus plus taking each result's key, in turn
biip has no batch entry point: its figure is a loop of biip.parse (GS1Message.parse_hri for the
parenthesised form, which biip.parse does not read).
"""
import argparse
import collections
import datetime
import gc
import hashlib
import json
import os
import platform
import random
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
GS = "\x1d"
SERIAL_CHARS = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ"  # what printers actually put on packs

# Share of each form in the corpus (sums to 1).
MIX = {
    "cn20": 0.30,
    "cn20_aim_crlf": 0.05,
    "cn20_url": 0.05,
    "gs1_raw": 0.20,
    "gs1_hri": 0.10,
    "digital_link": 0.20,
    "malformed": 0.10,
}


def _check_digit(body):
    total = sum((ord(c) - 48) * (3 if i % 2 == 0 else 1) for i, c in enumerate(reversed(body)))
    return str((10 - total % 10) % 10)


def _pack(rnd):
    body = "0" + "69" + "".join(rnd.choice("0123456789") for _ in range(10))
    gtin = body + _check_digit(body)
    serial = "".join(rnd.choice(SERIAL_CHARS) for _ in range(rnd.randint(8, 20)))
    batch = "".join(rnd.choice(SERIAL_CHARS) for _ in range(rnd.randint(4, 10)))
    expiry = f"{rnd.randint(25, 32):02d}{rnd.randint(1, 12):02d}{rnd.choice([0, 15, 28]):02d}"
    return gtin, serial, batch, expiry


def _cn20(rnd):
    return "8" + "".join(rnd.choice("0123456789") for _ in range(19))


def _malformed(rnd):
    gtin, serial, batch, expiry = _pack(rnd)
    bad_gtin = gtin[:-1] + str((int(gtin[-1]) + 1) % 10)
    return rnd.choice(
        [
            _cn20(rnd)[:-1],  # 19 digits
            "5" + _cn20(rnd)[1:],  # prefix not admitted
            f"]d201{bad_gtin}17{expiry}10{batch}{GS}21{serial}",  # check digit
            f"]d201{gtin}17{expiry[:2]}13{expiry[4:]}21{serial}",  # month 13
            f"]d201{gtin}10{batch}{GS}21{serial}#",  # not set 82
            f"]d201{gtin}17{expiry}10{batch}",  # not serialised
            f"https://id.gs1.org/01/{gtin}/21/{serial}%2",  # bad percent-encoding
            f"(01){gtin}(99999){serial}",  # malformed group
        ]
    )


def build_corpus(size, seed=3):
    rnd = random.Random(seed)
    forms = list(MIX)
    weights = [MIX[f] for f in forms]
    corpus, kinds = [], collections.Counter()
    for _ in range(size):
        form = rnd.choices(forms, weights)[0]
        kinds[form] += 1
        gtin, serial, batch, expiry = _pack(rnd)
        if form == "cn20":
            s = _cn20(rnd)
        elif form == "cn20_aim_crlf":
            s = rnd.choice(["]C0", "]Q1", ""]) + _cn20(rnd) + "\r\n"
        elif form == "cn20_url":
            s = f"https://mashangfangxin.example.cn/v?code={_cn20(rnd)}"
        elif form == "gs1_raw":
            s = f"]d201{gtin}17{expiry}10{batch}{GS}21{serial}"
        elif form == "gs1_hri":
            s = f"(01){gtin}(17){expiry}(10){batch}(21){serial}"
        elif form == "digital_link":
            s = f"https://id.gs1.org/01/{gtin}/10/{batch}/21/{serial}?17={expiry}"
        else:
            s = _malformed(rnd)
        corpus.append(s)
    return corpus, dict(kinds)


def _best_rate(fn, count, rounds):
    """Codes/s of the fastest of `rounds` runs (the least disturbed by the machine)."""
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return count / min(times), count / statistics.median(times)


def bench_parse_many(mod, corpus, chunk, rounds):
    chunks = [corpus[i : i + chunk] for i in range(0, len(corpus), chunk)]
    parse_many = mod.parse_many

    def run():
        for c in chunks:
            parse_many(c)

    return _best_rate(run, len(corpus), rounds)


def bench_key_column(mod, corpus, rounds):
    """(keys_many, parse_many + [p[KEY] ...]) over the whole corpus, rounds alternating so a busy
    spell of the machine slows both alike; best and median codes/s of each."""
    keys_many, parse_many = mod.keys_many, mod.parse_many
    times: dict[str, list[float]] = {"keys_many": [], "parse_many_key": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        keys_many(corpus)
        times["keys_many"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        [p[1] for p in parse_many(corpus)]
        times["parse_many_key"].append(time.perf_counter() - t0)
    return {k: (len(corpus) / min(v), len(corpus) / statistics.median(v)) for k, v in times.items()}


def bench_parse(mod, corpus, rounds):
    parse = mod.parse

    def run():
        for s in corpus:
            parse(s)

    return _best_rate(run, len(corpus), rounds)


def bench_biip(corpus, rounds):
    import biip
    from biip import ParseError
    from biip.gs1_messages import GS1Message

    def one(s):
        try:
            if s.startswith("("):
                return GS1Message.parse_hri(s)
            return biip.parse(s)
        except ParseError:
            return None

    def run():
        for s in corpus:
            one(s)

    return _best_rate(run, len(corpus), rounds)


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=50_000)
    ap.add_argument("--chunk", type=int, default=1000, help="scans per parse_many call")
    ap.add_argument("--rounds", type=int, default=15, help="rounds for the compiled module")
    ap.add_argument("--slow-rounds", type=int, default=3, help="rounds for the twin and biip")
    ap.add_argument("--cpu", type=int, default=None, help="pin to this CPU (default: first allowed)")
    ap.add_argument("--no-biip", action="store_true")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "codec.json"))
    args = ap.parse_args(argv)

    if hasattr(os, "sched_setaffinity"):
        cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
        os.sched_setaffinity(0, {cpu})
    from tracecode.codec import _codec, fallback

    corpus, mix = build_corpus(args.size)
    compiled_out = _codec.parse_many(corpus)
    if compiled_out != fallback.parse_many(corpus):
        sys.exit("the twins disagree on the benchmark corpus")
    outcome = collections.Counter({0: "malformed", 1: "cn20", 2: "gs1"}[r[0]] for r in compiled_out)

    gc.collect()
    rates = {}
    rates["compiled.parse_many"] = bench_parse_many(_codec, corpus, args.chunk, args.rounds)
    rates["compiled.parse"] = bench_parse(_codec, corpus, args.rounds)
    if _codec.keys_many(corpus) != [r[1] for r in compiled_out]:
        sys.exit("keys_many disagrees with parse_many on the benchmark corpus")
    for name, rate in bench_key_column(_codec, corpus, args.rounds).items():
        rates[f"compiled.{name}"] = rate
    rates["python.parse_many"] = bench_parse_many(fallback, corpus, args.chunk, args.slow_rounds)
    rates["python.parse"] = bench_parse(fallback, corpus, args.slow_rounds)
    if not args.no_biip:
        rates["biip.parse"] = bench_biip(corpus, args.slow_rounds)

    best = {k: round(v[0]) for k, v in rates.items()}
    median = {k: round(v[1]) for k, v in rates.items()}
    ratios = {
        "compiled_vs_python.parse_many": best["compiled.parse_many"] / best["python.parse_many"],
        "compiled_vs_python.parse": best["compiled.parse"] / best["python.parse"],
        "compiled.keys_many_vs_parse_many_key": best["compiled.keys_many"] / best["compiled.parse_many_key"],
    }
    if "biip.parse" in best:
        ratios["compiled.parse_many_vs_biip"] = best["compiled.parse_many"] / best["biip.parse"]
        ratios["compiled.parse_vs_biip"] = best["compiled.parse"] / best["biip.parse"]
    ratios = {k: round(v, 1) for k, v in ratios.items()}
    targets = {
        "compiled >= 2M codes/s (parse_many)": best["compiled.parse_many"] >= 2_000_000,
        "compiled >= 20x twin (parse_many)": ratios["compiled_vs_python.parse_many"] >= 20,
    }
    if "biip.parse" in best:
        targets["compiled >= 50x biip (parse_many)"] = ratios["compiled.parse_many_vs_biip"] >= 50

    import Cython

    result = {
        "benchmark": "scan-code codec, codes per second (best of rounds; median alongside)",
        "command": "python benchmarks/codec.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "codes_per_second": best,
        "codes_per_second_median": median,
        "ratios": ratios,
        "targets_met": targets,
        "corpus": {
            "size": len(corpus),
            "mix": mix,
            "outcome": dict(outcome),
            "sha256": hashlib.sha256("\n".join(corpus).encode()).hexdigest(),
            "parse_many_chunk": args.chunk,
            "examples": corpus[:8],
        },
        "rounds": {"compiled": args.rounds, "python_and_biip": args.slow_rounds},
        "machine": {
            "cpu": cpu_model(),
            "logical_cpus": os.cpu_count(),
            "pinned_to_one_core": hasattr(os, "sched_setaffinity"),
            "python": sys.version.split()[0],
            "implementation": platform.python_implementation(),
            "cython": Cython.__version__,
            "platform": platform.platform(),
        },
    }
    try:
        import biip

        result["machine"]["biip"] = biip.__version__
    except (ImportError, AttributeError):
        pass
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    tmp = args.out + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2, ensure_ascii=False)
        f.write("\n")
    os.replace(tmp, args.out)

    width = max(map(len, best))
    for k in best:
        print(f"{k:<{width}}  {best[k]:>12,} codes/s  (median {median[k]:,})")
    for k, v in ratios.items():
        print(f"{k:<{width}}  {v:>12}x")
    for k, v in targets.items():
        print(f"{'MET ' if v else 'MISSED '} {k}")
    print("->", os.path.relpath(args.out))
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
