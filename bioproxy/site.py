"""
The proxy's Site and Request: body-size limit, per-request metrics, and the
set of in-flight requests that a graceful shutdown waits for.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .errors import writeError
from .metrics import Metrics, pathLabel

CLIENT_CLOSED = 499  # nginx's code for "the client went away first"


class ProxyRequest(Request):
    """A request that knows its size limit and reports itself to the metrics."""

    bodyTooLarge = False
    prefix = ""  # the template prefix used, if any; a metrics label
    _received = 0
    startedAt = 0.0
    _wroteBody = False
    site: ProxySite

    def _site(self) -> ProxySite:
        site: ProxySite = self.channel.site
        return site

    def gotLength(self, length: int | None) -> None:
        if length is not None and length > self._site().maxBodyBytes:
            self._refuseBody()
        else:
            super().gotLength(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self.bodyTooLarge:
            return
        self._received += len(data)
        if self._received > self._site().maxBodyBytes:
            self.content.close()
            self._refuseBody()
        else:
            super().handleContentChunk(data)

    def _refuseBody(self) -> None:
        # Keep reading (HTTP/1.1 framing needs it) but store nothing.
        self.bodyTooLarge = True
        self.content = BytesIO()

    def process(self) -> None:
        site = self._site()
        self.startedAt = site.clock.seconds()
        site.track(self)
        if self.bodyTooLarge:
            self.site = site
            writeError(self, 413, f"Request body exceeds the limit of {site.maxBodyBytes} bytes.")
            return
        super().process()

    def write(self, data: bytes) -> None:
        if data and not self._wroteBody:
            self._wroteBody = True
            site: ProxySite = self.site
            site.metrics.ttfb.labels(path=self.routeLabel()).observe(
                site.clock.seconds() - self.startedAt
            )
        super().write(data)

    def routeLabel(self) -> str:
        return pathLabel(self.path.decode("latin-1"))


class ProxySite(Site):
    """A Site that tracks in-flight requests so shutdown can wait for them."""

    requestFactory = ProxyRequest

    def __init__(
        self,
        resource: Resource,
        metrics: Metrics,
        clock: IReactorTime,
        maxBodyBytes: int,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, **kwargs)
        self.metrics = metrics
        self.clock = clock
        self.maxBodyBytes = maxBodyBytes
        self.active: set[ProxyRequest] = set()
        self._idleWaiters: list[defer.Deferred[None]] = []

    def track(self, request: ProxyRequest) -> None:
        self.active.add(request)
        self.metrics.inFlight.inc()

        def ended(result: None | Failure) -> None:
            self.active.discard(request)
            self.metrics.inFlight.dec()
            status = CLIENT_CLOSED if isinstance(result, Failure) else request.code
            path = request.routeLabel()
            self.metrics.requests.labels(
                path=path, method=request.method.decode("latin-1"), status=str(status),
                prefix=request.prefix,
            ).inc()
            self.metrics.duration.labels(path=path).observe(self.clock.seconds() - request.startedAt)
            if not self.active:
                waiters, self._idleWaiters = self._idleWaiters, []
                for waiter in waiters:
                    waiter.callback(None)

        request.notifyFinish().addBoth(ended)

    def whenIdle(self) -> defer.Deferred[None]:
        """Fires once no request is in flight."""
        if not self.active:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idleWaiters.append(d)
        return d
