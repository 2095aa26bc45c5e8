# -*- test-case-name: tests.unit.test_forward -*-
"""
One client request sent to the backend, its answer streamed back.

Streaming is the point: SSE events are written as they arrive, and a client
that leaves closes the backend connection at once, which is how llama-server
learns to stop generating.

A client that stops reading must not hold a slot: llama-server generates
whether or not its socket drains, so the exchange ends (and the dispatcher
frees the slot) when the backend's answer has arrived, not when the client
has read it. To that end a slow client's bytes are kept here, up to
bufferBytes per response (answers of LLMs are small); past that the backend's
connection is paused, so memory stays bounded. A client whose connection has
taken nothing for stallTimeout seconds is dropped, and a backend that sends
nothing for idleTimeout seconds in the middle of its answer is cut off.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from io import BytesIO
from typing import IO, Any, TypeVar

from twisted.internet import defer, error
from twisted.internet.interfaces import IConsumer, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._newclient import RequestNotSent
from twisted.web.client import (
    FileBodyProducer,
    RequestGenerationFailed,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
)
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from .deadline import Deadline
from .errors import writeError
from .headers import RawHeaders, appendForwarded, endToEnd
from .metrics import Metrics
from .serve import ProxyRequest
from .wire import RESPONSE_DONE, LeanAgent

log = Logger()
_T = TypeVar("_T")

# Failures that mean "no usable answer from the backend": a 502.
_UNREACHABLE = (
    error.ConnectError,
    error.DNSLookupError,
    error.ConnectionLost,
    error.ConnectionDone,
    ResponseFailed,
    RequestTransmissionFailed,
    RequestGenerationFailed,
    RequestNotSent,
)

# Failures of a pooled connection that the backend had just closed: it never
# answered, so it did no work, and one more try on a fresh connection is safe.
_STALE = (ResponseNeverReceived, RequestNotSent, RequestTransmissionFailed)

# Headers the proxy sets itself rather than copies from the client.
_DROP_FROM_CLIENT = frozenset({b"host", b"content-length"})


@dataclasses.dataclass
class Outcome:
    """How an exchange ended; the scheduler learns from it later."""

    status: int | None = None
    complete: bool = False
    error: str | None = None
    bytesSent: int = 0
    # Whether the request may have reached the backend; False when no
    # connection could be made, so that it did no work and another may take it.
    reached: bool = True


BodyObserver = Callable[[bytes], None]


class Forwarder:
    """Sends requests to one backend through a shared persistent Agent."""

    def __init__(
        self,
        agent: IAgent,
        backendURL: str,
        clock: IReactorTime,
        metrics: Metrics,
        timeout: float,
        idleTimeout: float = 600.0,
        bufferBytes: int = 1 << 20,
        stallTimeout: float = 60.0,
        retryAgent: IAgent | None = None,
    ) -> None:
        self.agent = agent
        self.retryAgent = retryAgent or agent  # one that connects anew
        self.backend = backendURL.rstrip("/").encode("ascii")
        self.label = backendURL.rstrip("/")  # the backend, as metrics name it
        self.clock = clock
        self.metrics = metrics
        self.timeout = timeout  # for the response's headers
        self.idleTimeout = idleTimeout  # between the bytes of its body
        self.bufferBytes = bufferBytes  # kept for a client that is not reading
        self.stallTimeout = stallTimeout  # how long that client may take nothing
        self.cooperator = Cooperator(scheduler=lambda work: clock.callLater(0, work))

    def forward(
        self,
        request: ProxyRequest,
        body: bytes | IO[bytes] | None = None,
        observer: BodyObserver | None = None,
        replaceable: bool = False,
    ) -> defer.Deferred[Outcome]:
        """
        Relay request (with body, if given, instead of the client's) and stream
        the answer back. The Deferred fires when the client's response ends.
        replaceable: another backend can take it, so a backend that could not
        be reached gets no 502 written; the outcome says "connect" and the
        caller places the request again.
        """
        exchange = _Exchange(self, request, body, observer)
        exchange.replaceable = replaceable
        return exchange.start()

    def url(self, request: ProxyRequest) -> bytes:
        uri: bytes = request.uri
        return self.backend + (uri if uri.startswith(b"/") else b"/" + uri)

    def headers(self, request: ProxyRequest) -> RawHeaders:
        headers = endToEnd(request.requestHeaders, drop=_DROP_FROM_CLIENT)
        peer = request.getClientAddress()
        address = getattr(peer, "host", None) or "unix"
        appendForwarded(headers, address, b"https" if request.isSecure() else b"http")
        headers.setRawHeaders(b"x-request-id", [request.requestId])
        return headers


def _hasBody(request: ProxyRequest) -> bool:
    headers = request.requestHeaders
    return headers.hasHeader(b"content-length") or headers.hasHeader(b"transfer-encoding")


class _Exchange:
    """The state of one request/response pair; lives as long as the exchange."""

    replaceable = False

    def __init__(
        self,
        forwarder: Forwarder,
        request: ProxyRequest,
        body: bytes | IO[bytes] | None,
        observer: BodyObserver | None,
    ) -> None:
        self.forwarder = forwarder
        self.request = request
        self.observer = observer
        self.outcome = Outcome()
        self.done: defer.Deferred[Outcome] = defer.Deferred()
        self.clientGone = False
        self.pending: defer.Deferred[IResponse] | None = None
        self.pump: _BodyPump | None = None
        self.timedOut = False
        # The response's timeout, then the body's silences (the pump's).
        self.deadline = Deadline(forwarder.clock)
        if body is None and _hasBody(request):
            content = request.content
            body = content.getvalue() if isinstance(content, BytesIO) else content
        self.body: bytes | IO[bytes] | None = body
        request.notifyFinish().addErrback(self._clientLost)

    def start(self, retry: bool = True) -> defer.Deferred[Outcome]:
        forwarder = self.forwarder
        producer: IBodyProducer | None = None
        if isinstance(self.body, bytes):
            producer = _InMemory(self.body)
        elif self.body is not None:  # a large upload, kept in a file
            self.body.seek(0)
            producer = FileBodyProducer(_KeptOpen(self.body), cooperator=forwarder.cooperator)
        agent = forwarder.agent if retry else forwarder.retryAgent
        headers = forwarder.headers(self.request)
        url = forwarder.url(self.request)
        if isinstance(agent, LeanAgent):  # it takes bioproxy's own headers as they are
            d = agent.request(self.request.method, url, headers, producer)
        else:
            d = agent.request(self.request.method, url, headers.twisted(), producer)
        self.pending = d
        self.deadline.arm(forwarder.timeout, self._timeout)
        d.addBoth(_passThrough(self.deadline.stop))
        d.addCallbacks(self._gotResponse, self._noResponse, errbackArgs=(retry,))
        d.addErrback(self._bug)
        return self.done

    def _timeout(self) -> None:
        # Agent reports a cancel as ResponseNeverReceived, so remember why.
        self.timedOut = True
        if self.pending is not None:
            self.pending.cancel()

    def _noResponse(self, reason: Failure, retry: bool) -> None:
        self.pending = None
        if self.clientGone:
            return
        if retry and not self.timedOut and reason.check(*_STALE):
            # A pooled connection the backend had just closed: try once more on
            # a fresh one. The backend never answered, so it did no work.
            log.info(
                "{backend}: backend closed a reused connection; retrying once", backend=self.forwarder.label
            )
            self.start(retry=False)
            return
        if self.timedOut:
            kind, status = "timeout", 504
            message = f"The backend sent no response within {self.forwarder.timeout:g} s."
        elif reason.check(*_UNREACHABLE):
            kind, status = "connect", 502
            message = "The backend is unreachable: " + _describe(reason)
        else:
            reason.raiseException()
        self.forwarder.metrics.backendErrors.labels(backend=self.forwarder.label, kind=kind).inc()
        log.warn(
            "{backend}: backend {kind} error for {method} {path}: {why} (request {request_id})",
            kind=kind,
            method=self.request.method.decode(),
            path=self.request.path.decode(),
            why=_describe(reason),
            backend=self.forwarder.label,
            request_id=self.request.requestId.decode("ascii"),
        )
        self.outcome.error = kind
        self.outcome.reached = not reason.check(error.ConnectError, error.DNSLookupError)
        if not (self.replaceable and kind == "connect"):
            self.outcome.status = status
            writeError(self.request, status, message)
        self._end()

    def _gotResponse(self, response: IResponse) -> None:
        self.pending = None
        request = self.request
        self.outcome.status = response.code
        if self.clientGone:
            response.deliverBody(_Discard())
            return
        request.setResponseCode(response.code, response.phrase)
        # The client gets exactly the backend's headers, no invented ones.
        endToEnd(response.headers, into=request.responseHeaders)
        # Agent keeps Content-Length out of the headers; restore it so the
        # client gets a sized response, not a re-chunked one.
        if isinstance(response.length, int):
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % response.length])
        self.pump = _BodyPump(self)
        response.deliverBody(self.pump)

    def _bodyEnded(self, reason: Failure, idle: bool) -> None:
        """
        The backend's answer has all arrived (or failed): the exchange is
        over, though a slow client may still be reading what is kept for it.
        """
        if self.clientGone:
            return
        if not idle and reason.check(ResponseDone, http.PotentialDataLoss):
            self.outcome.complete = True
            assert self.pump is not None
            self.pump.finishWhenSent()
        else:
            # Never end the client's response cleanly: that would hide the
            # truncation. Aborting makes every HTTP client report an error.
            kind = "idle" if idle else "midstream"
            self.forwarder.metrics.backendErrors.labels(backend=self.forwarder.label, kind=kind).inc()
            if idle:
                log.warn(
                    "{backend}: backend sent nothing for {s:g} s mid-response; cutting it off (request {request_id})",
                    s=self.forwarder.idleTimeout,
                    backend=self.forwarder.label,
                    request_id=self.request.requestId.decode("ascii"),
                )
            else:
                log.warn(
                    "{backend}: backend connection failed mid-response: {why} (request {request_id})",
                    why=_describe(reason),
                    backend=self.forwarder.label,
                    request_id=self.request.requestId.decode("ascii"),
                )
            self.outcome.error = kind
            self._abortClient()
        self._end()

    def _abortClient(self) -> None:
        transport: Any = self.request.channel.transport if self.request.channel is not None else None
        if transport is not None:
            transport.abortConnection()

    def _clientLost(self, reason: Failure) -> None:
        """The client went away: stop the backend's work at once."""
        self.clientGone = True
        self.outcome.error = self.outcome.error or "client_disconnect"
        if self.pending is not None:
            self.pending.cancel()
        if self.pump is not None:
            self.pump.clientLost()
        self._end()

    def _end(self) -> None:
        self.deadline.cancel()  # the backend has nothing more to send
        if not self.done.called:
            self.done.callback(self.outcome)

    def _bug(self, reason: Failure) -> None:
        log.failure("{backend}: unexpected error while forwarding", reason, backend=self.forwarder.label)
        if not self.clientGone and not self.request.finished and not self.request.startedWriting:
            writeError(self.request, 502, "The proxy failed to relay the backend's answer.")
        self._end()


@implementer(IBodyProducer)
class _InMemory:
    """
    A body in memory, written at once: it leaves in the same send as the
    request's headers, where FileBodyProducer would wait a reactor turn and
    send it alone. Sent again as it is by a retry.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.length = len(data)

    def startProducing(self, consumer: IConsumer) -> defer.Deferred[None]:
        consumer.write(self.data)
        return defer.succeed(None)

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass

    def stopProducing(self) -> None:
        pass


class _KeptOpen:
    """
    The body file as FileBodyProducer sees it, minus close(): the producer
    closes its file when it has sent it, and a retry on a fresh connection
    must send the same body again. (It once found the file closed, and the
    client got "The proxy failed to relay the backend's answer".)
    """

    def __init__(self, file: IO[bytes]) -> None:
        self.file = file

    def read(self, size: int = -1) -> bytes:
        return self.file.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self.file.seek(offset, whence)

    def tell(self) -> int:
        return self.file.tell()

    def close(self) -> None:
        pass


@implementer(IPushProducer)
class _BodyPump(Protocol):
    """
    Writes the backend's body to the client. It is the producer the
    client's connection pauses when its buffer is full; from then on, what
    arrives is kept for the client up to the forwarder's bufferBytes, past
    which the backend's connection is paused too. Two timers: one on the
    backend's silences (while it is not paused: the exchange's deadline,
    moved on every event), one on the client's stall.
    """

    def __init__(self, exchange: _Exchange) -> None:
        self.exchange = exchange
        self.forwarder = exchange.forwarder
        self.clientPaused = False
        self.backendPaused = False
        self.kept = 0  # bytes written since the client's connection said it was full
        self.finishing = False  # the answer has all arrived; the client has yet to take it
        self.idle = exchange.deadline
        self.stall: IDelayedCall | None = None
        self.silent = False  # cut off for sending nothing for too long

    def connectionMade(self) -> None:
        self.exchange.request.registerProducer(self, True)
        self._expectBytes()

    def dataReceived(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange.clientGone:
            return
        self._expectBytes()
        exchange.outcome.bytesSent += len(data)
        if exchange.observer is not None:
            exchange.observer(data)
        exchange.request.write(data)
        if self.clientPaused:
            self.kept += len(data)
            if self.kept > self.forwarder.bufferBytes and not self.backendPaused:
                self.backendPaused = True
                self.idle.stop()  # the backend's silence is ours now
                self.transport.pauseProducing()  # type: ignore[union-attr]

    def connectionLost(self, reason: Failure = RESPONSE_DONE) -> None:
        self.idle.cancel()
        self.exchange._bodyEnded(reason, self.silent)

    # -- the client's connection, as the producer it pauses

    def pauseProducing(self) -> None:
        # A transport says so on every write while its buffer is full.
        if self.clientPaused:
            return
        self.clientPaused = True
        self.kept = 0
        self.stall = self.forwarder.clock.callLater(self.forwarder.stallTimeout, self._stalled)

    def resumeProducing(self) -> None:
        self.clientPaused = False
        _stop(self.stall)
        if self.finishing:
            self._finish()
        elif self.backendPaused:
            self.backendPaused = False
            self._expectBytes()
            self.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        """The client's connection is closing; the exchange hears of it from the request."""

    # -- ends

    def finishWhenSent(self) -> None:
        """End the client's response, once its connection takes bytes again."""
        if self.clientPaused:
            self.finishing = True
        else:
            self._finish()

    def _finish(self) -> None:
        self.finishing = False
        request = self.exchange.request
        request.unregisterProducer()
        request.finish()

    def clientLost(self) -> None:
        _stop(self.stall)
        self.idle.cancel()
        if self.transport is not None:
            self.transport.loseConnection()

    def _stalled(self) -> None:
        log.info(
            "{backend}: client took nothing for {s:g} s; dropping it",
            s=self.forwarder.stallTimeout,
            backend=self.exchange.forwarder.label,
        )
        self.exchange._abortClient()

    def _expectBytes(self) -> None:
        self.idle.arm(self.forwarder.idleTimeout, self._silent)

    def _silent(self) -> None:
        self.silent = True
        self.transport.loseConnection()  # type: ignore[union-attr]


class _Discard(Protocol):
    """Drains and closes a response nobody is waiting for any more."""

    def connectionMade(self) -> None:
        self.transport.loseConnection()  # type: ignore[union-attr]


def _stop(timer: IDelayedCall | None) -> None:
    if timer is not None and timer.active():
        timer.cancel()


def _passThrough(action: Callable[[], None]) -> Callable[[_T], _T]:
    def run(result: _T) -> _T:
        action()
        return result

    return run


def _describe(reason: Failure) -> str:
    value = reason.value
    inner = getattr(value, "reasons", None)
    if inner:
        return "; ".join(_describe(r) for r in inner)
    return f"{type(value).__name__}: {value}" if str(value) else type(value).__name__
