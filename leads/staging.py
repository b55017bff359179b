"""Reading in parallel: each input file is read, checked, pseudonymised (and, for DuckDB,
canonicalised) in a worker process and staged as Parquet in the work directory; the engine then
reads the staged files. Row checks and pseudonyms are Python per distinct value, so one process
per core is what makes the read stage scale with the machine (files are independent: `pos`,
`inst` and `li` are per file, an issuance record's order is file index * stride + row)."""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import pyarrow.parquet as pq

from . import canon
from .inputs import InputError, Limits, Pseudonyms, read_issuance_file, read_settlement_file


@dataclass(frozen=True, slots=True)
class Staged:
    path: str  # the staged Parquet file
    rows: int
    errors: list[InputError]


def _lines(fi: int, paths: list[str], limits: Limits, pseudonyms: Pseudonyms, profile, keys: bool,
           out: str) -> Staged:
    errors: list[InputError] = []
    t = read_settlement_file(fi, paths, limits, pseudonyms, errors)
    if keys:
        t = t.append_column("ckey", canon.canonical_keys(t["code"], profile))
    pq.write_table(t, out, compression="snappy")
    return Staged(out, t.num_rows, errors)


def _issuance(fi: int, paths: list[str], profile, out: str) -> Staged:
    errors: list[InputError] = []
    t = read_issuance_file(fi, paths, profile, errors)
    pq.write_table(t, out, compression="snappy")
    return Staged(out, t.num_rows, errors)


def stage_all(files: list[str], issuance: list[str], workdir: str, limits: Limits, pseudonyms: Pseudonyms,
              profile, keys: bool, workers: int | None = None, progress=None) -> tuple[list[Staged], list[Staged]]:
    """Every settlement and issuance file staged; results in input order. progress(staged) is
    called as each file is done (the run's progress bar)."""
    workers = workers or max(1, min(os.cpu_count() or 1, len(files) + len(issuance)))
    # spawn: the workers must not inherit a running engine (a JVM, DuckDB threads) by fork.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        lines = [pool.submit(_lines, fi, files, limits, pseudonyms, profile, keys,
                             os.path.join(workdir, f"lines-{fi:05d}.parquet")) for fi in range(len(files))]
        iss = [pool.submit(_issuance, fi, issuance, profile, os.path.join(workdir, f"issuance-{fi:05d}.parquet"))
               for fi in range(len(issuance))]
        if progress:
            for f in as_completed(lines + iss):
                progress(f.result())
        return [f.result() for f in lines], [f.result() for f in iss]
