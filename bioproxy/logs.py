"""
Log formats for twistd. "text" is twistd's own; "json" is one JSON object a
line, which journald and log shippers read without a parser of their own.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import FileLogObserver, ILogObserver, formatEvent

FORMATS = ("text", "json")


# twisted.logger's levels as syslog priorities, which journald files by.
PRIORITIES = {"debug": 7, "info": 6, "warn": 4, "error": 3, "critical": 2}

_PLAIN = (str, int, float, bool, type(None))


def jsonLine(event: dict[str, Any]) -> str:
    level = getattr(event.get("log_level"), "name", "info")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(
            timespec="milliseconds"
        ),
        "level": level,
        "priority": PRIORITIES.get(level, 6),
        "system": event.get("log_namespace") or event.get("log_system") or "-",
        "message": formatEvent(event),
    }
    # The event's own fields (prefix, slot, status, ms, ...), which the
    # message was formatted from: a shipper can filter on them. A field that
    # is the whole message (the access line is made before it is logged) is
    # not written twice.
    for key, value in event.items():
        if (
            not key.startswith("log_")
            and key not in record
            and isinstance(value, _PLAIN)
            and value != record["message"]
        ):
            record[key] = value
    failure = event.get("log_failure")
    if failure is not None:
        record["traceback"] = failure.getTraceback()
    return json.dumps(record, ensure_ascii=False) + "\n"


def observer(format: str, out: IO[str] | None = None) -> ILogObserver | None:
    """The observer for format, or None for twistd's default text."""
    if format == "json":
        return FileLogObserver(out or sys.stdout, jsonLine)
    return None
