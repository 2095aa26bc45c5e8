"""
The proxy's Site and Request: body-size limit, per-request metrics, and the
set of in-flight requests that a graceful shutdown waits for.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .errors import writeError
from .metrics import Metrics, methodLabel, pathLabel

log = Logger()

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
        channel: Any = self.channel
        site: ProxySite = channel.site
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
            if self.content is not None:
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
            site.metrics.ttfb.labels(path=self.routeLabel()).observe(site.clock.seconds() - self.startedAt)
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
        super().__init__(resource, reactor=clock, **kwargs)
        self.metrics = metrics
        self.clock = clock
        self.maxBodyBytes = maxBodyBytes
        self.active: set[ProxyRequest] = set()
        self._idleWaiters: list[defer.Deferred[None]] = []
        self.draining = False
        self._closing: list[Any] = []  # transports told to flush and close

    def track(self, request: ProxyRequest) -> None:
        self.active.add(request)
        self.metrics.inFlight.inc()
        transport = request.channel.transport

        def ended(result: None | Failure) -> None:
            if self.draining and transport is not None:
                # Close after the last bytes are written, so shutdown does
                # not cut the tail of a response that did finish.
                transport.loseConnection()
                self._closing.append(transport)
            self.active.discard(request)
            self.metrics.inFlight.dec()
            status = CLIENT_CLOSED if isinstance(result, Failure) else request.code
            path = request.routeLabel()
            self.metrics.requests.labels(
                path=path,
                method=methodLabel(request.method.decode("latin-1")),
                status=str(status),
                prefix=request.prefix,
            ).inc()
            self.metrics.duration.labels(path=path).observe(self.clock.seconds() - request.startedAt)
            if not self.active:
                waiters, self._idleWaiters = self._idleWaiters, []
                for waiter in waiters:
                    waiter.callback(None)

        request.notifyFinish().addBoth(ended)

    async def drain(self, grace: float) -> None:
        """
        Stop starting work and let what is in flight finish, for up to grace
        seconds, including flushing each response's last bytes.
        """
        self.draining = True
        deadline = self.clock.seconds() + grace
        idle = self.whenIdle()
        idle.addTimeout(grace, self.clock)
        try:
            await idle
        except defer.TimeoutError:
            log.warn("grace period over; {n} request(s) cut short", n=len(self.active))
            return
        while any(t.connected for t in self._closing) and self.clock.seconds() < deadline:
            await task.deferLater(self.clock, 0.02)

    def whenIdle(self) -> defer.Deferred[None]:
        """Fires once no request is in flight."""
        if not self.active:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idleWaiters.append(d)
        return d
