"""The two engines behind one small interface: DuckDB embedded (default) and Apache Spark.

Both run the same steps of sql.py: DuckDB as written, Spark after SQLGlot has written them in
Spark SQL. The engine-specific part is only how tables get in and out, and where the per-line
Python runs (reading, checks, pseudonyms, codec: staging.py; the split-pack pass: splitpack.py):
in worker processes on this machine (DuckDB), or on the executors (Spark: `mapInArrow` per file,
`applyInArrow` per pack).
"""
from __future__ import annotations

import os
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import sqlglot

from . import splitpack, staging
from .sql import Step


PROFILE = bool(os.environ.get("TRACECODE_LEADS_PROFILE"))


def log_timing(what: str, since: float) -> None:
    """TRACECODE_LEADS_PROFILE=1: seconds per step on stderr (docs/leads.md, Performance)."""
    if PROFILE:
        print(f"[leads] {what}: {time.perf_counter() - since:.2f} s", file=sys.stderr, flush=True)


class DuckDBEngine:
    name = "duckdb"

    # 1.2 GB: at 10M lines the verdict steps spilled over 4 GB to the work directory under 800 MB
    # (a third of the run's time); the run's peak stays under 2 GB because the staging workers
    # are gone before DuckDB starts and DuckDB is closed before the outputs are built (run.py).
    # 1.4 GB was faster still but put a 10M run's peak at 1.95 GB.
    def __init__(self, workdir: str, memory_limit: str = "1200MB", threads: int | None = None):
        self.workdir = workdir
        self.memory_limit = memory_limit
        self.threads = threads
        self._con = None

    @property
    def con(self):
        """The DuckDB connection, made on first use: after the read stage, whose worker processes
        are forked (staging.py) and must not inherit DuckDB's threads."""
        if self._con is None:
            import duckdb
            # In memory, spilling to the work dir past memory_limit: a database file would write
            # every intermediate table to disk for nothing.
            con = duckdb.connect(":memory:")
            con.execute(f"SET memory_limit = '{self.memory_limit}'")
            con.execute(f"SET temp_directory = '{os.path.join(self.workdir, 'spill')}'")
            con.execute("SET preserve_insertion_order = false")
            if self.threads:
                con.execute(f"SET threads = {int(self.threads)}")
            self._con = con
        return self._con

    def register(self, name: str, table: pa.Table) -> None:
        self.con.register("_incoming", table)
        self.con.execute(f"CREATE OR REPLACE TABLE {name} AS SELECT * FROM _incoming")
        self.con.unregister("_incoming")

    def read_inputs(self, files, issuance, limits, pseudonyms, profile, progress=None):
        """The read stage (staging.py): every file checked, pseudonymised and canonicalised in a
        worker process here, staged as Parquet; `lines` and `issuance_rows` are views of the
        staged files (DuckDB scans compressed Parquet faster than it would spill an uncompressed
        in-memory copy of the largest tables of a run). (usable lines, rejected rows)."""
        staged_lines, staged_iss = staging.stage_all(files, issuance, self.workdir, limits, pseudonyms, profile,
                                                     progress=progress)
        self.load_parquet("lines", [p for st in staged_lines for p in st.paths])
        iss = [p for st in staged_iss for p in st.paths]
        if iss:  # none: a resumed incremental run without new records (state.py loads issuance_rows)
            self.load_parquet("issuance_rows", iss)
        return (sum(st.rows for st in staged_lines), [e for st in staged_lines + staged_iss for e in st.errors],
                iss)

    def split_verdicts(self, select: str) -> None:
        """split_v and split_state: the split-pack pass (splitpack.judge_with_state) over the rows
        of `select`, here: each line's verdict, and each pack's units used after it (state.py)."""
        verdicts, state = splitpack.judge_with_state(self.fetch(select))
        self.register("split_v", verdicts)
        self.register("split_state", state)

    def load_parquet(self, name: str, paths: list[str]) -> None:
        files = ", ".join(f"'{p}'" for p in paths)
        self.con.execute(f"DROP VIEW IF EXISTS {name}")
        self.con.execute(f"CREATE VIEW {name} AS SELECT * FROM read_parquet([{files}])")

    def materialise(self, step: Step) -> None:
        t = time.perf_counter()
        self.con.execute(f"CREATE OR REPLACE {'VIEW' if step.view else 'TABLE'} {step.name} AS {step.select}")
        log_timing(step.name, t)

    def drop(self, *names: str) -> None:
        views = {r[0] for r in self.con.execute("SELECT view_name FROM duckdb_views() WHERE NOT internal").fetchall()}
        for n in names:
            self.con.execute(f"DROP {'VIEW' if n in views else 'TABLE'} IF EXISTS {n}")

    def fetch(self, select: str) -> pa.Table:
        t = time.perf_counter()
        out = self.con.sql(select).to_arrow_table()
        log_timing("fetch " + " ".join(select.split())[:60], t)
        return out

    def close(self) -> None:
        if self._con is not None:
            self._con.close()


def _is_local(master: str) -> bool:
    return master == "local" or master.startswith("local[")


