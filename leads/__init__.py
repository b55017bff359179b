"""tracecode.leads: the campaign's big-data models (疑点线索) over settlement history.

    files --inputs--> staged Arrow tables (+ errors) --canon--> canonical codes (project codec)
          --engine (DuckDB | Spark) runs sql.py--> per-line verdicts (REPLAY's columnar twin)
          --models--> evidence --assemble--> leads.csv/.parquet, evidence.csv/.parquet, network.png

Modules: `config` (thresholds, versions, risk cut-offs: data), `inputs` (readers over
clients/files.py and Parquet, row checks, pseudonyms), `staging` (the read stage: each file read,
checked, pseudonymised and canonicalised in a worker process (DuckDB) or an executor task (Spark),
staged as Parquet), `canon` (codec over Arrow batches), `synth` (generated histories),
`sql` (one definition per model, DuckDB dialect, transpiled for Spark by SQLGlot), `engines`
(DuckDB and Spark behind one small interface), `splitpack` (the sequential pass for split
packs), `robust` (ABNORMAL_SITE's peer statistics), `assemble` (lead rows, ids, summaries),
`network` (the picture), `state` (incremental runs: the state a run saves and the next resumes),
`run` (the pipeline), `cli` (`tracecode leads`).

May import: the standard library, pyarrow, duckdb, sqlglot, pyspark (engine spark only),
networkx, matplotlib, tqdm; from tracecode: the rules core (`tracecode.rules`: verdicts and their
precedence, settlement and issuance validation, row checks, insured ids and pseudonyms, cells),
`codec`, `clients.files` (the file readers `tracecode load` and `reverify` share), and
`server.config.Config` (the deployment's settings). Never the server's API, store, app or
command line (import-linter); it never talks to Redis or a server.
"""
