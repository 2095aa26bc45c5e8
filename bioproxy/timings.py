# -*- test-case-name: tests.unit.test_shapes -*-
"""
Reads llama-server's `timings` out of a response as it streams past.

`timings.cache_n` is the ground truth for whether a slot's cache was reused.
For a stream it is in the last event; the reader keeps only the unfinished
tail of the stream, so nothing is buffered beyond one event. Anthropic
Messages answers carry no timings: their `usage` (`cache_read_input_tokens`,
in `message_start` when streamed) says the same, and so does a Responses
answer's `usage.input_tokens_details.cached_tokens`.
"""

from __future__ import annotations

import json
from typing import Any

# A JSON answer larger than this is not a completion; its timings are not looked for.
MAX_JSON_BYTES = 4 * 1024 * 1024


def _hasCounts(data: bytes) -> bool:
    """Whether data has what an event must contain to be worth parsing."""
    return b'"timings"' in data or b'"cache_read_input_tokens"' in data or b'"cached_tokens"' in data


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
            buffer = (self._buffer + data).replace(b"\r\n", b"\n")
            if not _hasCounts(buffer):
                # Most events (every token's): only the unfinished end is kept.
                end = buffer.rfind(b"\n\n")
                self._buffer = buffer[end + 2 :] if end >= 0 else buffer
                return
            *events, self._buffer = buffer.split(b"\n\n")
            for event in events:
                if _hasCounts(event):
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
    if not isinstance(value, dict):
        return None
    timings = value.get("timings")
    if isinstance(timings, dict) and isinstance(timings.get("cache_n"), int):
        return timings
    message = value.get("message") or value.get("response")
    usage = value.get("usage") or (message.get("usage") if isinstance(message, dict) else None)
    # An Anthropic stream's message_start counts no output yet.
    final = "usage" in value or "response" in value
    return _fromUsage(usage, final) if isinstance(usage, dict) else None


def _fromUsage(usage: dict[str, Any], final: bool) -> dict[str, Any] | None:
    """
    timings' counts from an Anthropic or Responses `usage`: prompt tokens
    cached and computed, and (final: the answer's whole usage) generated.
    """
    cached, total = usage.get("cache_read_input_tokens"), usage.get("input_tokens")
    timings: dict[str, Any] | None = None
    if isinstance(cached, int) and isinstance(total, int):
        timings = {"cache_n": cached, "prompt_n": total}  # Anthropic's input_tokens are the computed ones
    details = usage.get("input_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else None
    if timings is None and isinstance(cached, int) and isinstance(total, int):
        timings = {"cache_n": cached, "prompt_n": max(0, total - cached)}
    generated = usage.get("output_tokens")
    if final and timings is not None and isinstance(generated, int) and not isinstance(generated, bool):
        timings["predicted_n"] = generated
    return timings
