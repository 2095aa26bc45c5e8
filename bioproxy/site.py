"""
The sites' HTTP layer. Both sites' connections give a request's headers and
body a deadline from its first byte (a client sending a byte a second would
otherwise hold a connection for good), and answer what Twisted's HTTP
parser refuses with a status and a JSON body, not a bare 400 or a silent
close. The proxy's Site and Request add the body-size limit, per-request
metrics, and the set of in-flight requests that a graceful shutdown waits for.
"""

from __future__ import annotations

from collections import deque
from io import BytesIO
from typing import Any

from twisted.internet import defer, task
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.http import HTTPChannel
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from .errors import errorResponse, failRequest, writeError
from .metrics import Metrics, methodLabel, pathLabel
from .wire import sendNow

log = Logger()

CLIENT_CLOSED = 499  # nginx's code for "the client went away first"
RECENT = 20  # requests the status page shows


class JSONChannel(HTTPChannel):
    """
    An HTTP/1.1 connection whose requests must arrive within its timeOut
    (the site's client_timeout) of their first byte, and whose refusals are
    JSON. timeOut is also Twisted's idle timeout of the connection.
    """

    _reading: IDelayedCall | None = None
    _answering = False  # between a request's last byte and its response's end

    def dataReceived(self, data: bytes) -> None:
        if self._reading is None and not self._answering and self.timeOut:
            self._reading = self.callLater(self.timeOut, self._tooSlow)
        super().dataReceived(data)

    def allContentReceived(self) -> None:
        self._stopReading()
        self._answering = True
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        self._answering = False  # before the next pipelined request is read
        super().requestDone(request)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stopReading()
        super().connectionLost(reason)

    # Writes: the head in one piece (Twisted's is a sequence of some forty
    # strings, each checked), queued so that the first body bytes join it;
    # body chunks in one piece and sent at once (wire.sendNow).

    def writeHeaders(self, version: bytes, code: bytes, reason: bytes, headers: Any) -> None:
        if not isinstance(headers, Headers):  # Twisted's own compatibility case: let it sanitize
            super().writeHeaders(version, code, reason, headers)
            return
        head = [version, b" ", code, b" ", reason, b"\r\n"]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head += (name, b": ", value, b"\r\n")
        head.append(b"\r\n")
        self.transport.write(b"".join(head))  # type: ignore[union-attr]

    def write(self, data: bytes) -> None:
        sendNow(self.transport, data)

    def writeSequence(self, iovec: Any) -> None:
        sendNow(self.transport, b"".join(iovec))

    def _stopReading(self) -> None:
        if self._reading is not None:
            if self._reading.active():
                self._reading.cancel()
            self._reading = None

    def _tooSlow(self) -> None:
        self._reading = None
        self._refuse(408, f"The request's headers and body did not arrive within {self.timeOut:g} s.")

    def lineLengthExceeded(self, line: bytes) -> None:
        if self.requests:  # the request line was read: this is a header
            self._refuse(431, f"A request header is longer than {self.MAX_LENGTH} bytes.")
        else:
            self._refuse(414, f"The request line is longer than {self.MAX_LENGTH} bytes.")

    def _respondToBadRequestAndDisconnect(self) -> None:
        if self._receivedHeaderSize > self.totalHeadersSize:
            self._refuse(431, f"The request's headers exceed {self.totalHeadersSize} bytes.")
        elif self._receivedHeaderCount > self.maxHeaders:
            self._refuse(431, f"The request has more than {self.maxHeaders} headers.")
        else:
            self._refuse(400, "The request is not well-formed HTTP/1.1.")

    def _refuse(self, status: int, message: str) -> None:
        self._stopReading()
        if self.transport is not None and not self.transport.disconnecting:  # type: ignore[attr-defined]
            self.transport.write(errorResponse(status, message))
        self.loseConnection()


