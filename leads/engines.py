"""The two engines behind one small interface: DuckDB embedded (default) and Apache Spark.

Both run the same steps of sql.py: DuckDB as written, Spark after SQLGlot has written them in
Spark SQL. The engine-specific part is only how tables get in and out, and where the codec runs:
on the driver as a pre-pass (DuckDB), or in `mapInArrow` on the executors (Spark).
"""
from __future__ import annotations

import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import sqlglot

from . import canon
from .sql import Step


PROFILE = bool(os.environ.get("TRACECODE_LEADS_PROFILE"))


def _profile(what: str, since: float) -> None:
    """TRACECODE_LEADS_PROFILE=1: seconds per step on stderr (docs/leads.md, Performance)."""
    if PROFILE:
        print(f"[leads] {what}: {time.perf_counter() - since:.2f} s", file=sys.stderr, flush=True)


class DuckDBEngine:
    name = "duckdb"

    def __init__(self, workdir: str, memory_limit: str = "800MB", threads: int | None = None):
        import duckdb
        # In memory, spilling to the work dir past memory_limit: a database file would write
        # every intermediate table to disk for nothing.
        self.con = duckdb.connect(":memory:")
        self.workdir = workdir
        self.con.execute(f"SET memory_limit = '{memory_limit}'")
        self.con.execute(f"SET temp_directory = '{os.path.join(workdir, 'spill')}'")
        self.con.execute("SET preserve_insertion_order = false")
        if threads:
            self.con.execute(f"SET threads = {int(threads)}")

    def register(self, name: str, table: pa.Table) -> None:
        self.con.register("_incoming", table)
        self.con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM _incoming")
        self.con.unregister("_incoming")

    keys_in_staging = True  # the codec runs as a pre-pass while staging (staging.py)

    # The staged files stay on disk as views: DuckDB scans compressed Parquet faster than it would
    # spill an uncompressed in-memory copy of them (the largest tables of a run).
    def load_lines(self, paths: list[str], profile) -> None:
        self.load_parquet("lines", paths)

    def load_parquet(self, name: str, paths: list[str]) -> None:
        files = ", ".join(f"'{p}'" for p in paths)
        self.con.execute(f"DROP VIEW IF EXISTS {name}")
        self.con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{files}])")

    def materialise(self, step: Step) -> None:
        t = time.perf_counter()
        self.con.execute(f"CREATE OR REPLACE TABLE {step.name} AS {step.select}")
        _profile(step.name, t)

    def drop(self, *names: str) -> None:
        views = {r[0] for r in self.con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        for n in names:
            self.con.execute(f"DROP {'VIEW' if n in views else 'TABLE'} IF EXISTS {n}")

    def fetch(self, select: str) -> pa.Table:
        t = time.perf_counter()
        out = self.con.sql(select).to_arrow_table()
        _profile("fetch " + " ".join(select.split())[:60], t)
        return out

    def close(self) -> None:
        self.con.close()


class SparkEngine:
    name = "spark"

    def __init__(self, workdir: str, master: str = "local[2]", app: str = "tracecode-leads"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # loopback only
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        from pyspark.sql import SparkSession
        self.workdir = workdir
        self.spark = (SparkSession.builder.master(master).appName(app)
                      .config("spark.sql.shuffle.partitions", "4")
                      .config("spark.ui.enabled", "false")
                      .config("spark.driver.host", "127.0.0.1")
                      .config("spark.driver.bindAddress", "127.0.0.1")
                      .config("spark.sql.session.timeZone", "UTC")
                      .config("spark.sql.execution.arrow.pyspark.enabled", "true")
                      .config("spark.local.dir", os.path.join(workdir, "spark"))
                      .getOrCreate())
        self.spark.sparkContext.setLogLevel("ERROR")
        self.spark.sparkContext.setCheckpointDir(os.path.join(workdir, "spark-checkpoints"))

    @staticmethod
    def spark_sql(select: str) -> str:
        return sqlglot.transpile(select, read="duckdb", write="spark")[0]

    def _view(self, name: str, df) -> None:
        df.createOrReplaceTempView(name)

    def register(self, name: str, table: pa.Table) -> None:
        path = os.path.join(self.workdir, f"spark-in-{name}.parquet")
        pq.write_table(table, path)
        self._view(name, self.spark.read.parquet(path))

    keys_in_staging = False  # the codec runs on the executors

    def load_lines(self, paths: list[str], profile) -> None:
        """The codec runs where the data is: mapInArrow on the executors."""
        from pyspark.sql.types import StringType, StructField, StructType
        df = self.spark.read.parquet(*paths)
        schema = StructType(df.schema.fields + [StructField("ckey", StringType(), True)])
        self._view("lines", df.mapInArrow(canon.map_batches(profile), schema).localCheckpoint(eager=True))

    def load_parquet(self, name: str, paths: list[str]) -> None:
        self._view(name, self.spark.read.parquet(*paths))

    def materialise(self, step: Step) -> None:
        self._view(step.name, self.spark.sql(self.spark_sql(step.select)).localCheckpoint(eager=True))

    def drop(self, *names: str) -> None:
        for n in names:
            self.spark.catalog.dropTempView(n)

    def fetch(self, select: str) -> pa.Table:
        return self.spark.sql(self.spark_sql(select)).toArrow()

    def close(self) -> None:
        self.spark.stop()


KINDS = {"duckdb": DuckDBEngine, "spark": SparkEngine}


def kind(name: str):
    if name not in KINDS:
        raise ValueError(f"unknown engine {name!r}: duckdb or spark")
    return KINDS[name]


def make(name: str, workdir: str, spark_master: str = "local[2]"):
    return DuckDBEngine(workdir) if kind(name) is DuckDBEngine else SparkEngine(workdir, spark_master)
