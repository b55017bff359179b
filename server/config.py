"""Configuration: one dataclass, filled from defaults < config file < environment < flags.

Every field can be set as `--field-name` on `tracecode serve`, as `TRACECODE_FIELD_NAME` in the
environment, or as `field_name = ...` in a TOML file given by `--config` / `TRACECODE_CONFIG`.
`tracecode serve --help` lists every field with its help text and default. The README's
configuration table lists the main settings only, in its own words; tests/test_ops_config.py
checks that each of its rows names a field here (as its `--flag`) and shows that field's default.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any, Mapping


def _opt(default, help: str):
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class Config:
    listen: str = _opt("127.0.0.1:50051", "gRPC listen address host:port")
    redis_url: str = _opt("", "Redis URL (redis://, rediss://, unix://); empty starts an embedded redis-server")
    data_dir: str = _opt("./tracecode-data", "directory of the embedded redis-server's AOF files")
    redis_appendfsync: str = _opt("everysec", "embedded Redis AOF fsync: always (safest), everysec, no")
    redis_restart_s: float = _opt(0.5, "embedded Redis: wait before restarting it after it died, seconds; "
                                       "doubles on each quick death, up to 10 s")
    redis_timeout_s: float = _opt(2.0, "socket timeout of each Redis call, seconds")
    redis_cluster: bool = _opt(False, "--redis-url names a node of a Redis Cluster (keys are hash-tagged per code)")
    min_replicas_acked: int = _opt(0, "acknowledge a dispense only once this many replicas have it (Redis WAIT); 0 = async")
    replica_ack_timeout_ms: int = _opt(500, "how long to wait for those replicas before answering UNAVAILABLE")
    reservation_s: float = _opt(30.0, "cluster ALL_OR_NOTHING over several slots: how long prepared units stay reserved")
    key_prefix: str = _opt("tc", "prefix of every Redis key")
    code_buckets: int = _opt(64, "hashes per hash tag (1024 tags); fixed for a data set's life (its marker): "
                                 "codes / 1024 / 300 at full size (docs/scaling.md)")
    metrics_port: int = _opt(9464, "Prometheus /metrics HTTP port on the listen host; 0 disables")
    workers: int = _opt(0, "server processes sharing the port (SO_REUSEPORT) under one supervising parent; "
                           "0 = one per core (docs/performance.md)")
    threads: int = _opt(16, "gRPC handler threads per process")
    timezone: str = _opt("Asia/Shanghai", "issuer's calendar: expiry is judged on the settlement's date here")
    clock_skew_s: int = _opt(600, "accepted difference between a POS settlement time and the server clock")
    return_window_days: float = _opt(10.0, "how long after a settlement its site may reverse it")
    max_lines: int = _opt(200, "most lines in one settlement")
    max_code_length: int = _opt(512, "longest raw scan accepted, characters")
    max_units: int = _opt(100000, "largest units value on a line")
    cn_prefixes: str = _opt("8", "leading digits admitted for 20-digit codes; empty admits any")
    gs_substitutes: str = _opt("", "comma-separated strings a scanner sends instead of ASCII 29 (e.g. '|' or '<GS>')")
    history_max: int = _opt(256, "events kept per code for GetCodeHistory (older ones are counted, not kept)")
    audit_max: int = _opt(1_000_000, "approximate length of each audit stream partition")
    audit_archive_bound: int = _opt(0, "with an archiver (tracecode archive): streams are trimmed at its watermark "
                                       "and only past this many entries per stream are unarchived ones dropped "
                                       "(counted, logged); 0 = no archive: MAXLEN ~ audit_max (docs/archive.md)")
    settlement_ttl_days: int = _opt(40, "how long settlement records (idempotency, return ledger) are kept: "
                                        "past the return window, for late retries and bulk checks")
    grace_s: float = _opt(10.0, "on SIGTERM, time in-flight calls get to finish")
    log_level: str = _opt("INFO", "DEBUG, INFO, WARNING, ERROR")
    log_json: bool = _opt(False, "log one JSON object per line")
    # Security (server/auth.py, docs/security.md).
    auth: str = _opt("none", "client authentication: mtls (client certificates), token (HS256 bearer tokens), "
                             "none (no identities: local development and the demo only)")
    tls_cert: str = _opt("", "server certificate chain (PEM) for TLS on the gRPC port; re-read when it changes")
    tls_key: str = _opt("", "private key (PEM) of tls_cert")
    tls_client_ca: str = _opt("", "auth = mtls: CA certificate(s) (PEM) that sign client certificates")
    auth_token_secret_file: str = _opt("", "auth = token: file holding the HMAC secret (at least 32 bytes)")
    admin_identities: str = _opt("", "comma-separated admin names allowed to act as admin; empty = any "
                                     "admin:<name> identity the CA or token secret vouches for")
    max_message_bytes: int = _opt(4 * 1024 * 1024, "largest gRPC message received; larger is RESOURCE_EXHAUSTED")
    max_concurrent_rpcs: int = _opt(1000, "calls in progress at once per process; more are RESOURCE_EXHAUSTED (0 = no cap)")
    rate_limit_rps: float = _opt(0.0, "calls per second per client identity (stream messages are slowed, "
                                      "unary calls refused with RESOURCE_EXHAUSTED); 0 = off")
    rate_limit_burst: int = _opt(100, "calls a client may make at once above rate_limit_rps")
    redis_username: str = _opt("", "Redis ACL user (else the URL's, else default)")
    redis_password_file: str = _opt("", "file holding the Redis password (kept off command lines and URLs)")
    redis_tls_ca: str = _opt("", "CA (PEM) that signs the Redis server's certificate (rediss:// URLs)")
    redis_tls_cert: str = _opt("", "client certificate (PEM) for Redis with tls-auth-clients")
    redis_tls_key: str = _opt("", "private key (PEM) of redis_tls_cert")
    # Insured persons and sanctions (server/sanction_service.py, docs/security.md).
    pseudonym_key_file: str = _opt("", "key file of insured-person pseudonyms (KEY_ID:HEX, mode 0600), the same "
                                       "file on every server of a deployment; empty: data_dir/pseudonym.key, "
                                       "generated on the first start")
    # The receiving check (入库核验, server/receiving.py, docs/verification.md).
    receipts_required: bool = _opt(False, "every pack sold must have been received by the selling site (ReceivePacks): "
                                          "a sale of one no site received carries a NOT_RECEIVED notice")
    sanction_view_max_age_s: float = _opt(1.0, "cluster: a server whose sanction view is older than this "
                                               "settles nothing (UNAVAILABLE) and reports NOT_SERVING")
    # The live rules at the counter (rules/live.py, docs/verification.md "Live rules").
    live_rules: bool = _opt(True, "judge the live rules (STOCKPILING, RESALE_SOURCE) at each settlement: notices "
                                  "on the answer, or refusals where models_config says so")
    models_config: str = _opt("", "the models' TOML file, the same one `tracecode leads --config` reads: thresholds "
                                  "and versions of the batch models and of the live rules, and per live rule "
                                  "live = NOTICE (default), REFUSE or OFF; empty: the defaults")

    def replace(self, **changes) -> "Config":
        return dataclasses.replace(self, **changes)


def _coerce(f: dataclasses.Field, value: Any) -> Any:
    if isinstance(value, str):
        if f.type in ("bool", bool):
            v = value.strip().lower()
            if v not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(f"{f.name}: expected a boolean, got {value!r}")
            return v in ("1", "true", "yes", "on")
        if f.type in ("int", int):
            return int(value)
        if f.type in ("float", float):
            return float(value)
    return value


def load(flags: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None,
         config_file: str | None = None) -> Config:
    """Merge defaults < file < environment < flags (flags given as field -> value, None = unset)."""
    env = os.environ if env is None else env
    fields = {f.name: f for f in dataclasses.fields(Config)}
    values: dict[str, Any] = {}
    path = config_file or env.get("TRACECODE_CONFIG")
    if path:
        with open(path, "rb") as fh:
            for k, v in tomllib.load(fh).items():
                if k not in fields:
                    raise ValueError(f"{path}: unknown setting {k!r}")
                values[k] = v
    for name in fields:
        v = env.get("TRACECODE_" + name.upper())
        if v is not None:
            values[name] = v
    for name, v in (flags or {}).items():
        if v is not None and name in fields:
            values[name] = v
    config = Config(**{k: _coerce(fields[k], v) for k, v in values.items()})
    _check(config)
    return config


def _check(config: Config) -> None:
    """Settings that only make sense together, refused at start with the reason."""
    if config.settlement_ttl_days < config.return_window_days:
        raise ValueError(f"settlement_ttl_days ({config.settlement_ttl_days}) must cover return_window_days "
                         f"({config.return_window_days}): a return needs its settlement's record")
    if config.audit_archive_bound < 0:
        raise ValueError(f"audit_archive_bound ({config.audit_archive_bound}): entries per stream, or 0 for no archive")
    # code_buckets is checked where it is used (store.keys.KeySpace), and against the data set's marker.


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per Config field; unset flags stay None so lower layers show through."""
    parser.add_argument("--config", help="TOML configuration file (also TRACECODE_CONFIG)")
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None,
                                help=f.metadata["help"])
        else:
            parser.add_argument(flag, dest=f.name, default=None,
                                help=f"{f.metadata['help']} (default: {f.default!r})")


def from_args(args: argparse.Namespace) -> Config:
    return load(vars(args), config_file=getattr(args, "config", None))
