# -*- test-case-name: tests.unit.test_serve,tests.unit.test_framing -*-
"""
The proxy port's HTTP/1.1 server.

twisted.web is general and costs accordingly on every request: the head is
parsed a line at a time through LineReceiver, a Request of some forty
attributes is built, a resource tree with one leaf is traversed, and every
write goes through three layers. On the pass-through path that was most of
bioproxy's cost (bench/passthrough.py; its lean relay is the measuring
stick). The proxy needs much less: parse the head in one pass, keep the
body (in memory, in a file past BODY_IN_MEMORY), hand a request to the
proxy's resource, and write the response with the framing HTTP/1.1 asks
for. The admin port stays on twisted.web: it is not on the request path.

What twisted.web gave the proxy is kept here: a deadline for a request's
head and body from its first byte (408), JSON refusals of what is not
HTTP/1.1 (400, 414, 431, 413), Expect: 100-continue, keep-alive with one
request at a time (pipelined ones wait, read ahead up to a bound), HEAD,
chunked bodies both ways, the connection as the response's consumer for
producers, and the idle timeout of a kept-alive connection.
"""

from __future__ import annotations

import itertools
import re
import secrets
import tempfile
from collections import deque
from collections.abc import Sequence
from io import BytesIO
from typing import IO, Any
from typing import Protocol as TypingProtocol

import httptools
from twisted.internet import defer, task
from twisted.internet.interfaces import IAddress, IReactorTime, ISSLTransport
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http

from .deadline import Deadline
from .errors import errorResponse, failRequest, writeError
from .headers import RawHeaders
from .metrics import Metrics, methodLabel, pathLabel
from .why import Reason
from .wire import sendNow

log = Logger()

CLIENT_CLOSED = 499  # nginx's code for "the client went away first"
RECENT = 20  # requests the status page shows
MAX_LINE = 16384  # the request line; and the headers in all (Twisted's limits)
MAX_HEADERS = 500
MAX_HEAD = 2 * MAX_LINE  # a head whose line and headers are still being read
BODY_IN_MEMORY = 1 << 20  # a larger body is kept in a temporary file
READ_AHEAD = 1 << 16  # bytes of pipelined requests read while one is answered
LINGER = 2.0  # seconds a refused body is still read (and dropped) before closing
_NO_BODY = frozenset((204, 304))
_REQUEST_ID = re.compile(rb"[!-~]{1,128}")  # a client's X-Request-Id, kept as it is
# The ids made here: random per process, then counted (16 hex digits, no
# system call per request as a random one would cost).
_ID_PREFIX = secrets.token_hex(4).encode()
_ids = itertools.count()
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Renderer(TypingProtocol):
    """What the site hands each request to (bioproxy.proxy.ProxyResource)."""

    def render(self, request: ProxyRequest) -> object: ...


