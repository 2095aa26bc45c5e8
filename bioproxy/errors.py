# -*- test-case-name: tests.unit.test_serve,tests.unit.test_admin -*-
"""
OpenAI-style error bodies, so every client library shows our errors the way it
shows the backend's. Every error bioproxy answers is written here: by a
request that has not begun its response (writeError), by one that failed on
the way (failRequest), by a resource asked for a child or a method it does
not have (JSONResource), and by the HTTP connection itself, before there is
a request to answer (errorResponse).
"""

from __future__ import annotations

import json
from typing import Any, Protocol

from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.error import UnsupportedMethod
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

log = Logger()


class Answered(Protocol):
    """
    What the error writers use of a request: twisted.web's Request, or the
    proxy port's own (serve.ProxyRequest), which this module need not know.
    """

    method: bytes
    path: bytes
    finished: Any
    startedWriting: Any
    channel: Any

    @property
    def responseHeaders(self) -> Any: ...
    def setResponseCode(self, code: int, message: bytes | None = None) -> None: ...
    def write(self, data: bytes) -> None: ...
    def finish(self) -> None: ...


# status -> (type, code) as OpenAI-compatible clients expect them
_KINDS = {
    400: ("invalid_request_error", "invalid_request"),
    401: ("authentication_error", "unauthorized"),
    403: ("permission_error", "forbidden"),
    404: ("invalid_request_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    408: ("invalid_request_error", "request_timeout"),
    413: ("invalid_request_error", "request_too_large"),
    414: ("invalid_request_error", "uri_too_long"),
    431: ("invalid_request_error", "headers_too_large"),
    500: ("server_error", "internal_error"),
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
    request: Request | Answered,
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


def failRequest(request: Request | Answered, reason: Failure) -> None:
    """
    Something raised while request was handled: the client gets a JSON 500
    or, once its response has begun, a closed connection; never silence.
    """
    log.failure("failed to handle {method} {path}", reason, method=request.method, path=request.path)
    if request.finished or request.channel is None:
        return
    if request.startedWriting:
        transport: Any = request.channel.transport
        if transport is not None:
            transport.abortConnection()
        return
    writeError(request, 500, f"bioproxy failed to handle this request: {reason.getErrorMessage()}")


def errorResponse(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 error response, for a connection that is closed after it."""
    body = errorBody(status, message)
    return (
        b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
        b"connection: close\r\n\r\n%s" % (status, http.RESPONSES.get(status, b"Error"), len(body), body)
    )


class JSONResource(Resource):
    """A resource whose unknown children and methods are JSON 404 and 405, not Twisted's HTML pages."""

    def getChild(self, path: bytes, request: Request) -> Resource:
        return self if path == b"" else NotFound()  # a trailing slash names the resource itself

    def render(self, request: Request) -> bytes | int:
        try:
            result: bytes | int = super().render(request)
        except UnsupportedMethod as e:
            allowed = b", ".join(sorted(set(e.allowedMethods)))
            writeError(
                request,
                405,
                f"{request.method.decode('latin-1')} is not allowed here; use {allowed.decode()}.",
                headers={b"allow": allowed},
            )
            return NOT_DONE_YET
        return result


class NotFound(Resource):
    isLeaf = True

    def render(self, request: Request) -> int:
        writeError(request, 404, f"No such resource: {request.path.decode('latin-1')}.")
        return NOT_DONE_YET
