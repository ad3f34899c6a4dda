"""Structured logs on stderr: JSON lines for machines, a compact line for people at a terminal.

Extra fields travel in ``extra={"fields": {...}}``. Nothing secret is ever passed to a logger:
callers log key_ids, uids, sizes and outcomes, never plaintext, seeds, keys or tokens.
"""

from __future__ import annotations

import json
import logging
import sys
import traceback
from datetime import UTC, datetime
from typing import Any

_RESERVED = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"fields", "message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    fields = dict(getattr(record, "fields", None) or {})
    fields.update({k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")})
    return {k: v for k, v in fields.items() if v is not None}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        doc.update(_fields(record))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class ConsoleFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        when = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extra = " ".join(f"{k}={v}" for k, v in _fields(record).items())
        text = f"{record.getMessage()}" + (f"  {extra}" if extra else "")
        # One record, one line: request-supplied text must not be able to forge further lines.
        text = text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text
        line = f"{when} {record.levelname:<7} {text}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def frames(exc: BaseException) -> str:
    """Where ``exc`` was raised, as stack frames, without its message: the message of an exception
    kleidi did not raise on purpose may quote the data it was handed (a seed, a backend's answer)."""
    return "".join(traceback.format_tb(exc.__traceback__))


def configure(level: str = "info", fmt: str = "auto") -> None:
    if fmt == "auto":
        fmt = "console" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("kleidi").setLevel(level.upper())
