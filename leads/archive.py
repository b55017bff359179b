"""`tracecode leads --archive URI [--from DATE --until DATE]`: the settlement history read from
tracecode's own audit archive (docs/archive.md) instead of settlement exports.

With `--engine spark` and an archive on a file system the executors see, Spark's Parquet reader
reads the partitions on the executors and one executor task writes the sorted export (the lines'
order is the export's line numbers, so it is one file); the driver never holds the lines. An
archive on object storage is exported by DuckDB through pyarrow's filesystem (the URI's options
and credentials live in this process, not in the executors' Hadoop configuration).

The archive's DISPENSED and ATTEMPT entries are the lines of every settlement the servers judged
(one entry per line, recorded or flagged). DuckDB reads the partitions from DATE to DATE only
(the `date=` directories are listed, the rest never opened; a compaction's replaced files are
left out as `Archive.live_files` says) and writes them as a settlement export in the scratch
directory: `site_id, settlement_id, settled_at` (ISO 8601, UTC), `line_no` (the entry's line
index + 1), `code` (the canonical code), `product_id` (the billed product), `units`,
`insured_id` (the pseudonym: the run treats the input as pseudonymised). The run then goes as
for any export, on DuckDB or Spark. The archive holds no amounts: `amount` is empty.

The archive's RECEIVED entries (the receiving check, 入库核验) are the UNRECEIVED model's receipts:
`receipts_from_archive` writes them as a receipts file (`site_id, code, received_at,
delivery_id, product_id, supplier`) from every partition up to `--until`, not only from
`--from`: a pack is received before it is sold, often in an earlier month.

May import: the standard library, duckdb, pyarrow, pyspark (through engines.SparkEngine), the
archive room's dataset (never its archiver: no Redis here) and this room's modules.
"""
from __future__ import annotations

import os
import re

from tracecode.archive.dataset import Archive, ArchiveError

DATE = re.compile(r"\d{4}-\d{2}-\d{2}\Z")


def check_date(flag: str, text: str | None) -> str | None:
    if text is not None and not DATE.match(text):
        raise ValueError(f"{flag} {text!r}: expected YYYY-MM-DD (a settlement date of the archive)")
    return text


def export_from_archive(uri: str, out_path: str, day_from: str | None = None, day_until: str | None = None,
                        engine: str = "duckdb", spark_master: str = "local[2]") -> int:
    """Write the archive's settlement lines between the dates (inclusive) as a Parquet export at
    out_path; the number of lines. A URI without partitions in range is an error naming it."""
    check_date("--from", day_from)
    check_date("--until", day_until)
    if "://" not in uri and not os.path.isdir(uri):
        raise ArchiveError(f"archive {uri!r}: no such directory")
    archive = Archive(uri)
    days = [d for d in archive.dates() if (day_from is None or d >= day_from) and (day_until is None or d <= day_until)]
    files = [p for d in days for p in archive.live_files(d)]
    if not files:
        raise ArchiveError(f"archive {uri!r}: no files for settlement dates {day_from or 'start'}..{day_until or 'end'}")
    if engine == "spark" and archive.local:
        return _export_on_spark(files, out_path, spark_master)
    return _copy(archive, files, out_path, """
        SELECT site AS site_id, settlement_id,
               strftime(settled_at AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%g') || '+00:00' AS settled_at,
               CAST(line + 1 AS VARCHAR) AS line_no, code, product_id,
               CAST(units AS VARCHAR) AS units, insured_pseudonym AS insured_id, '' AS amount
        FROM {source}
        WHERE event IN ('DISPENSED', 'ATTEMPT') AND line >= 0 AND code IS NOT NULL
        ORDER BY settled_at, site, settlement_id, line""")


def receipts_from_archive(uri: str, out_path: str, day_until: str | None = None) -> int:
    """Write the archive's RECEIVED entries up to day_until (inclusive; every earlier date) as a
    receipts Parquet file at out_path; the number of receipts (0: none, and nothing written)."""
    check_date("--until", day_until)
    archive = Archive(uri)
    files = [p for d in archive.dates() if day_until is None or d <= day_until for p in archive.live_files(d)]
    if not files:
        return 0
    return _copy(archive, files, out_path, """
        SELECT site AS site_id, code,
               strftime(event_at AT TIME ZONE 'UTC', '%Y-%m-%dT%H:%M:%S.%g') || '+00:00' AS received_at,
               settlement_id AS delivery_id, product_id, supplier
        FROM {source}
        WHERE event = 'RECEIVED' AND code IS NOT NULL AND site IS NOT NULL
        ORDER BY event_at, stream, entry_id""")


def _copy(archive: Archive, files: list[str], out_path: str, select: str) -> int:
    """DuckDB: select ({source}: the archive's files) written to out_path as Parquet; its rows."""
    import duckdb

    con = duckdb.connect()
    try:
        if archive.local:  # DuckDB reads the files itself, only the columns it needs
            source = "read_parquet([" + ", ".join(_literal(p) for p in files) + "])"
        else:  # object storage: through pyarrow's filesystem (the URI's options and credentials)
            con.register("arch", archive.read_paths(files))
            source = "arch"
        con.execute(f"COPY ({select.format(source=source)}) TO {_literal(out_path)} (FORMAT PARQUET)")
        row = con.execute(f"SELECT count(*) FROM read_parquet({_literal(out_path)})").fetchone()
        return int(row[0]) if row else 0
    finally:
        con.close()


# The same export as the DuckDB query above, in Spark SQL (Spark's session time zone is UTC,
# engines.SparkEngine): the columns, the filter and the order are the export's definition.
SPARK_EXPORT = """
SELECT site AS site_id, settlement_id,
       CONCAT(DATE_FORMAT(settled_at, "yyyy-MM-dd'T'HH:mm:ss.SSS"), '+00:00') AS settled_at,
       CAST(line + 1 AS STRING) AS line_no, code, product_id,
       CAST(units AS STRING) AS units, insured_pseudonym AS insured_id, '' AS amount
FROM archive_entries
WHERE event IN ('DISPENSED', 'ATTEMPT') AND line >= 0 AND code IS NOT NULL
ORDER BY settled_at, site, settlement_id, line"""


def _export_on_spark(files: list[str], out_path: str, master: str) -> int:
    """The archive read by Spark's Parquet reader on the executors, sorted there, written as one
    file by one task (coalesce(1) after the sort keeps the order), renamed to out_path."""
    import shutil

    import pyarrow.parquet as pq

    from .engines import SparkEngine
    scratch = os.path.dirname(os.path.abspath(out_path))
    parts = out_path + ".parts"
    eng = SparkEngine(scratch, master)
    try:
        eng.spark.read.parquet(*map(os.path.abspath, files)).createOrReplaceTempView("archive_entries")
        eng.spark.sql(SPARK_EXPORT).coalesce(1).write.mode("overwrite").parquet(parts)
    finally:
        eng.close()
    written = sorted(f for f in os.listdir(parts) if f.startswith("part-") and f.endswith(".parquet"))
    if len(written) != 1:
        raise ArchiveError(f"archive export: Spark wrote {len(written)} files, expected one")
    os.replace(os.path.join(parts, written[0]), out_path)
    shutil.rmtree(parts, ignore_errors=True)
    return pq.ParquetFile(out_path).metadata.num_rows


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