class ProxyRequest:
    """
    One request and its response: the part of twisted.web's Request that
    the proxy's resource, forwarder and dispatcher use, and what the access
    line tells of it.
    """

    code = 200
    code_message = b"OK"
    startedWriting = False
    finished = False
    chunked = False
    persistent = True  # the connection takes another request after this one
    _disconnected = False
    # What the access line tells of a slot-using request (the dispatcher sets them).
    prefix = ""  # the template prefix used, if any; a metrics label
    slot: int | None = None  # the slot it was pinned to
    cached: int | None = None  # prompt tokens reused from the cache
    computed: int | None = None  # prompt tokens computed
    firstByte: float | None = None  # seconds to the response's first body byte
    tooLarge = False  # its body passes the limit: answered 413, and the connection closed
    backend: str | None = None  # which backend answered, when there are several (the router sets it)
    reason: Reason | None = (
        None  # why its prompt was or was not reused from the cache (the dispatcher sets it)
    )
    placedByGuard = False  # the router's load guard chose its backend, not where its head was warm

    def __init__(
        self, channel: ProxyChannel, method: bytes, uri: bytes, clientproto: bytes, headers: RawHeaders
    ) -> None:
        self.channel = channel
        self.site = channel.site
        self.method = method
        self.uri = uri
        self.path = uri.split(b"?", 1)[0]
        self.clientproto = clientproto
        self.requestHeaders = headers
        self.responseHeaders = RawHeaders()
        self.content: IO[bytes] = BytesIO()
        self.startedAt = self.site.clock.seconds()
        self._finished: list[defer.Deferred[None]] = []
        # The client's X-Request-Id, kept when it is one line of visible
        # ASCII (128 at most), else one made here: sent to llama-server,
        # returned to the client, and in each log line about the request.
        given = headers.getRawHeaders(b"x-request-id")
        ident = given[-1] if given else b""
        self.requestId = ident if _REQUEST_ID.fullmatch(ident) else b"%s%08x" % (_ID_PREFIX, next(_ids))

    # -- what the request says

    def getHeader(self, name: bytes) -> bytes | None:
        values = self.requestHeaders.getRawHeaders(name)
        return values[-1] if values else None

    def getClientAddress(self) -> IAddress:
        transport: Any = self.channel.transport
        address: IAddress = transport.getPeer()
        return address

    def isSecure(self) -> bool:
        return ISSLTransport.providedBy(self.channel.transport)

    def routeLabel(self) -> str:
        return pathLabel(self.path.decode("latin-1"))

    # -- the response

    def setResponseCode(self, code: int, message: bytes | None = None) -> None:
        self.code = code
        self.code_message = message or http.RESPONSES.get(code, b"Unknown Status")

    def setHeader(self, name: bytes, value: bytes) -> None:
        self.responseHeaders.setRawHeaders(name, [value])

    def write(self, data: bytes) -> None:
        if self.finished:
            raise RuntimeError("ProxyRequest.write called after finish")
        if self._disconnected:
            return
        if not self.startedWriting:
            self._writeHead(data)
        elif data and self.method != b"HEAD" and self.code not in _NO_BODY:
            sendNow(self.channel.transport, b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        if data and self.firstByte is None:
            self.firstByte = self.site.clock.seconds() - self.startedAt
            metrics = self.site.metrics
            metrics.child(metrics.ttfb, self.routeLabel()).observe(self.firstByte)

    def _writeHead(self, data: bytes) -> None:
        """The status line and headers, and the first body bytes with them, in one write."""
        self.startedWriting = True
        headers = self.responseHeaders
        bodiless = self.method == b"HEAD" or self.code in _NO_BODY or self.code < 200
        if not bodiless and not headers.hasHeader(b"content-length"):
            if self.clientproto == b"HTTP/1.1":
                self.chunked = True
                headers.setRawHeaders(b"transfer-encoding", [b"chunked"])
            else:
                self.persistent = False  # the body ends when the connection does
        if not self.persistent:
            headers.setRawHeaders(b"connection", [b"close"])
        headers.setRawHeaders(b"x-request-id", [self.requestId])
        head = [b"HTTP/1.1 %d %s\r\n" % (self.code, self.code_message)]
        for name, values in headers.getAllRawHeaders():
            for value in values:
                head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"\r\n")
        if data and not bodiless:
            head.append(b"%x\r\n%s\r\n" % (len(data), data) if self.chunked else data)
        sendNow(self.channel.transport, b"".join(head))

    def finish(self) -> None:
        if self.finished or self._disconnected:
            return
        if not self.startedWriting:
            if self.method != b"HEAD" and not self.responseHeaders.hasHeader(b"content-length"):
                self.responseHeaders.setRawHeaders(b"content-length", [b"0"])
            self._writeHead(b"")
        if self.chunked:
            sendNow(self.channel.transport, b"0\r\n\r\n")
        self.finished = True
        self._notify(None)
        self.channel.requestDone(self)

    def notifyFinish(self) -> defer.Deferred[None]:
        """Fires when the response is finished, or fails when the connection is lost first."""
        if self.finished:
            return defer.succeed(None)
        if self._disconnected:
            return defer.fail(Failure(http._DataLoss()))
        d: defer.Deferred[None] = defer.Deferred()
        self._finished.append(d)
        return d

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        self.channel.transport.registerProducer(producer, streaming)  # type: ignore[union-attr]

    def unregisterProducer(self) -> None:
        transport: Any = self.channel.transport
        if transport is not None:
            transport.unregisterProducer()

    def connectionLost(self, reason: Failure) -> None:
        if self.finished:
            return
        self._disconnected = True
        self._notify(reason)

    def _notify(self, reason: Failure | None) -> None:
        waiting, self._finished = self._finished, []
        for d in waiting:
            if reason is None:
                d.callback(None)
            else:
                d.errback(reason)


class _Refused(Exception):
    """Raised in a parser callback: stop parsing; the channel's refusal says what to answer."""


