"""Logging set-up shared by the services: readable text for a terminal, JSON lines for journald
or a log shipper (``--log-format json``)."""

from __future__ import annotations

import json
import logging
import sys
import time

from fedasync_iot.models._errors import ConfigError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def check_level(level: str, *, key: str = "log_level") -> str:
    """`level` in upper case if it is one of `LOG_LEVELS` (any case), else a `ConfigError`."""
    if level.upper() not in LOG_LEVELS:
        raise ConfigError(f"{key} must be one of {', '.join(LOG_LEVELS)}, got {level!r}",
                          key="log_level")
    return level.upper()


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    level = check_level(level)
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        formatter = logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                      "%Y-%m-%dT%H:%M:%S")
        formatter.converter = time.gmtime
        handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
