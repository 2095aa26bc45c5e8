"""
Reads llama-server's `timings` out of a response as it streams past.

`timings.cache_n` is the ground truth for whether a slot's cache was reused.
For a stream it is in the last event; the reader keeps only the unfinished
tail of the stream, so nothing is buffered beyond one event.
"""

from __future__ import annotations

import json
from typing import Any

# A JSON answer larger than this is not a completion; its timings are not looked for.
MAX_JSON_BYTES = 4 * 1024 * 1024


class TimingsReader:
    def __init__(self) -> None:
        self._sse: bool | None = None
        self._buffer = b""
        self._overflow = False
        self._found: dict[str, Any] | None = None

    def feed(self, data: bytes) -> None:
        if self._sse is None:
            head = (self._buffer + data).lstrip()
            if not head:
                self._buffer += data
                return
            self._sse = not head.startswith((b"{", b"["))
        if self._sse:
            self._buffer += data
            *events, self._buffer = self._buffer.replace(b"\r\n", b"\n").split(b"\n\n")
            for event in events:
                if b'"timings"' in event:
                    self._event(event)
        elif not self._overflow:
            self._buffer += data
            if len(self._buffer) > MAX_JSON_BYTES:
                self._overflow, self._buffer = True, b""

    def _event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if line.startswith(b"data:"):
                timings = _timingsOf(line[5:])
                if timings is not None:
                    self._found = timings

    @property
    def timings(self) -> dict[str, Any] | None:
        if self._sse is False and not self._overflow and self._found is None:
            self._found = _timingsOf(self._buffer)
            self._buffer = b""
        return self._found


def _timingsOf(raw: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    timings = value.get("timings") if isinstance(value, dict) else None
    if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
        return timings
    return None
