"""The audit archive's benchmark (docs/archive.md, issue 25), in one run on this machine:

1. POS alone: `tracecode serve` (archived mode, --audit-archive-bound) at its 5-line maximum
   (one closed-loop load generator, benchmarks/loadgen.py): audit entries produced per second.
   That load's entries are the backlog of step 2.
2. The archiver alone on that backlog: one `tracecode archive` process; entries archived per
   second until the lag is 0, against step 1's rate (the headroom; target >= 3x).
3. POS and the archiver together for the same time: the POS rate beside it, the archive's lag
   at the end, and the Redis memory the streams hold (MEMORY USAGE over the 1,024 streams),
   against what MAXLEN-only streams would hold for the same entries.
4. `tracecode archive compact`, then Parquet bytes per archived entry (target <= 40 B, zstd).

    python benchmarks/archive.py [--seconds 20] [--out benchmarks/results/archive.json]

May import: the standard library, tracecode (store and archive), benchmarks/common.py.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from tracecode.archive.dataset import Archive  # noqa: E402
from tracecode.rules.pseudonym import generate_key_file  # noqa: E402
from tracecode.server.app import make_store  # noqa: E402
from tracecode.server.config import Config  # noqa: E402
from tracecode.server.store.archive import ArchiveStreams, share  # noqa: E402

BOUND = 5_000_000
HERE = os.path.dirname(os.path.abspath(__file__))


def serve(url: str, key: str, log) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([common.python(), "-m", "tracecode.cli", "serve", "--listen", "127.0.0.1:0", "--redis-url", url,
                             "--metrics-port", "0", "--log-level", "WARNING", "--audit-archive-bound", str(BOUND),
                             "--pseudonym-key-file", key],
                            stdout=subprocess.PIPE, stderr=log, text=True, env=common.env_for_subprocess())
    from tracecode.server.workers import READY_PREFIX
    assert proc.stdout is not None
    while not (line := proc.stdout.readline()).startswith(READY_PREFIX):
        if not line:
            raise SystemExit(f"tracecode serve exited with {proc.wait()} before listening")
    return proc, int(line.split()[-1])


def loadgen(port: int, codes_file: str, first: int, seconds: float, settlements: int) -> dict:
    proc = subprocess.Popen([common.python(), os.path.join(HERE, "loadgen.py"), "--target", f"127.0.0.1:{port}",
                             "--codes", codes_file, "--first", str(first), "--settlements", str(settlements),
                             "--lines", "5", "--closed", "64", "--duration", str(seconds), "--insured", "5000"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=common.env_for_subprocess())
    assert proc.stdout is not None and proc.stdin is not None
    while (line := proc.stdout.readline().strip()) != "ready":
        if not line and proc.poll() is not None:
            raise SystemExit("loadgen exited before ready")
    proc.stdin.write("go\n")
    proc.stdin.flush()
    out = json.loads(proc.stdout.readline())
    proc.wait(30)
    # The per-call latencies are not this benchmark's question: keep the summary only.
    return {k: v for k, v in out.items() if not isinstance(v, list)}


def archiver(url: str, key: str, root: str, log, max_delay_s: float) -> tuple[subprocess.Popen, threading.Event]:
    """The archiver process, and an event set once it has started (its "archive: share" line:
    imports done, connected, the data-set marker checked)."""
    proc = subprocess.Popen([common.python(), "-m", "tracecode.cli", "archive", "--redis-url", url, "--pseudonym-key-file", key,
                             "--archive", root, "--max-delay-s", str(max_delay_s), "--archive-metrics-port", "0"],
                            stdout=log, stderr=subprocess.PIPE, text=True, env=common.env_for_subprocess())
    ready = threading.Event()

    def watch():
        assert proc.stderr is not None
        for line in proc.stderr:
            if "archive: share" in line:
                ready.set()
            log.write(line.encode())
    threading.Thread(target=watch, daemon=True).start()
    return proc, ready


def added(streams: ArchiveStreams) -> int:
    return sum(s.archived + s.unarchived + s.dropped for s in streams.state())


def lag(streams: ArchiveStreams) -> int:
    return sum(s.unarchived for s in streams.state())


def stream_memory(store) -> int:
    pipe = store.r.pipeline(transaction=False)
    for s in store.keys.audit_streams():
        pipe.memory_usage(s, samples=0)
    return sum(int(x or 0) for x in pipe.execute())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "archive.json"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="tracecode-bench-archive-")
    log = open(os.path.join(tmp, "bench.log"), "ab")
    key = generate_key_file(os.path.join(tmp, "pseudonym.key"))
    rp = common.start_redis()
    srv, port = serve(rp.url, key, log)
    store = make_store(Config(pseudonym_key_file=key, metrics_port=0, audit_archive_bound=BOUND), rp.url)
    streams = ArchiveStreams(store, "archive", share(0, 1), "archiver-0-of-1")
    streams.start()
    root = os.path.join(tmp, "archive")
    per_phase = 80_000  # settlements a phase may use (codes: 5 a settlement)
    codes = common.cn20_codes(per_phase * 5 * 2, seed=25)
    codes_file = os.path.join(tmp, "codes.txt")
    with open(codes_file, "w", encoding="ascii") as fh:
        fh.write("\n".join(codes) + "\n")
    print(f"loading {len(codes)} codes ...", file=sys.stderr)
    common.load_issuance(store, codes)
    doc: dict = {"machine": common.machine(), "seconds": args.seconds, "audit_archive_bound": BOUND}
    try:
        # 1. POS alone.
        before = added(streams)
        pos = loadgen(port, codes_file, 0, args.seconds, per_phase)
        produced = added(streams) - before
        pos_rate = produced / pos["elapsed_s"] if "elapsed_s" in pos else produced / args.seconds
        doc["pos_alone"] = {"loadgen": pos, "entries": produced, "entries_per_s": round(pos_rate)}
        print(f"POS alone: {produced} entries, {pos_rate:.0f}/s", file=sys.stderr)
        # 2. The archiver alone on that backlog, writing as soon as it has read (--max-delay-s 0):
        # timed from its start line (imports done, connected, the marker checked: once per
        # process) to an empty lag; from the process's launch too.
        backlog = lag(streams)
        t0 = time.perf_counter()
        arch, ready = archiver(rp.url, key, root, log, 0)
        ready.wait(60)
        t1 = time.perf_counter()
        while lag(streams) > 0:  # polled 4 times a second: each poll is 2,048 Redis commands
            time.sleep(0.25)
        t2 = time.perf_counter()
        rate = backlog / (t2 - t1)
        doc["archiver_alone"] = {"backlog": backlog, "seconds": round(t2 - t1, 2), "entries_per_s": round(rate),
                                 "headroom_x": round(rate / pos_rate, 2), "process_start_s": round(t1 - t0, 2),
                                 "headroom_x_with_process_start": round(backlog / (t2 - t0) / pos_rate, 2)}
        print(f"archiver alone: {backlog} entries in {t2 - t1:.2f} s = {rate:.0f}/s ({rate / pos_rate:.1f}x the POS "
              f"rate; {t1 - t0:.1f} s process start before)", file=sys.stderr)
        arch.send_signal(signal.SIGTERM)
        arch.wait(60)
        arch, _ = archiver(rp.url, key, root, log, 2)
        # 3. Both together.
        before = added(streams)
        pos2 = loadgen(port, codes_file, per_phase * 5, args.seconds, per_phase)
        produced2 = added(streams) - before
        mem = stream_memory(store)
        lag_end = lag(streams)
        time.sleep(3)
        lag_3s = lag(streams)
        while lag(streams) > 0:
            time.sleep(0.1)
        drained = stream_memory(store)
        doc["together"] = {"loadgen": pos2, "entries": produced2, "entries_per_s": round(produced2 / args.seconds),
                           "lag_at_end": lag_end, "lag_3s_later": lag_3s,
                           "stream_memory_bytes": mem, "stream_memory_bytes_drained": drained,
                           "stream_memory_bytes_per_produced_entry_if_unarchived": None}
        arch.send_signal(signal.SIGTERM)
        arch.wait(60)
        # What the streams would hold for all these entries without an archive (MAXLEN 1e6 each
        # is never reached here): measured the same way, on a copy of phase 3's entries count.
        per_entry = mem_per_entry(store, produced2)
        doc["together"]["stream_memory_bytes_per_produced_entry_if_unarchived"] = per_entry
        print(f"together: {produced2} entries ({produced2 / args.seconds:.0f}/s), lag at end {lag_end}, "
              f"streams hold {mem / 1e6:.1f} MB (unarchived they would hold ~{per_entry * produced2 / 1e6:.0f} MB)",
              file=sys.stderr)
        # 4. Compaction and bytes per entry.
        a = Archive(root)
        raw_bytes = sum(i.size for d in a.dates() for i in a.files(d))
        files_before = sum(len(a.files(d)) for d in a.dates())
        out = subprocess.run([common.python(), "-m", "tracecode.cli", "archive", "compact", "--redis-url", rp.url,
                              "--pseudonym-key-file", key, "--archive", root], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr)
        rows = a.read().num_rows
        compact_bytes = sum(i.size for d in a.dates() for i in a.files(d))
        doc["parquet"] = {"rows": rows, "files_before_compaction": files_before, "bytes_before": raw_bytes,
                          "bytes_per_entry_before": round(raw_bytes / rows, 1), "bytes_after": compact_bytes,
                          "bytes_per_entry_after_compaction": round(compact_bytes / rows, 1)}
        print(f"parquet: {rows} rows, {raw_bytes / rows:.0f} B/entry in {files_before} files, "
              f"{compact_bytes / rows:.1f} B/entry compacted", file=sys.stderr)
    finally:
        srv.terminate()
        srv.wait(30)
        store.close()
        rp.stop()
    print(json.dumps(doc, indent=2))
    common.write_results(os.path.basename(args.out), doc)
    return 0


def mem_per_entry(store, n: int) -> float:
    """Redis bytes an audit entry takes in a stream: write n copies of a typical entry into a
    scratch stream, MEMORY USAGE over n."""
    key = store.keys.audit_streams()[0] + ":bench-scratch"
    fields = {"t": "DISPENSED", "c": "81234560123456789012", "s": "S00042", "i": "lg12345-abcdef01-000123",
              "l": "3", "u": "1", "x": "", "a": str(int(time.time() * 1000)), "p": "k1.0123456789abcdef0123456789abcdef",
              "g": "8123456"}
    n = min(n, 200_000)
    pipe = store.r.pipeline(transaction=False)
    for i in range(n):
        pipe.xadd(key, fields)
        if i % 5000 == 4999:
            pipe.execute()
    pipe.execute()
    size = int(store.r.memory_usage(key, samples=0) or 0)
    store.r.delete(key)
    return round(size / n, 1)


if __name__ == "__main__":
    sys.exit(main())
