"""Logging of the service: one handler on the root logger, JSON or text, and the log context of
the request being handled (its site and settlement id on every line logged while handling it).
The API package sets the context (api.interceptors.LogContextInterceptor); this module only
reads it, so it imports neither grpc nor redis.

May import: the standard library, the rules core and tracecode.server.config.
"""
from __future__ import annotations

import contextvars
import json
import logging
import sys
import unicodedata
from contextlib import contextmanager
from typing import Iterator

from tracecode.rules.text import REFUSED_CATEGORIES

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


def escape(text: str) -> str:
    """Text as one log line shows it: every character the rules core refuses in stored text
    (controls, format and bidirectional-override characters, line separators) and the backslash
    written as an escape, so no value a client sent can end a line or forge the next one."""
    if text.isascii() and text.isprintable() and "\\" not in text:
        return text
    return "".join(_escaped(ch) for ch in text)


def _escaped(ch: str) -> str:
    if ch == "\\":
        return "\\\\"
    if unicodedata.category(ch) in REFUSED_CATEGORIES:
        n = ord(ch)
        return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"
    return ch


class TextFormatter(logging.Formatter):
    """One line per record: the message escaped (escape()); a traceback, the only multi-line part
    and written by Python, follows with every line indented, so no line of it can start like a
    record."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = escape(record.message)
        return super().formatMessage(record)

    def formatException(self, ei) -> str:
        return "\n".join("    " + ln for ln in super().formatException(ei).splitlines())

    def formatStack(self, stack_info: str) -> str:
        return "\n".join("    " + ln for ln in stack_info.splitlines())

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