def _on_loopback(master: str) -> bool:
    """local[N], or a standalone master on this host's loopback (the tests' cluster)."""
    if _is_local(master):
        return True
    host = master.split("://", 1)[-1].split(",")[0].rsplit(":", 1)[0]
    return host in ("127.0.0.1", "localhost", "[::1]")


class SparkEngine:
    """`master`: local[N] (one JVM here), or spark://HOST:PORT (a standalone cluster: executors
    are JVMs of their own, started by the workers, each with its own Python workers).

    On a cluster the executors' Python workers unpickle the read stage's mapInArrow function and
    the split-pack pass, which name tracecode.leads.staging and .splitpack: they need the tracecode package importable by the Python that
    spark.pyspark.python names (here the driver's own interpreter; on other hosts the same path
    must hold the same install, docs/leads.md, Engines). The driver's memory and the executors'
    are Spark's own settings (SPARK_CONF_DIR/spark-defaults.conf: spark.driver.memory must be
    known before the driver's JVM starts, so it is not set here)."""
    name = "spark"

    def __init__(self, workdir: str, master: str = "local[2]", app: str = "tracecode-leads"):
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        loopback = _on_loopback(master)
        if loopback:
            os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")  # loopback only
        from pyspark.sql import SparkSession
        self.workdir = os.path.abspath(workdir)
        builder = (SparkSession.builder.master(master).appName(app)
                   .config("spark.sql.shuffle.partitions", "4")
                   .config("spark.ui.enabled", "false")
                   .config("spark.ui.showConsoleProgress", "false")  # the run has its own progress bar
                   .config("spark.sql.session.timeZone", "UTC")
                   .config("spark.sql.execution.arrow.pyspark.enabled", "true")
                   # The executors' Python (the codec's workers there): the same
                   # interpreter, so the same tracecode install, as the driver's.
                   .config("spark.pyspark.python", os.environ["PYSPARK_PYTHON"])
                   .config("spark.local.dir", os.path.join(self.workdir, "spark")))
        if loopback:
            # A driver on another host's cluster must be reachable by its executors: there
            # the host comes from SPARK_LOCAL_IP / spark-defaults.conf, not from here.
            builder = (builder.config("spark.driver.host", "127.0.0.1")
                       .config("spark.driver.bindAddress", "127.0.0.1"))
        self.spark = builder.getOrCreate()
        self.spark.sparkContext.setLogLevel("ERROR")
        if _is_local(master):
            # Only local mode: Spark wants a cluster's checkpoint dir on a shared file system,
            # and the engine's checkpoints are local ones (localCheckpoint) anyway.
            self.spark.sparkContext.setCheckpointDir(os.path.join(self.workdir, "spark-checkpoints"))

    @staticmethod
    def spark_sql(select: str) -> str:
        return sqlglot.transpile(select, read="duckdb", write="spark")[0]

    def _view(self, name: str, df) -> None:
        df.createOrReplaceTempView(name)

    def register(self, name: str, table: pa.Table) -> None:
        path = os.path.join(self.workdir, f"spark-in-{name}.parquet")
        pq.write_table(table, path)
        self._view(name, self.spark.read.parquet(path))

    def read_inputs(self, files, issuance, limits, pseudonyms, profile, progress=None):
        """The read stage on the executors (staging.spark_stage): one task per file reads, checks,
        pseudonymises and canonicalises it and stages it as Parquet in the work directory; only
        the counts and the rejected rows come back. `lines`, `issuance_rows`: the staged files."""
        staged_lines, staged_iss = staging.spark_stage(self.spark, files, issuance, self.workdir, limits,
                                                       pseudonyms, profile)
        self.load_parquet("lines", [st.path for st in staged_lines])
        if staged_iss:  # none: a resumed incremental run without new records (state.py loads issuance_rows)
            self.load_parquet("issuance_rows", [st.path for st in staged_iss])
        rows = sum(st.rows for st in staged_lines)
        if progress:
            progress(rows)
        return rows, [e for st in staged_lines + staged_iss for e in st.errors], [st.path for st in staged_iss]

    def split_verdicts(self, select: str) -> None:
        """split_v grouped per pack on the executors: applyInArrow hands splitpack.judge one
        pack's lines at a time (its rule walks one pack in `ord` order); the global ORDER BY of
        `select` is left out, each group is sorted instead."""
        tree = sqlglot.parse_one(self.spark_sql(select), read="spark")
        tree.set("order", None)
        rows = self.spark.sql(tree.sql(dialect="spark"))
        out = rows.groupBy("ckey").applyInArrow(splitpack.judge_pack, splitpack.PACK_SCHEMA).localCheckpoint(eager=True)
        self._view("split_v", out.select("ord", "verdict", "first_ord"))
        # Every line of a pack carries the pack's state after it: one row per pack that has units used.
        self._view("split_state", out.where("used > 0").select("ckey", "used", "first_site", "pack_first_ord")
                   .withColumnRenamed("pack_first_ord", "first_ord").dropDuplicates(["ckey"]))

    # Absolute paths: the executors read the files themselves, from their own working directory
    # (on one host that is all they need; on several, the work dir must be on a shared file system).
    def load_parquet(self, name: str, paths: list[str]) -> None:
        self._view(name, self.spark.read.parquet(*map(os.path.abspath, paths)))

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
