"""
The admin site: health and metrics for operators, kept off the proxy port so
clients of the model never see it.
"""

from __future__ import annotations

import hmac
import json
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from . import __version__
from .errors import JSONResource, writeError
from .heads import Head, HeadBook, Kind, templateHead
from .kvcache import KVCache, isoTime
from .metrics import Metrics, MetricsResource
from .monitor import BackendMonitor
from .scheduler import SlotScheduler
from .templates import describe
from .warmup import Warmer
from .watcher import TemplateWatcher


def jsonBody(request: Request, value: Any, status: int = 200) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value, indent=2, sort_keys=True).encode() + b"\n"


class HealthResource(JSONResource):
    def __init__(self, monitor: BackendMonitor, clock: IReactorTime, backendURL: str) -> None:
        super().__init__()
        self.monitor = monitor
        self.clock = clock
        self.startedAt = clock.seconds()
        self.backendURL = backendURL

    def render_GET(self, request: Request) -> bytes:
        monitor = self.monitor
        return jsonBody(
            request,
            {
                # The proxy itself is up whenever it answers; the backend's
                # state is reported beside it rather than failing the check.
                "status": "ok" if monitor.reachable else "degraded",
                "uptime_seconds": round(self.clock.seconds() - self.startedAt, 3),
                "version": __version__,
                "backend": {
                    "url": self.backendURL,
                    "reachable": monitor.reachable,
                    "last_checked_ago_seconds": (
                        None
                        if monitor.lastChecked is None
                        else round(self.clock.seconds() - monitor.lastChecked, 3)
                    ),
                    "last_error": monitor.lastError,
                },
            },
        )


class ReadyResource(JSONResource):
    """200 once the backend has been probed and every template's warmup has run to an end; 503 before."""

    def __init__(self, watcher: TemplateWatcher, warmer: Warmer | None) -> None:
        super().__init__()
        self.watcher = watcher
        self.warmer = warmer

    def render_GET(self, request: Request) -> bytes:
        backend = self.warmer is not None and self.warmer.ready
        untried = self.warmer.untried(self.watcher.library.templates) if self.warmer is not None else []
        ready = backend and not untried
        return jsonBody(
            request,
            {"ready": ready, "backend_ready": backend, "templates_untried": untried},
            200 if ready else 503,
        )


class TemplatesResource(JSONResource):
    """GET /templates; POST /templates/<prefix>/warmup queues a warmup."""

    isLeaf = True

    def __init__(
        self,
        watcher: TemplateWatcher,
        cache: KVCache | None,
        warmer: Warmer | None,
        book: HeadBook | None = None,
    ) -> None:
        super().__init__()
        self.watcher = watcher
        self.cache = cache
        self.warmer = warmer
        self.book = book

    def render_GET(self, request: Request) -> bytes | int:
        if request.postpath and request.postpath != [b""]:
            writeError(request, 404, "No such admin resource.")
            return NOT_DONE_YET
        out = []
        uses = self.book.view() if self.book is not None else {}
        for prefix, status in sorted(self.watcher.status.items()):
            template = self.watcher.library.templates.get(prefix)
            entry: dict[str, Any] = (
                describe(template) if template else {"prefix": prefix, "path": str(status.path)}
            )
            entry["last_change"] = status.lastChange
            entry["last_change_at"] = isoTime(status.lastChange)
            entry["last_error"] = status.lastError
            if template is not None and self.cache is not None:
                head = templateHead(template)
                entry.update(self.cache.state(head).view(self.cache.backend))
                if self.warmer is not None:
                    entry["warm_state"] = self.warmer.phase(head).value
                entry["cache_file"] = self.cache.filename(head)
                if self.book is not None:
                    entry["variants"] = [self._variant(h, uses) for h in self.book.variantsOf(prefix)]
            out.append(entry)
        learned = []
        if self.book is not None and self.cache is not None:
            learned = [self._variant(h, uses) for h in self.book.wanted() if h.kind is Kind.LEARNED]
        backend = self.cache.backend.view() if self.cache is not None else None
        return jsonBody(request, {"templates": out, "learned": learned, "backend": backend})

    def _variant(self, head: Head, uses: dict[str, Any]) -> dict[str, Any]:
        """A learned head: its cache facts, and its uses from the book's view."""
        assert self.cache is not None
        entry: dict[str, Any] = {"name": head.name, "kind": head.kind.value}
        entry.update(self.cache.state(head).view(self.cache.backend))
        if self.warmer is not None:
            entry["warm_state"] = self.warmer.phase(head).value
        entry["cache_file"] = self.cache.filename(head)
        entry.update(uses.get(head.name, {}))
        return entry

    def render_POST(self, request: Request) -> bytes | int:
        path = request.postpath or []
        if len(path) != 2 or path[1] != b"warmup" or self.warmer is None:
            writeError(request, 404, "POST /templates/<prefix>/warmup is the only action here.")
            return NOT_DONE_YET
        prefix = path[0].decode("utf-8", "replace")  # Twisted has decoded the path's segments
        if not self.warmer.request(prefix, force=True):
            writeError(request, 404, f"No template has the prefix {prefix!r}.")
            return NOT_DONE_YET
        return jsonBody(request, {"queued": prefix, "backend_ready": self.warmer.ready}, status=202)


