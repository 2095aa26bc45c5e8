"""
OpenAI-style error bodies, so every client library shows our errors the way it
shows the backend's.
"""

from __future__ import annotations

import json

from twisted.web.server import Request

# status -> (type, code) as OpenAI-compatible clients expect them
_KINDS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "unauthorized"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    413: ("invalid_request_error", "request_too_large"),
    502: ("server_error", "backend_unavailable"),
    503: ("server_error", "overloaded"),
    504: ("server_error", "backend_timeout"),
}


def errorBody(status: int, message: str, code: str | None = None) -> bytes:
    kind, defaultCode = _KINDS.get(status, ("server_error", "internal_error"))
    return json.dumps({"error": {"message": message, "type": kind, "code": code or defaultCode}}).encode(
        "utf-8"
    )


def writeError(
    request: Request,
    status: int,
    message: str,
    code: str | None = None,
    headers: dict[bytes, bytes] | None = None,
) -> None:
    """Answer a request that has not started its response with a JSON error."""
    body = errorBody(status, message, code)
    request.setResponseCode(status)
    request.responseHeaders.setRawHeaders(b"content-type", [b"application/json"])
    request.responseHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    for name, value in (headers or {}).items():
        request.responseHeaders.setRawHeaders(name, [value])
    request.write(body)
    request.finish()