class ProxyChannel(Protocol):
    """
    One client connection: requests framed by llhttp (httptools), answered
    one at a time.

    The parser is fed only while no request is answered; what comes
    meanwhile waits in a buffer (READ_AHEAD bytes, then reading pauses), so
    that pipelined requests are read once the one before is answered. One
    feed can complete several; they wait their turn in `ready`.

    Between requests the connection may stay idle for the site's timeout;
    from a request's first byte, its head and body must arrive within it.
    """

    def __init__(self, site: ProxySite) -> None:
        self.site = site
        self.parser = httptools.HttpRequestParser(self)
        self.buffer = b""  # read while a request is answered
        self.request: ProxyRequest | None = None  # being answered
        self.ready: deque[ProxyRequest] = deque()  # read whole, waiting their turn
        self.reading: ProxyRequest | None = None  # its head is in; its body is coming
        self.closed = False  # refused, or told to close: nothing more is read
        self.refusal: tuple[int, str] | None = None  # answered once the requests before it are
        self.deadline = Deadline(site.clock)  # idle, then each request's, then idle again
        self.paused = False  # reading is paused: READ_AHEAD bytes wait
        self.pumping = False
        self.lingering = False  # answered and closing: what still comes is read and dropped
        self.feeding = 0  # of the feed under way, counted as the head's if it is still being read
        self._head()

    def _head(self) -> None:
        """Forget the head being read: a new message begins."""
        self.url = b""
        self.headers = RawHeaders()
        self.headerCount = 0
        self.headerBytes = 0  # of the whole header lines so far
        self.inHead = False  # between a message's first byte and the end of its headers
        self.headSeen = 0  # bytes fed while this head was being read (see _feed)

    def connectionMade(self) -> None:
        self.site.channels.add(self)
        self._idle()

    # -- reading

    def dataReceived(self, data: bytes) -> None:
        if self.closed:
            return  # refused, or lingering after a 413
        if self.request is not None or self.ready:
            self.buffer += data  # a pipelined request: read once this one is answered
            if len(self.buffer) > READ_AHEAD and not self.paused:
                self.paused = True
                self.transport.pauseProducing()  # type: ignore[union-attr]
            return
        self.buffer += data
        self._pump()

    def _pump(self) -> None:
        """
        Answer what is ready, else parse what is buffered, until a request
        is being answered or nothing is left. A loop, not recursion: a
        request answered at once (an error) ends in requestDone, which
        leaves the next to this loop.
        """
        if self.pumping:
            return
        self.pumping = True
        try:
            while self.request is None:
                if self.ready:
                    self._answer(self.ready.popleft())
                elif self.refusal is not None:
                    self._refuse(*self.refusal)
                    break
                elif self.buffer and not self.closed:
                    data, self.buffer = self.buffer, b""
                    self._feed(data)
                else:
                    break
        finally:
            self.pumping = False

    def _feed(self, data: bytes) -> None:
        while data:
            # Counted as the head's if a head is still being read after this
            # feed; not if a message ended in it first (then it is no more
            # than one read short).
            self.feeding = len(data)
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as upgrade:
                # bioproxy switches no protocol: the request is answered as
                # any other, and what follows it is the next request.
                data = data[upgrade.args[0] :]
                continue
            except httptools.HttpParserError as e:
                if self.refusal is None and not self.lingering:
                    self.refusal = (400, f"The request is not well-formed HTTP/1.1: {_reason(e)}.")
                self.closed = True
            break
        if self.inHead and not self.closed:
            # llhttp keeps a header line until its end: its size is bounded
            # here, where the line and headers limits could not see it yet.
            self.headSeen += self.feeding
            if self.headSeen > MAX_HEAD:
                self.refusal, self.closed = (431, f"The request's head exceeds {MAX_HEAD} bytes."), True

    # -- httptools' callbacks, called while feeding

    def on_message_begin(self) -> None:
        self._head()
        self.inHead = True
        if self.request is None and not self.ready:
            self._deadline()

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_LINE:
            self._fail(414, f"The request line is longer than {MAX_LINE} bytes.")

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headerBytes += len(name) + len(value) + 4
        self.headerCount += 1
        if self.headerBytes > MAX_LINE:
            self._fail(431, f"The request's headers exceed {MAX_LINE} bytes.")
        if self.headerCount > MAX_HEADERS:
            self._fail(431, f"The request has more than {MAX_HEADERS} headers.")
        self.headers.addRawHeader(name, value.rstrip(b" \t"))

    def on_headers_complete(self) -> None:
        self.inHead = False
        parser, headers = self.parser, self.headers
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            self._fail(400, f"HTTP/{version} is not served here; use HTTP/1.1.")
        clientproto = b"HTTP/" + version.encode()
        hosts = headers.getRawHeaders(b"host") or []
        if len(hosts) > 1 or (version == "1.1" and not hosts):
            self._fail(400, "An HTTP/1.1 request has exactly one Host header (RFC 9112, section 3.2).")
        if not self.url.startswith(b"/"):
            self._fail(400, "The request target is not a path; this is not a forward proxy.")
        request = self.reading = ProxyRequest(self, parser.get_method(), self.url, clientproto, headers)
        coding = headers.getRawHeaders(b"transfer-encoding")
        if coding is not None and (
            # HTTP/1.0 has no chunked coding: a request that claims it is
            # faulty (RFC 9112, section 6.1), however a peer would read it.
            version != "1.1" or [t.lower() for t in _split(coding)] != [b"chunked"]
        ):
            self._fail(400, "The request's Transfer-Encoding is not chunked alone.")
        length = headers.getRawHeaders(b"content-length")
        declared = int(length[0]) if length else 0  # llhttp checked: one, and digits
        if parser.should_upgrade() and (coding is not None or declared):
            self._fail(400, "An Upgrade request with a body is not served here.")
        if declared > self.site.maxBodyBytes:
            self.reading = None
            self._tooLarge(request)
            raise _Refused()
        if version == "1.0" or b"close" in _tokens(headers, b"connection"):
            request.persistent = False
        if (coding is not None or declared) and b"100-continue" in _tokens(headers, b"expect"):
            if version == "1.1":
                self.transport.write(_CONTINUE)  # type: ignore[union-attr]

    def on_body(self, piece: bytes) -> None:
        request = self.reading
        assert request is not None
        received = request.content.tell() + len(piece)
        if received > self.site.maxBodyBytes:
            self.reading = None
            self._tooLarge(request)
            raise _Refused()
        content = request.content
        if isinstance(content, BytesIO) and received > BODY_IN_MEMORY:
            spilled = request.content = tempfile.TemporaryFile()
            spilled.write(content.getvalue())
            content = spilled
        content.write(piece)

    def on_message_complete(self) -> None:
        request, self.reading = self.reading, None
        assert request is not None
        self.ready.append(request)
        self.feeding = 0  # a head that begins later in this feed is not counted from the feed's start

    def _fail(self, status: int, message: str) -> None:
        self.refusal = (status, message)
        raise _Refused()

    # -- answering

    def _answer(self, request: ProxyRequest) -> None:
        """The request's head and body are in: answer it."""
        self.request = request
        self.deadline.stop()
        if request.tooLarge:
            self.site.track(request)
            writeError(request, 413, f"Request body exceeds the limit of {self.site.maxBodyBytes} bytes.")
            return
        request.content.seek(0)
        self.site.process(request)

    def requestDone(self, request: ProxyRequest) -> None:
        if request is not self.request:
            return
        self.request = None
        if self.lingering:
            self._linger()
            return
        if not request.persistent:
            self.closed, self.refusal = True, None
            self.ready.clear()
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        if self.paused:
            self.paused = False
            self.transport.resumeProducing()  # type: ignore[union-attr]
        if self.buffer or self.inHead or self.reading is not None:
            self._deadline()  # the next request's first bytes are in
        else:
            self._idle()
        self._pump()

    def _linger(self) -> None:
        """
        Close after a 413 without resetting the connection: a client still
        sending its body would get a reset, not the answer. Half-close, read
        and drop what comes for a while, then close.
        """
        transport: Any = self.transport
        if not hasattr(transport, "loseWriteConnection"):
            transport.loseConnection()
            return
        transport.loseWriteConnection()
        self.deadline.arm(LINGER, transport.abortConnection)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.closed = True
        self.site.channels.discard(self)
        self.deadline.cancel()
        request, self.request = self.request, None
        self.ready.clear()
        if request is not None:
            request.connectionLost(reason)

    # -- deadlines and refusals

    def _idle(self) -> None:
        if self.site.timeout:
            self.deadline.arm(self.site.timeout, self._idleTooLong)
        else:
            self.deadline.stop()

    def _deadline(self) -> None:
        if self.site.timeout:
            self.deadline.arm(self.site.timeout, self._tooSlow)
        else:
            self.deadline.stop()

    def _idleTooLong(self) -> None:
        self.closed = True
        self.transport.loseConnection()  # type: ignore[union-attr]

    def _tooSlow(self) -> None:
        self._refuse(408, f"The request's headers and body did not arrive within {self.site.timeout:g} s.")

    def _tooLarge(self, request: ProxyRequest) -> None:
        """
        413 through the request, so that it is counted and logged, once the
        requests before it are answered; nothing more is parsed.
        """
        self.closed = self.lingering = True
        request.persistent = False
        request.tooLarge = True
        self.ready.append(request)

    def _refuse(self, status: int, message: str) -> None:
        """An answer before there is a request to answer; the connection closes after it."""
        self.closed = True
        self.deadline.stop()
        transport: Any = self.transport
        if transport is not None and not transport.disconnecting:
            transport.write(errorResponse(status, message))
            transport.loseConnection()


