"""Canonical codes: the project's Cython codec over Arrow batches, so a pack scanned in two
forms is one pack. One function, used by both engines: the DuckDB run calls it on the driver as
a pre-pass; the Spark run hands it to `mapInArrow`, so there it runs on the executors.
"""
from __future__ import annotations

import pyarrow as pa

from tracecode import codec


def profile_of(config) -> "codec.Profile":
    """The scanner profile of a configuration (rules/settlement.py, as the server's verifier
    builds it), so a code parses here exactly as it parses at REPLAY."""
    from tracecode.rules.settlement import RulesSettings, scan_profile
    return scan_profile(RulesSettings.from_config(config))


def canonical_keys(codes: pa.Array | pa.ChunkedArray, profile) -> pa.Array:
    """Per raw scan its canonical key ('' when the codec finds it malformed): the codec's key-only
    path (keys_many), no 7-tuple per scan."""
    return pa.array(codec.keys_many(codes.to_pylist(), profile), pa.string())


def with_keys(batch: pa.RecordBatch, profile) -> pa.RecordBatch:
    """A batch of lines (column `code`) with its column `ckey` added."""
    return pa.RecordBatch.from_arrays([*batch.columns, canonical_keys(batch.column("code"), profile)],
                                      names=[*batch.schema.names, "ckey"])


def map_batches(profile):
    """The mapInArrow function: an iterator of batches in, the same batches with keys out."""
    def run(batches):
        for b in batches:
            yield with_keys(b, profile)
    return run
