"""Structured logging: one event per line, as ``key=value`` text or JSON."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "event_fields"


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log ``event`` with structured ``fields`` (rendered by the configured formatter)."""
    if logger.isEnabledFor(level):
        logger.log(level, event, extra={_FIELDS: fields})


class JsonFormatter(logging.Formatter):
    """``{"ts": ..., "level": ..., "logger": ..., "event": ..., <fields>}`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        doc.update(getattr(record, _FIELDS, {}))
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """``2024-01-01T00:00:00Z level logger event key=value ...`` per line."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{ts}Z", record.levelname.lower(), record.name, record.getMessage()]
        for key, value in getattr(record, _FIELDS, {}).items():
            parts.append(f"{key}={json.dumps(value, default=str)}")
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(fmt: str = "text", level: str = "info") -> None:
    """Send the ``atdirectory`` loggers to stderr in ``fmt`` ("text" or "json")."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    logger = logging.getLogger("atdirectory")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