def _reason(error: Exception) -> str:
    """llhttp's reason, as it says it ("Invalid header value char")."""
    return str(error).rstrip(".") or type(error).__name__


def _split(values: Sequence[bytes]) -> list[bytes]:
    return [t.strip(b" \t") for value in values for t in value.split(b",") if t.strip(b" \t")]


def _tokens(headers: RawHeaders, name: bytes) -> list[bytes]:
    return [t.lower() for t in _split(headers.getRawHeaders(name) or [])]


class ProxySite(Factory):
    """
    The proxy port: its connections, the requests in flight (a graceful
    shutdown waits for them), per-request metrics, the access line, and
    the last few requests the status page shows.
    """

    noisy = False  # the start-up banner says where it listens

    def __init__(
        self,
        resource: Renderer,
        metrics: Metrics,
        clock: IReactorTime,
        maxBodyBytes: int,
        accessLog: bool = True,
        timeout: float = 60.0,
    ) -> None:
        self.resource = resource
        self.metrics = metrics
        self.clock = clock
        self.maxBodyBytes = maxBodyBytes
        self.accessLog = accessLog
        self.timeout = timeout  # client_timeout
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT)
        self.active: set[ProxyRequest] = set()
        self.channels: set[ProxyChannel] = set()
        self._idleWaiters: list[defer.Deferred[None]] = []
        self.draining = False
        self._closing: list[Any] = []  # transports told to flush and close

    def buildProtocol(self, addr: IAddress | None) -> ProxyChannel:
        return ProxyChannel(self)

    def process(self, request: ProxyRequest) -> None:
        self.track(request)
        try:
            self.resource.render(request)
        except Exception:  # noqa: BLE001 - any failure is answered in JSON, and the next request served
            failRequest(request, Failure())

    def track(self, request: ProxyRequest) -> None:
        self.active.add(request)
        self.metrics.inFlight.inc()
        request.notifyFinish().addBoth(self._finished, request)

    def _finished(self, result: None | Failure, request: ProxyRequest) -> None:
        transport = request.channel.transport
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

    def _ended(self, request: ProxyRequest, method: str, status: int, seconds: float) -> None:
        """
        A request's record: kept among the last few (the status page shows
        them) and, with access_log, one log line whose fields are the event's
        too (for --log-format json).
        """
        reason = request.reason
        record = {
            "request_id": request.requestId.decode("ascii"),
            "at": request.startedAt,
            "method": method,
            "path": request.path.decode("latin-1"),
            "status": status,
            "prefix": request.prefix or None,
            "slot": request.slot,
            "cached": request.cached,
            "computed": request.computed,
            "ttfb_ms": None if request.firstByte is None else round(request.firstByte * 1000, 1),
            "ms": round(seconds * 1000, 1),
            "backend": request.backend,
            "reason": reason.why.label if reason is not None else None,
            "reason_text": str(reason) if reason is not None else None,
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
        if request.backend is not None:
            line += f" on {request.backend}"
        line += f" in {record['ms']} ms"
        if reason is not None:
            line += f"; {reason}"
        # Made here, one field for the logger to format: a format of nine
        # fields cost more than the rest of the line's work.
        log.info("{access}", access=f"{line}; request {record['request_id']}", **record)

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
        # Kept-alive connections between requests, and those still reading
        # a refused body, are closed too (as nginx closes its idle ones).
        for channel in list(self.channels):
            transport: Any = channel.transport
            if channel.lingering:
                transport.abortConnection()
            elif channel.request is None:
                transport.loseConnection()
            self._closing.append(transport)
        while any(t.connected for t in self._closing) and self.clock.seconds() < deadline:
            await task.deferLater(self.clock, 0.02)

    def whenIdle(self) -> defer.Deferred[None]:
        """Fires once no request is in flight."""
        if not self.active:
            return defer.succeed(None)
        d: defer.Deferred[None] = defer.Deferred()
        self._idleWaiters.append(d)
        return d
