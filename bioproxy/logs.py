# -*- test-case-name: tests.unit.test_logs -*-
"""
Log formats for twistd. "text" is twistd's own line; "json" is one JSON
object a line, which journald and log shippers read without a parser of
their own.

Both are written here when the log goes to standard output (twistd -n, as
under systemd), because twistd's formatter took about a sixteenth of a
chat's work, once per request for the access line: it works out the time
zone and formats the time anew for each line, and parses each format
string. Here the time is formatted once a second, and a message that is
one field ("{access}") is that field. A --logfile or --syslog is left to
twistd.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime, timezone
from typing import IO, Any

from twisted.logger import (
    FileLogObserver,
    ILogObserver,
    formatEvent,
    formatEventAsClassicLogText,
    formatTime,
)
from zope.interface import implementer

FORMATS = ("text", "json")


# twisted.logger's levels as syslog priorities, which journald files by.
PRIORITIES = {"debug": 7, "info": 6, "warn": 4, "error": 3, "critical": 2}

_PLAIN = (str, int, float, bool, type(None))


class _Seconds:
    """formatTime's text for a time, worked out once a second."""

    def __init__(self) -> None:
        self.second: int | None = None
        self.text = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when)
        if second != self.second:
            self.second, self.text = second, formatTime(when)
        return self.text


_seconds = _Seconds()


def message(event: dict[str, Any]) -> str:
    """formatEvent(event); a format that is one field, such as the access line's, without parsing it."""
    format = event.get("log_format")
    if isinstance(format, str) and format.startswith("{") and format.endswith("}"):
        value = event.get(format[1:-1])
        if isinstance(value, str) and format.count("{") == 1:
            return value
    return formatEvent(event)


def textLine(event: dict[str, Any]) -> str | None:
    """The line twistd's text observer writes: "time [system] message"."""
    if "log_failure" in event or "log_system" in event:
        return formatEventAsClassicLogText(event, _seconds)  # the traceback, the legacy system
    level = event.get("log_level")
    system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
    text = message(event)
    if not text:
        return None
    return f"{_seconds(event.get('log_time'))} [{system}] {text}".replace("\n", "\n\t") + "\n"


def jsonLine(event: dict[str, Any]) -> str:
    level = getattr(event.get("log_level"), "name", "info")
    record: dict[str, Any] = {
        "time": datetime.fromtimestamp(event.get("log_time", 0), timezone.utc).isoformat(
            timespec="milliseconds"
        ),
        "level": level,
        "priority": PRIORITIES.get(level, 6),
        "system": event.get("log_namespace") or event.get("log_system") or "-",
        "message": message(event),
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


def observer(format: str, toStdout: bool = True, out: IO[str] | None = None) -> ILogObserver | None:
    """
    The observer for format, or None for twistd's own: text to a file or
    syslog. toStdout: twistd's options send the log to standard output.
    """
    if format == "json":
        return FileLogObserver(out or sys.stdout, jsonLine)
    if toStdout:
        return FileLogObserver(out or sys.stdout, textLine)
    return None


@implementer(ILogObserver)
class HeldUntilStarted:
    """
    Passes events on to observer once bioproxy has started (release); until
    then keeps them, so that when start-up fails (a port in use) its error
    is the only line printed, not twistd's chatter before it (drop).
    """

    LIMIT = 10000  # events kept at most before the start (a start that logs more is not waited for)

    def __init__(self, observer: ILogObserver) -> None:
        self.observer = observer
        self.held: list[dict[str, Any]] | None = []
        self.dropped = False

    def __call__(self, event: dict[str, Any]) -> None:
        if self.dropped:
            return
        if self.held is None or len(self.held) >= self.LIMIT:
            self.release()
            self.observer(event)
            return
        self.held.append(event)

    def release(self) -> None:
        held, self.held = self.held or [], None
        for event in held:
            self.observer(event)

    def drop(self) -> None:
        self.dropped, self.held = True, None


def twistdLogsToStdout(twistdOptions: Any) -> bool:
    """Whether twistd, with these options of its own, would write its log to standard output."""
    if twistdOptions is None:
        return False
    if twistdOptions.get("syslog"):
        return False
    logfile = twistdOptions.get("logfile")
    return logfile == "-" or (not logfile and bool(twistdOptions.get("nodaemon")))
