"""tracecode.archive: the audit streams archived exactly once into a Parquet data set partitioned
by settlement date (docs/archive.md). dataset.py the files; archiver.py the process; cli.py its
subcommands. The Redis side lives in the store (server/store/archive.py): only the store speaks
Redis."""
