"""tracecode.leads: the campaign's big-data models (疑点线索) over settlement history.

    files --inputs--> staged Arrow tables (+ errors) --canon--> canonical codes (project codec)
          --engine (DuckDB | Spark) runs sql.py--> per-line verdicts (REPLAY's columnar twin)
          --models--> evidence --assemble--> leads.csv/.parquet, evidence.csv/.parquet, network.png

Modules: `config` (thresholds, versions, risk cut-offs: data), `inputs` (readers over
clients/files.py and Parquet, row checks, pseudonyms), `staging` (inputs in worker processes,
staged as Parquet), `canon` (codec over Arrow batches), `synth` (generated histories),
`sql` (one definition per model, DuckDB dialect, transpiled for Spark by SQLGlot), `engines`
(DuckDB and Spark behind one small interface), `splitpack` (the sequential pass for split
packs), `robust` (ABNORMAL_SITE's peer statistics), `assemble` (lead rows, ids, summaries),
`network` (the picture), `run` (the pipeline), `cli` (`tracecode leads`).

May import: the standard library, pyarrow, duckdb, sqlglot, pyspark (engine spark only),
networkx, matplotlib, tqdm; from tracecode: `codec`, `clients.files`, `clients.reverify`
(its settled_at parser), `clients.admin` (its row checks), and from `server` only the pieces
that define the rules (`pseudonym`, `config.Config`, `issuance`, `api.convert.issuance_input`,
`verifier` for its profile and validation, built without a store). It never talks to Redis or
a server.
"""
