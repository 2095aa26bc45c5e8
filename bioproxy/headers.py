# -*- test-case-name: tests.unit.test_headers -*-
"""
Header rules for a forwarding proxy (RFC 9110 §7.6.1): hop-by-hop headers stay
on their own hop, everything else crosses, multi-valued headers intact.

And the headers' container on the proxy path. twisted.web's Headers encodes
and sanitizes every name and value on every call, which on a pass-through
request was the largest single cost after the server itself. RawHeaders
keeps lower-case names and values as they came; the parsers that fill it
(serve.py, wire.py) refuse a line with a bare CR or LF, and values set in
code are checked here, so nothing can split a header in two.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from twisted.web.http_headers import Headers


class HeaderSource(Protocol):
    """Either kind of headers: twisted.web's (the fallback Agent's) or RawHeaders."""

    def getRawHeaders(self, name: bytes) -> Sequence[bytes] | None: ...

    def getAllRawHeaders(self) -> Iterable[tuple[bytes, Sequence[bytes]]]: ...


class RawHeaders:
    """Headers by lower-case name, each with its values in order."""

    __slots__ = ("_raw",)

    def __init__(self) -> None:
        self._raw: dict[bytes, list[bytes]] = {}

    def addRawHeader(self, name: bytes, value: bytes) -> None:
        """From a parsed line (already checked): lower-case it and keep it."""
        self._raw.setdefault(name.lower(), []).append(value)

    def setRawHeaders(self, name: bytes, values: Sequence[bytes]) -> None:
        for value in values:
            if b"\r" in value or b"\n" in value:
                raise ValueError(f"a header value holds a line break: {value[:40]!r}")
        self._raw[name.lower()] = list(values)

    def getRawHeaders(self, name: bytes) -> list[bytes] | None:
        return self._raw.get(name.lower())

    def hasHeader(self, name: bytes) -> bool:
        return name.lower() in self._raw

    def removeHeader(self, name: bytes) -> None:
        self._raw.pop(name.lower(), None)

    def getAllRawHeaders(self) -> Iterable[tuple[bytes, list[bytes]]]:
        return self._raw.items()

    def copy(self) -> RawHeaders:
        out = RawHeaders()
        out._raw = {name: list(values) for name, values in self._raw.items()}
        return out

    def twisted(self) -> Headers:
        """The same headers as twisted.web's, for its Agent."""
        return Headers(dict(self._raw))


HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def _isHopByHop(name: bytes, named: frozenset[bytes]) -> bool:
    lower = name.lower()
    return lower in HOP_BY_HOP or lower in named or lower.startswith(b"proxy-")


def _connectionTokens(headers: HeaderSource) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection") or []:
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def endToEnd(
    headers: HeaderSource, drop: frozenset[bytes] = frozenset(), into: RawHeaders | None = None
) -> RawHeaders:
    """
    A copy of headers minus hop-by-hop ones and any names in drop; into:
    the headers to copy them into (replacing any of the same name).
    """
    named = _connectionTokens(headers) | drop
    out = RawHeaders() if into is None else into
    raw = out._raw
    for name, values in headers.getAllRawHeaders():
        lower = name.lower()
        if not _isHopByHop(lower, named):
            raw[lower] = list(values)  # checked where they were parsed or set
    return out


def appendForwarded(headers: RawHeaders, clientAddress: str, proto: bytes) -> None:
    """Append this hop to X-Forwarded-For and X-Forwarded-Proto."""
    for name, value in (
        (b"x-forwarded-for", clientAddress.encode("ascii", "replace")),
        (b"x-forwarded-proto", proto),
    ):
        previous = headers.getRawHeaders(name) or []
        joined = b", ".join([*previous, value]) if previous else value
        headers.setRawHeaders(name, [joined])
