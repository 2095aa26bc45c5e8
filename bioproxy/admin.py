# -*- test-case-name: tests.unit.test_admin -*-
"""
The admin site: health and metrics for operators, kept off the proxy port so
clients of the model never see it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Callable, Coroutine
from typing import Any

from twisted.internet import defer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from . import __version__
from .errors import JSONResource, failRequest, writeError
from .metrics import Metrics, MetricsResource
from .snapshot import Snapshot
from .statuspage import STATUS_PAGE


def jsonBody(request: Request, value: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    # Compact: the C encoder (an indented one is Python's, three times slower
    # on a listing of thousands of templates). `| jq` shows it indented.
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode() + b"\n"


def renderInTurns(request: Request, view: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> int:
    """A large view, built a slice per reactor turn, then written; NOT_DONE_YET."""
    gone: list[object] = []
    request.notifyFinish().addErrback(gone.append)

    def write(value: dict[str, Any]) -> None:
        if not gone:
            request.write(jsonBody(request, value))
            request.finish()

    d = defer.ensureDeferred(view())
    d.addCallback(write)
    d.addErrback(lambda reason: None if gone else failRequest(request, reason))
    return NOT_DONE_YET


class JSONView(JSONResource):
    """GET: one part of the snapshot, as JSON."""

    def __init__(self, view: Callable[[], dict[str, Any]]) -> None:
        super().__init__()
        self.view = view

    def render_GET(self, request: Request) -> bytes:
        return jsonBody(request, self.view())


class JSONViewInTurns(JSONResource):
    """GET: a large part of the snapshot, built a slice per reactor turn."""

    def __init__(self, view: Callable[[], Coroutine[Any, Any, dict[str, Any]]]) -> None:
        super().__init__()
        self.view = view

    def render_GET(self, request: Request) -> int:
        return renderInTurns(request, self.view)


class ReadyResource(JSONResource):
    """200 once the backend has been probed and every template's warmup has run to an end; 503 before."""

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot

    def render_GET(self, request: Request) -> bytes:
        ready = self.snapshot.ready()
        return jsonBody(request, ready, 200 if ready["ready"] else 503)


class TemplatesResource(JSONResource):
    """GET /templates; POST /templates/<prefix>/warmup queues a warmup."""

    isLeaf = True

    def __init__(self, snapshot: Snapshot) -> None:
        super().__init__()
        self.snapshot = snapshot
        self.warmers = snapshot.warmers

    def render_GET(self, request: Request) -> bytes | int:
        if request.postpath and request.postpath != [b""]:
            writeError(request, 404, "No such admin resource.")
            return NOT_DONE_YET
        return renderInTurns(request, self.snapshot.templatesInTurns)

    def render_POST(self, request: Request) -> bytes | int:
        path = request.postpath or []
        if len(path) != 2 or path[1] != b"warmup" or not self.warmers:
            writeError(request, 404, "POST /templates/<prefix>/warmup is the only action here.")
            return NOT_DONE_YET
        prefix = path[0].decode("utf-8", "replace")  # Twisted has decoded the path's segments
        # On every backend that keeps it warm.
        if not all([warmer.queueWarmup(prefix, force=True) for warmer in self.warmers]):
            writeError(request, 404, f"No template has the prefix {prefix!r}.")
            return NOT_DONE_YET
        ready = any(warmer.ready for warmer in self.warmers)
        return jsonBody(request, {"queued": prefix, "backend_ready": ready}, status=202)


class TokenGuard(Resource):
    """Requires `Authorization: Bearer <token>` before anything below it."""

    def __init__(self, wrapped: Resource, token: str, open: set[bytes] | None = None) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.token = token.encode()
        self.open = open or set()  # children anyone may read (a probe's /health)

    def _allowed(self, request: Request, page: bool = False) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token):
            return True
        # A browser opening the status page cannot send a header: /?token=… (the page then sends it).
        query = (request.args or {}).get(b"token", [b""])[0]
        return page and bool(query) and hmac.compare_digest(query, self.token)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        # The page is "/" alone: "//metrics" has an empty first segment too.
        page = path == b"" and not request.postpath
        if path not in self.open and not self._allowed(request, page=page):
            return _Unauthorized()
        child: Resource = self.wrapped.getChildWithDefault(path, request)
        return child

    def render(self, request: Request) -> bytes | int:
        if not self._allowed(request, page=True):
            return _Unauthorized().render(request)
        result: bytes | int = self.wrapped.render(request)
        return result


class _Unauthorized(Resource):
    isLeaf = True

    def render(self, request: Request) -> int:
        writeError(
            request,
            401,
            "This admin endpoint needs a bearer token.",
            headers={b"www-authenticate": b'Bearer realm="bioproxy-admin"'},
        )
        return NOT_DONE_YET


def adminRoot(
    metrics: Metrics,
    snapshot: Snapshot,
    token: str | None = None,
    openHealth: bool = False,
) -> Resource:
    """The admin site: every view a part of snapshot; warmups asked of its warmer."""
    root = AdminRoot()
    root.add("health", "GET: the proxy's and the backend's health", JSONView(snapshot.health))
    root.add(
        "ready",
        "GET: 200 once the backend is probed and every template has been tried, else 503",
        ReadyResource(snapshot),
    )
    root.add("metrics", "GET: Prometheus metrics", MetricsResource(metrics.registry))
    root.add(
        "templates",
        "GET: templates, their heads and warm state; POST /templates/<prefix>/warmup: warm one now",
        TemplatesResource(snapshot),
    )
    if snapshot.slotted:
        root.add(
            "slots", "GET: each slot, what it holds and who holds it; the queues", JSONView(snapshot.slots)
        )
    root.add(
        "status",
        "GET: all of the above and the last requests, in one snapshot",
        JSONViewInTurns(snapshot.wholeInTurns),
    )
    return TokenGuard(root, token, {b"health"} if openHealth else set()) if token else root


class AdminRoot(JSONResource):
    """The admin site's root: GET / lists its endpoints."""

    def __init__(self) -> None:
        super().__init__()
        self.endpoints: dict[str, str] = {}

    def add(self, name: str, what: str, resource: Resource) -> None:
        self.putChild(name.encode("ascii"), resource)
        self.endpoints["/" + name] = what

    def render_GET(self, request: Request) -> bytes:
        # A browser gets the status page; anything else the list of endpoints.
        if b"text/html" in (request.getHeader(b"accept") or b""):
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return STATUS_PAGE
        return jsonBody(
            request, {"service": "bioproxy admin", "version": __version__, "endpoints": self.endpoints}
        )
