"""The read stage: every input file read, checked, pseudonymised and canonicalised by one function
per kind (`read_lines_file`, `read_issuance_file`), run where the engine runs its work.

- DuckDB: in worker processes on this machine (one process per core: the row checks and
  pseudonyms are Python per distinct value), forked before the engine starts, each file staged as
  Parquet in the work directory; the engine reads the staged files. When there are fewer
  settlement files than workers, a large Parquet file is read in parts (row ranges, by row groups
  where it has several), one part per task, so one big file uses every core (`_parts`).
- Spark (`spark_stage`): in the executors' Python workers, one task per file (`mapInArrow` over a
  table of files), each staging its file as Parquet in the work directory with the same function
  a DuckDB worker runs; the SQL steps scan the staged files on the executors. Only a path and a
  count per file and the rejected rows (errors.csv) reach the driver. The pseudonym key travels
  to the executors inside the task's closure (pickled with the Pseudonymizer, never printed: it
  has no repr that shows it).

Why files.py's reader on the executors and not Spark's CSV/JSON readers: a file's line numbers
(files.md: the line a row starts on, counting the header, quoted fields across lines and blank
lines) are what errors.csv and lines.csv report, and Spark's readers give no line numbers; nor
do they reject a row as files.py does (bad bytes, over-long fields, unterminated quotes), so the
two engines would judge different rows. A file is therefore the unit of parallelism: a large
history comes as many files (daily or monthly exports), and a single huge file is read by one
task. The input files and the work directory must be at a path every executor sees (one host,
or a shared file system).

Files are independent: `pos`, `inst` and `li` are per file, an issuance record's order is file
index * stride + row. The parts of a file number `pos` and `inst` from their first row, so they
never collide; a settlement (adjacent usable rows of one site and settlement id) that runs across
two parts cannot be judged from either part alone, so when the last usable row of one part and the
first of the next share site and settlement id, the file is staged again whole (`stage_all`).

May import: the standard library, pyarrow, pyspark (inside spark_read only) and this room's
modules (inputs, canon).
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from . import canon, inputs
from .inputs import (InputError, InputFileError, Limits, Pseudonyms, parquet_rows, read_issuance_file,
                     read_settlement_file)


@dataclass(frozen=True, slots=True)
class Staged:
    path: str  # the staged Parquet file
    rows: int
    errors: list[InputError]
    # (site_id, settlement_id) of the first and last usable row: whether a settlement runs from
    # one part of a file into the next (None: no usable row).
    first_key: tuple[str, str] | None = None
    last_key: tuple[str, str] | None = None
    more: tuple[str, ...] = ()  # a file read in parts: the other parts' staged files

    @property
    def paths(self) -> list[str]:
        """Every staged Parquet file of this input file."""
        return [self.path, *self.more]


def read_lines_file(fi: int, paths: list[str], limits: Limits, pseudonyms: Pseudonyms, profile,
                    errors: list[InputError], part: tuple[int, int] | None = None) -> pa.Table:
    """A settlement file's usable lines (part: rows start..stop-1 of a Parquet file), checked,
    pseudonymised, with their canonical key (ckey)."""
    t = read_settlement_file(fi, paths, limits, pseudonyms, errors, part)
    return t.append_column("ckey", canon.canonical_keys(t["code"], profile))


# ------------------------------------------------------------------ DuckDB: worker processes

def _lines(fi: int, paths: list[str], limits: Limits, pseudonyms: Pseudonyms, profile, out: str,
           part: tuple[int, int] | None = None) -> Staged:
    errors: list[InputError] = []
    t = read_lines_file(fi, paths, limits, pseudonyms, profile, errors, part)
    pq.write_table(t, out, compression="snappy")
    if not t.num_rows:
        return Staged(out, 0, errors)
    first, last = ((t["site_id"][i].as_py(), t["settlement_id"][i].as_py()) for i in (0, t.num_rows - 1))
    return Staged(out, t.num_rows, errors, first, last)


def _issuance(fi: int, paths: list[str], profile, out: str, part: tuple[int, int] | None = None) -> Staged:
    errors: list[InputError] = []
    t = read_issuance_file(fi, paths, profile, errors, part)
    pq.write_table(t, out, compression="snappy")
    return Staged(out, t.num_rows, errors)


# A Parquet file is read in parts only when there are fewer settlement files than cores, and in
# parts of at least PART_MIN_ROWS rows; a part per core times PARTS_PER_WORKER, so a worker done
# early takes another part. The issuance files then go in parts as well.
PART_MIN_ROWS = 100_000  # a day of a province (a few 100,000 lines) still goes on every core
PARTS_PER_WORKER = 2


def _parts(path: str, n_parts: int, settlements: bool = True) -> list[tuple[int, int] | None]:
    """A Parquet file's parts: row ranges of about equal size, at row-group ends where the file
    has enough row groups, and for settlements where the site or settlement id changes; [None]
    (the whole file) for CSV, JSONL and small files."""
    if n_parts < 2 or not path.endswith(".parquet") or not os.path.isfile(path):
        return [None]
    try:
        rows, groups = parquet_rows(path)
        names = pq.ParquetFile(path).schema_arrow.names
    except InputFileError:
        return [None]  # reading it whole reports it, as it always did
    n_parts = min(n_parts, rows // PART_MIN_ROWS)
    if n_parts < 2 or (settlements and ("site_id" not in names or "settlement_id" not in names)):
        return [None]
    if len(groups) >= n_parts:  # at row-group ends: a part decodes few rows another part needs
        targets: list[int] = []
        at = 0
        for g in groups[:-1]:
            at += g
            if at >= rows * (len(targets) + 1) / n_parts and len(targets) < n_parts - 1:
                targets.append(at)
    else:
        targets = [rows * k // n_parts for k in range(1, n_parts)]
    if settlements:
        # Each part starts where the site or settlement id changes, at or after its target: a
        # settlement then runs across parts only when bad rows sit at the boundary (_joined).
        keys = inputs.PRELOADED.get(path)
        if keys is None:
            keys = pq.read_table(path, columns=["site_id", "settlement_id"])
        change = pc.indices_nonzero(pc.or_(
            pc.not_equal(keys["site_id"].slice(1), keys["site_id"].slice(0, rows - 1)),
            pc.not_equal(keys["settlement_id"].slice(1), keys["settlement_id"].slice(0, rows - 1)))).to_numpy() + 1
        targets = [int(change[i]) for i in np.searchsorted(change, targets) if i < len(change)]
    bounds = sorted({0, rows, *targets})
    return [(a, b) for a, b in zip(bounds, bounds[1:])]


def _joined(parts: list[Staged]) -> bool:
    """Whether a settlement runs across two parts: the last usable row before a part and that
    part's first one have the same site and settlement id (bad rows between do not split them)."""
    last = None
    for st in parts:
        if st.first_key is None:
            continue
        if last is not None and st.first_key == last:
            return True
        last = st.last_key
    return False


