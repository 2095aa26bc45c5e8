"""
Header rules for a forwarding proxy (RFC 9110 §7.6.1): hop-by-hop headers stay
on their own hop, everything else crosses, multi-valued headers intact.
"""

from __future__ import annotations

from twisted.web.http_headers import Headers

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


def _connectionTokens(headers: Headers) -> frozenset[bytes]:
    tokens: set[bytes] = set()
    for value in headers.getRawHeaders(b"connection", []):
        tokens.update(t.strip().lower() for t in value.split(b",") if t.strip())
    return frozenset(tokens)


def endToEnd(headers: Headers, drop: frozenset[bytes] = frozenset()) -> Headers:
    """A copy of headers minus hop-by-hop ones and any names in drop."""
    named = _connectionTokens(headers) | drop
    out = Headers()
    for name, values in headers.getAllRawHeaders():
        if not _isHopByHop(name, named):
            out.setRawHeaders(name, list(values))
    return out


def appendForwarded(headers: Headers, clientAddress: str, proto: bytes) -> None:
    """Append this hop to X-Forwarded-For and X-Forwarded-Proto."""
    for name, value in (
        (b"x-forwarded-for", clientAddress.encode("ascii", "replace")),
        (b"x-forwarded-proto", proto),
    ):
        previous = headers.getRawHeaders(name, [])
        joined = b", ".join([*previous, value]) if previous else value
        headers.setRawHeaders(name, [joined])
