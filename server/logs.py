"""Logging of the service: one handler on the root logger, JSON or text, and the log context of
the request being handled (its site and settlement id on every line logged while handling it).
The API package sets the context (api.interceptors.LogContextInterceptor); this module only
reads it, so it imports neither grpc nor redis.

May import: the standard library and tracecode.server.config.
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
from contextlib import contextmanager
from typing import Iterator

from .config import Config

# (site_id, settlement_id) of the request the current thread is handling.
_CALL: contextvars.ContextVar[tuple[str, str] | None] = contextvars.ContextVar("tracecode_call", default=None)
MAX_ID = 64  # ids are not validated yet when the context is set: never log more than this


@contextmanager
def call_context(site_id: str, settlement_id: str) -> Iterator[None]:
    """Within it, every log record carries these ids (when either is non-empty)."""
    ids = (site_id[:MAX_ID], settlement_id[:MAX_ID]) if (site_id or settlement_id) else None
    token = _CALL.set(ids)
    try:
        yield
    finally:
        _CALL.reset(token)


class LogContextFilter(logging.Filter):
    """Adds site_id / settlement_id to records emitted while a request names them."""

    def filter(self, record: logging.LogRecord) -> bool:
        ids = _CALL.get()
        if ids is not None and not hasattr(record, "site_id"):
            record.site_id, record.settlement_id = ids
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"), "level": record.levelname,
               "logger": record.name, "msg": record.getMessage()}
        for k in ("site_id", "settlement_id"):
            if hasattr(record, k):
                doc[k] = getattr(record, k)
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if hasattr(record, "site_id"):
            # repr: the ids are not validated yet when a line about them is logged
            line += f" site_id={record.site_id!r} settlement_id={getattr(record, 'settlement_id', '')!r}"
        return line


def setup_logging(config: Config) -> None:
    """One handler on the root logger, JSON or text, carrying the site and settlement id of the
    request being handled (LogContextFilter) on every line logged while handling it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if config.log_json else TextFormatter())
    handler.addFilter(LogContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(config.log_level.upper())