def _pool_context() -> multiprocessing.context.BaseContext:
    """fork where there is one: a worker starts in milliseconds with the parent's imports (and
    inputs.PRELOADED), where spawn took over a second to import pyarrow and tracecode again. Safe
    because stage_all runs before the engine starts its threads (DuckDBEngine connects after
    staging); elsewhere spawn."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def _joined_staged(parts: list[Staged]) -> Staged:
    """One file's parts as one result (`Staged.paths`: a staged file per part)."""
    if len(parts) == 1:
        return parts[0]
    return Staged(parts[0].path, sum(st.rows for st in parts), [e for st in parts for e in st.errors],
                  parts[0].first_key, parts[-1].last_key, tuple(st.path for st in parts[1:]))


def stage_all(files: list[str], issuance: list[str], workdir: str, limits: Limits, pseudonyms: Pseudonyms,
              profile, workers: int | None = None, progress=None) -> tuple[list[Staged], list[Staged]]:
    """Every settlement and issuance file staged; results in input order, one per file (a file
    read in parts has a staged file per part: `Staged.paths`). progress(rows) is called as each
    file or part is done (the run's progress bar)."""
    cores = os.cpu_count() or 1
    per_file = -(-cores * PARTS_PER_WORKER // len(files)) if files and len(files) < cores else 1
    ctx = _pool_context()
    if per_file > 1 and ctx.get_start_method() == "fork":
        for paths, schema in ((files, inputs.LEADS_FIELDS), (issuance, inputs.ISSUANCE_FIELDS)):
            for path in paths:
                if _parts(path, per_file, settlements=False) != [None]:
                    try:
                        inputs.preload(path, schema)
                    except Exception:  # noqa: BLE001 - the worker that reads it reports it
                        pass
    line_plan = [(fi, part) for fi in range(len(files)) for part in _parts(files[fi], per_file)]
    iss_plan = [(fi, part) for fi in range(len(issuance))
                for part in (_parts(issuance[fi], per_file, settlements=False) if per_file > 1 else [None])]
    workers = workers or max(1, min(cores, len(line_plan) + len(iss_plan)))

    def out(kind: str, fi: int, k: int, part) -> str:
        return os.path.join(workdir, f"{kind}-{fi:05d}.parquet" if part is None else f"{kind}-{fi:05d}-{k:03d}.parquet")
    try:
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            # The largest tasks first, so none starts last: settlement files (or parts), then
            # issuance files (or parts: about twice as fast per row).
            lines = [(fi, pool.submit(_lines, fi, files, limits, pseudonyms, profile, out("lines", fi, k, part), part))
                     for k, (fi, part) in enumerate(line_plan)]
            iss = [(fi, pool.submit(_issuance, fi, issuance, profile, out("issuance", fi, k, part), part))
                   for k, (fi, part) in enumerate(iss_plan)]
            if progress:
                for f in as_completed([f for _, f in lines + iss]):
                    progress(f.result().rows)
            by_file: list[list[Staged]] = [[] for _ in files]
            for fi, f in lines:
                by_file[fi].append(f.result())
            staged = []
            for fi, parts in enumerate(by_file):
                if len(parts) > 1 and _joined(parts):  # rare: read this file whole
                    for st in parts:
                        os.remove(st.path)
                    parts = [pool.submit(_lines, fi, files, limits, pseudonyms, profile,
                                         out("lines", fi, 0, None)).result()]
                staged.append(_joined_staged(parts))
            iss_by_file: list[list[Staged]] = [[] for _ in issuance]
            for fi, f in iss:
                iss_by_file[fi].append(f.result())
            return staged, [_joined_staged(parts) for parts in iss_by_file]
    finally:
        inputs.PRELOADED.clear()


# ------------------------------------------------------------------ Spark: the executors

# What a row of the read stage's result is: a file staged (its path and rows), a rejected row
# (errors.csv), or a file that cannot be read to its end (the run stops, as on DuckDB).
STAGED, REJECTED, UNREADABLE = "S", "E", "F"
LINE, RECORD = "L", "I"
RESULT = pa.schema([("part", pa.string()), ("kind", pa.string()), ("file_index", pa.int32()),
                    ("rows", pa.int64()), ("path", pa.string()), ("line", pa.int64()),
                    ("err_field", pa.string()), ("err_reason", pa.string())])


def _result(part: str, kind: str, fi: int, rows=0, path="", errors=()) -> pa.RecordBatch:
    errors = list(errors) or [InputError(path, 0, "", "")]
    n = len(errors)
    return pa.RecordBatch.from_arrays([
        pa.array([part] * n, pa.string()), pa.array([kind] * n, pa.string()), pa.array([fi] * n, pa.int32()),
        pa.array([rows] * n, pa.int64()), pa.array([e.file for e in errors], pa.string()),
        pa.array([e.line for e in errors], pa.int64()), pa.array([e.field for e in errors], pa.string()),
        pa.array([e.reason for e in errors], pa.string())], schema=RESULT)


def stage_unit(kind: str, fi: int, files: list[str], issuance: list[str], workdir: str, limits: Limits,
               pseudonyms: Pseudonyms, profile):
    """One file staged on an executor by the very function a DuckDB worker runs (`_lines`,
    `_issuance`): one STAGED row (path, rows), its rejected rows; a file that cannot be read
    (InputFileError) or a run that cannot go on (ValueError: raw ids without a key) as one
    UNREADABLE row, which the driver raises again with its own text."""
    paths = files if kind == LINE else issuance
    try:
        if kind == LINE:
            st = _lines(fi, files, limits, pseudonyms, profile, os.path.join(workdir, f"lines-{fi:05d}.parquet"))
        else:
            st = _issuance(fi, issuance, profile, os.path.join(workdir, f"issuance-{fi:05d}.parquet"))
    except InputFileError as exc:
        yield _result(UNREADABLE, kind, fi, errors=[InputError(exc.path, 0, "InputFileError", exc.reason)])
        return
    except ValueError as exc:
        yield _result(UNREADABLE, kind, fi, errors=[InputError(paths[fi], 0, "ValueError", str(exc))])
        return
    yield _result(STAGED, kind, fi, st.rows, st.path)
    if st.errors:
        yield _result(REJECTED, kind, fi, errors=st.errors)


def _stage_units(files, issuance, workdir, limits, pseudonyms, profile):
    """The mapInArrow function: batches of (kind, fi) in, each file's result rows out."""
    def run(batches):
        for b in batches:
            for kind, fi in zip(b.column("kind").to_pylist(), b.column("fi").to_pylist()):
                yield from stage_unit(kind, fi, files, issuance, workdir, limits, pseudonyms, profile)
    return run


def spark_stage(spark, files: list[str], issuance: list[str], workdir: str, limits: Limits,
                pseudonyms: Pseudonyms, profile) -> tuple[list[Staged], list[Staged]]:
    """Every file staged on the executors, one task per file (largest first, so a big file does
    not start last), as Parquet in the work directory (the executors' columnar scans read it,
    as they read any staged table). Only the result rows come back: a path and a count per file
    and the rejected rows. Raises what the DuckDB path raises for a file that cannot be read
    (InputFileError) or raw ids without a key (ValueError), the first in input order."""
    from pyspark.sql.pandas.types import from_arrow_schema
    from pyspark.sql.types import IntegerType, StringType, StructField, StructType

    units = [(LINE, i, p) for i, p in enumerate(files)] + [(RECORD, i, p) for i, p in enumerate(issuance)]
    units.sort(key=lambda u: -os.path.getsize(u[2]) if os.path.isfile(u[2]) else 0)
    rdd = spark.sparkContext.parallelize([(k, i) for k, i, _ in units], max(1, len(units)))
    todo = spark.createDataFrame(rdd, StructType([StructField("kind", StringType(), False),
                                                  StructField("fi", IntegerType(), False)]))
    res = todo.mapInArrow(_stage_units(files, issuance, os.path.abspath(workdir), limits, pseudonyms, profile),
                          from_arrow_schema(RESULT)).toArrow().to_pylist()
    stops = sorted((r for r in res if r["part"] == UNREADABLE), key=lambda r: (r["kind"] != LINE, r["file_index"]))
    if stops:
        first = stops[0]
        if first["err_field"] == "InputFileError":
            raise InputFileError(first["path"], first["err_reason"])
        raise ValueError(first["err_reason"])
    staged: dict[tuple[str, int], Staged] = {}
    for r in res:
        if r["part"] == STAGED:
            staged[(r["kind"], r["file_index"])] = Staged(r["path"], r["rows"], [])
    for r in res:
        if r["part"] == REJECTED:
            staged[(r["kind"], r["file_index"])].errors.append(InputError(r["path"], r["line"], r["err_field"],
                                                                          r["err_reason"]))
    return ([staged[(LINE, i)] for i in range(len(files))], [staged[(RECORD, i)] for i in range(len(issuance))])