class JSONRequest(Request):
    """A request whose failures in rendering are answered in JSON."""

    def processingFailed(self, reason: Failure) -> Failure:
        failRequest(self, reason)
        return reason


class JSONSite(Site):
    """A Site of JSON channels and requests: the admin site, and the proxy's base."""

    protocol = JSONChannel  # type: ignore[assignment]  # HTTP/1.1 only, as llama-server speaks it
    requestFactory = JSONRequest
    noisy = False  # the start-up banner says where it listens

    def __init__(self, resource: Resource, **kwargs: Any) -> None:
        super().__init__(resource, **kwargs)
        # Twisted parses a POST's Content-Type (with the email package) for
        # form arguments, which nothing here reads. (Twisted's own switch is
        # Site(parsePOSTFormSubmission=False); older releases lack it.)
        self._parsePOSTFormSubmission = False

    def log(self, request: http.Request) -> None:
        """Twisted's access log goes through the legacy log per request; the proxy writes its own line."""


class ProxyRequest(JSONRequest):
    """A request that knows its size limit and reports itself to the metrics."""

    bodyTooLarge = False
    prefix = ""  # the template prefix used, if any; a metrics label
    # What the access line tells of a slot-using request (the dispatcher sets them).
    slot: int | None = None  # the slot it was pinned to
    cached: int | None = None  # prompt tokens reused from the cache
    computed: int | None = None  # prompt tokens computed
    firstByte: float | None = None  # seconds to the response's first body byte
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
            self.firstByte = site.clock.seconds() - self.startedAt
            site.metrics.child(site.metrics.ttfb, self.routeLabel()).observe(self.firstByte)
        super().write(data)

    def routeLabel(self) -> str:
        return pathLabel(self.path.decode("latin-1"))


class ProxySite(JSONSite):
    """A Site that tracks in-flight requests so shutdown can wait for them."""

    requestFactory = ProxyRequest

    def __init__(
        self,
        resource: Resource,
        metrics: Metrics,
        clock: IReactorTime,
        maxBodyBytes: int,
        accessLog: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(resource, reactor=clock, **kwargs)
        self.accessLog = accessLog
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
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
            seconds = self.clock.seconds() - request.startedAt
            method = methodLabel(request.method.decode("latin-1"))
            self.metrics.requestEnded(request.routeLabel(), method, str(status), request.prefix, seconds)
            # A turn later: the dispatcher learns the timings (cached and
            # computed tokens) just after the response's end.
            self.clock.callLater(0, self._ended, request, method, status, seconds)
            if not self.active:
                waiters, self._idleWaiters = self._idleWaiters, []
                for waiter in waiters:
                    waiter.callback(None)

        request.notifyFinish().addBoth(ended)

    def _ended(self, request: ProxyRequest, method: str, status: int, seconds: float) -> None:
        """
        A request's record: kept among the last few (the status page shows
        them) and, with access_log, one log line whose fields are the event's
        too (for --log-format json).
        """
        record = {
            "method": method,
            "path": request.path.decode("latin-1"),
            "status": status,
            "prefix": request.prefix or None,
            "slot": request.slot,
            "cached": request.cached,
            "computed": request.computed,
            "ttfb_ms": None if request.firstByte is None else round(request.firstByte * 1000, 1),
            "ms": round(seconds * 1000, 1),
        }
        self.recent.append(record)
        if not self.accessLog:
            return
        line = f"{method} {record['path']} {status}"
        if request.prefix:
            line += f" {request.prefix}"
        if request.slot is not None:
            line += f" slot {request.slot}"
        if request.cached is not None:
            line += f" cached {request.cached} computed {request.computed}"
        if record["ttfb_ms"] is not None:
            line += f" ttfb {record['ttfb_ms']} ms"
        # Made here, one field for the logger to format: a format of nine
        # fields cost more than the rest of the line's work.
        log.info("{access}", access=f"{line} in {record['ms']} ms", **record)

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