class SlotsResource(JSONResource):
    """bioproxy's view of each backend slot, which is what placement decides on."""

    def __init__(self, scheduler: SlotScheduler, clock: IReactorTime) -> None:
        super().__init__()
        self.scheduler = scheduler
        self.clock = clock

    def render_GET(self, request: Request) -> bytes:
        now = self.clock.seconds()
        slots = []
        for slot in self.scheduler.slots:
            lease = slot.lease
            slots.append(
                {
                    "id": slot.id,
                    "state": slot.contents.label,
                    "template": slot.contents.key,
                    "busy": lease is not None,
                    "holder": lease.priority if lease is not None else None,
                    "idle_seconds": None
                    if lease is not None or not slot.lastUsed
                    else round(now - slot.lastUsed, 3),
                }
            )
        return jsonBody(
            request,
            {
                "slots": slots,
                "retained": self.scheduler.retains,
                "waiting": {priority: len(queue) for priority, queue in self.scheduler.queues.items()},
            },
        )


class TokenGuard(Resource):
    """Requires `Authorization: Bearer <token>` before anything below it."""

    def __init__(self, wrapped: Resource, token: str, open: set[bytes] | None = None) -> None:
        super().__init__()
        self.wrapped = wrapped
        self.token = token.encode()
        self.open = open or set()  # children anyone may read (a probe's /health)

    def _allowed(self, request: Request) -> bool:
        header = request.getHeader(b"authorization") or b""
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.token)

    def getChildWithDefault(self, path: bytes, request: Request) -> Resource:
        if path not in self.open and not self._allowed(request):
            return _Unauthorized()
        child: Resource = self.wrapped.getChildWithDefault(path, request)
        return child

    def render(self, request: Request) -> bytes | int:
        if not self._allowed(request):
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
    monitor: BackendMonitor,
    watcher: TemplateWatcher,
    clock: IReactorTime,
    backendURL: str,
    token: str | None = None,
    scheduler: SlotScheduler | None = None,
    cache: KVCache | None = None,
    warmer: Warmer | None = None,
    book: HeadBook | None = None,
    openHealth: bool = False,
) -> Resource:
    root = AdminRoot()
    root.add(
        "health", "GET: the proxy's and the backend's health", HealthResource(monitor, clock, backendURL)
    )
    root.add(
        "ready",
        "GET: 200 once the backend is probed and every template has been tried, else 503",
        ReadyResource(watcher, warmer),
    )
    root.add("metrics", "GET: Prometheus metrics", MetricsResource(metrics.registry))
    root.add(
        "templates",
        "GET: templates, their heads and warm state; POST /templates/<prefix>/warmup: warm one now",
        TemplatesResource(watcher, cache, warmer, book),
    )
    if scheduler is not None:
        root.add(
            "slots",
            "GET: each slot, what it holds and who holds it; the queues",
            SlotsResource(scheduler, clock),
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
        return jsonBody(
            request, {"service": "bioproxy admin", "version": __version__, "endpoints": self.endpoints}
        )
