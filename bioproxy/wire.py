# -*- test-case-name: tests.unit.test_wire -*-
"""
A lean HTTP/1.1 client for forwarding, behind Twisted's IAgent interface.

Twisted's Agent is general and costs accordingly on every request: state
machines for the request and the response, a transport proxy, a body
producer run by a cooperator, a parser built line by line. bench/lean.py
showed the same reactor relaying six to seven times the requests without
it. Forwarding needs much less: write the request in one send, parse the
status line and headers, decode the body's framing, hand the body to the
exchange's protocol as it comes, and keep the connection for the next
request when the response allows. This is that, for in-memory bodies;
a body Twisted keeps in a file (a large upload) goes through the Agent.

Failures are reported as the Agent reports them, so that forward.py's
handling (a retry on a stale connection, 502, 504) is the same either way.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web._newclient import ResponseNeverReceived
from twisted.web.client import URI, ResponseDone, ResponseFailed
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH, IAgent, IAgentEndpointFactory, IBodyProducer, IResponse
from zope.interface import implementer

from .deadline import Deadline
from .headers import RawHeaders

_NO_BODY_STATUS = (204, 304)

# A body's normal end, made once as twisted.internet.protocol's connectionDone is.
RESPONSE_DONE = Failure(ResponseDone())


@implementer(IResponse)
class _Response:
    """What forward.py reads of a response: code, phrase, headers, length, and its body on request."""

    version = (b"HTTP", 1, 1)
    request = None
    previousResponse = None

    def __init__(
        self, code: int, phrase: bytes, headers: RawHeaders, length: Any, connection: _Connection
    ) -> None:
        self.code = code
        self.phrase = phrase
        self.headers = headers
        self.length = length
        self._connection = connection

    def deliverBody(self, protocol: Protocol) -> None:
        self._connection.deliverTo(protocol)

    def setPreviousResponse(self, response: IResponse) -> None:
        pass


class _BodyTransport:
    """The body protocol's view of the connection: pause, resume, close."""

    def __init__(self, connection: _Connection) -> None:
        self.connection = connection

    def pauseProducing(self) -> None:
        self.connection.transport.pauseProducing()  # type: ignore[union-attr]

    def resumeProducing(self) -> None:
        self.connection.transport.resumeProducing()  # type: ignore[union-attr]

    def stopProducing(self) -> None:
        self.loseConnection()

    def loseConnection(self) -> None:
        self.connection.close()


def sendNow(transport: Any, data: bytes) -> None:
    """
    transport.write(data), but sent at once when nothing is queued before it.

    Twisted queues each write until the reactor's next turn: two epoll_ctl
    calls and a turn of the loop per write, and a streamed answer makes one
    write per event. A plain TCP connection with an empty buffer is sent to
    straight away; whatever the kernel does not take, and every write on
    any other transport (TLS, or a test's in-memory one), goes the usual
    way, behind anything already queued, with the producer's flow control
    intact. An error is left for Twisted's own write to find and report.
    """
    sock = getattr(transport, "socket", None)
    if (
        sock is None
        or getattr(transport, "TLS", False)
        or transport.dataBuffer
        or transport._tempDataBuffer
        or not transport.connected
        or transport.disconnecting
    ):
        transport.write(data)
        return
    try:
        sent = sock.send(data)
    except OSError:
        sent = 0
    if sent < len(data):
        transport.write(data[sent:] if sent else data)


MAX_CHUNK_LINE = 16384


class BadChunk(ValueError):
    """Chunked framing that is not HTTP/1.1's."""


class _Chunks:
    """Decodes a chunked body, handing each piece on; done once the last chunk and its trailer are in."""

    def __init__(self) -> None:
        self.line = b""
        self.left = 0  # bytes of the current chunk still to come
        self.state = "size"  # size, data, crlf, trailer
        self.done = False

    def feed(self, data: bytes, out: list[bytes]) -> bytes:
        """Decode data into out; returns what follows the body (bytes past its end)."""
        i, n = 0, len(data)
        while i < n and not self.done:
            if self.state == "data":
                take = min(self.left, n - i)
                out.append(data[i : i + take])
                i += take
                self.left -= take
                if not self.left:
                    self.state, self.line = "crlf", b""
                continue
            end = data.find(b"\n", i)
            if end < 0:
                self.line += data[i:]
                if len(self.line) > MAX_CHUNK_LINE:
                    raise BadChunk("a chunk's size or trailer line is too long")
                return b""
            line, self.line = (self.line + data[i:end]).rstrip(b"\r"), b""
            i = end + 1
            if len(line) > MAX_CHUNK_LINE:
                raise BadChunk("a chunk's size or trailer line is too long")
            if self.state == "size":
                size = line.split(b";", 1)[0].strip()
                if not size or len(size) > 15 or size.strip(b"0123456789abcdefABCDEF"):
                    raise BadChunk(f"not a chunk size: {size[:20]!r}")
                self.left = int(size, 16)
                self.state = "data" if self.left else "trailer"
            elif self.state == "crlf":
                self.state = "size"
            elif not line:  # the empty line that ends the trailer
                self.done = True
        return data[i:]


class _Connection(Protocol):
    """One connection to the backend, one exchange at a time."""

    def __init__(self, agent: LeanAgent, key: tuple[bytes, bytes, int]) -> None:
        self.agent = agent
        self.key = key
        self.used = 0  # exchanges begun on it
        self.waiting: defer.Deferred[IResponse] | None = None
        self.head = b""
        self.receivedAny = False
        self.body: Protocol | None = None
        self.pending: list[bytes] = []  # body bytes that came before deliverBody
        self.inBody = False
        self.chunks: _Chunks | None = None
        self.left: int | None = None  # bytes of a sized body still to come
        self.keep = False
        self.ended = False  # the body has all arrived
        self.idle = Deadline(agent.reactor)  # closes it once kept unused for the agent's idleTimeout
        self.lost = False
        self.noBody = False
        self._lostReason: Failure = RESPONSE_DONE

    # -- one exchange

    def send(self, data: bytes, method: bytes) -> defer.Deferred[IResponse]:
        self.used += 1
        self.head, self.receivedAny, self.body, self.pending = b"", False, None, []
        self.inBody, self.chunks, self.left, self.ended = False, None, None, False
        self.noBody = method == b"HEAD"
        self.waiting = defer.Deferred(lambda _: self.abort())
        assert self.transport is not None
        sendNow(self.transport, data)
        return self.waiting

    def dataReceived(self, data: bytes) -> None:
        self.receivedAny = True
        if not self.inBody:
            self.head += data
            while True:
                head, found, rest = self.head.partition(b"\r\n\r\n")
                if not found:
                    return
                code = int(head.split(b"\r\n", 1)[0].split(b" ", 2)[1])
                if 100 <= code < 200 and code != 101:
                    self.head = rest  # an interim answer: the real one follows
                    continue
                self._gotHead(head, rest)
                return
        self._bodyData(data)

    def _gotHead(self, head: bytes, rest: bytes) -> None:
        lines = head.split(b"\r\n")
        version, code, phrase = (lines[0].split(b" ", 2) + [b""])[:3]
        headers = RawHeaders()
        for line in lines[1:]:
            if b"\r" in line or b"\n" in line:
                self.abort()  # a header split in two on its way to the client
                return
            name, _, value = line.partition(b":")
            headers.addRawHeader(name.strip(), value.strip())
        status = int(code)
        tokens = b",".join(headers.getRawHeaders(b"connection") or []).lower()
        self.keep = b"close" not in tokens and (version == b"HTTP/1.1" or b"keep-alive" in tokens)
        coding = b",".join(headers.getRawHeaders(b"transfer-encoding") or []).lower()
        sized = headers.getRawHeaders(b"content-length")
        length: Any = UNKNOWN_LENGTH
        if self.noBody or status in _NO_BODY_STATUS:
            length = 0
        elif b"chunked" in coding:
            self.chunks = _Chunks()
        elif sized:
            length = int(sized[0])
        else:
            self.keep = False  # the body ends when the connection does
        headers.removeHeader(b"content-length")
        self.left = length if isinstance(length, int) else None
        self.inBody = True
        waiting, self.waiting = self.waiting, None
        assert waiting is not None
        waiting.callback(_Response(status, phrase, headers, length, self))
        if rest:
            self._bodyData(rest)
        elif self.left == 0:
            self._end()

    def _bodyData(self, data: bytes) -> None:
        if self.ended:
            return
        if self.chunks is not None:
            out: list[bytes] = []
            try:
                self.chunks.feed(data, out)
            except BadChunk:
                self.abort()  # the body is cut short: the client's response is too
                return
            # Chunk by chunk, as llama-server framed them (one event each):
            # events that came in one read still leave as they came.
            for piece in out:
                self._deliver(piece)
            if self.chunks.done:
                self._end()
        elif self.left is not None:
            piece = data[: self.left]
            self.left -= len(piece)
            self._deliver(piece)
            if not self.left:
                self._end()
        else:
            self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        if not data:
            return
        if self.body is None:
            self.pending.append(data)
        else:
            self.body.dataReceived(data)

    def deliverTo(self, protocol: Protocol) -> None:
        self.body = protocol
        protocol.makeConnection(_BodyTransport(self))
        pending, self.pending = self.pending, []
        for data in pending:
            if self.body is None:
                break
            protocol.dataReceived(data)
        if self.ended:
            self._finishBody(RESPONSE_DONE)
        elif self.lost:
            self._finishBody(self._lostReason)

    def _end(self) -> None:
        self.ended = True
        if self.body is not None:
            self._finishBody(RESPONSE_DONE)
        if self.keep and not self.lost:
            self.agent.putBack(self)
        else:
            self.close()

    def _finishBody(self, reason: Failure) -> None:
        body, self.body = self.body, None
        if body is not None:
            body.connectionLost(reason)

    # -- the connection's end

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.lost = True
        self.agent.forget(self)
        waiting, self.waiting = self.waiting, None
        if waiting is not None and not waiting.called:
            # No answer at all: the Agent's word for it, which forward.py retries once.
            waiting.errback(Failure(ResponseNeverReceived([reason])))
            return
        if self.inBody and not self.ended:
            self._lostReason = (
                Failure(http.PotentialDataLoss())
                if self.left is None and self.chunks is None
                else Failure(ResponseFailed([reason]))
            )
            self.ended = True
            if self.body is not None:
                self._finishBody(self._lostReason)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.loseConnection()

    def abort(self) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.abortConnection()


@implementer(IAgent)
class LeanAgent:
    """An IAgent for forwarding: lean connections for in-memory bodies, the fallback Agent for the rest."""

    def __init__(
        self,
        reactor: Any,
        endpoints: IAgentEndpointFactory,
        fallback: IAgent,
        idleTimeout: float,
        fresh: bool = False,
    ) -> None:
        self.reactor = reactor
        self.endpoints = endpoints
        self.fallback = fallback
        self.idleTimeout = idleTimeout
        self.fresh = fresh  # always a new connection (the retry's agent), none kept
        self.idle: dict[tuple[bytes, bytes, int], list[_Connection]] = {}
        self.spares: dict[tuple[bytes, bytes, int], defer.Deferred[Any]] = {}
        self._origins: dict[tuple[bytes, bytes], tuple[tuple[bytes, bytes, int], bytes, URI]] = {}
        self.closed = False

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | RawHeaders | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> defer.Deferred[IResponse]:
        body = getattr(bodyProducer, "data", None) if bodyProducer is not None else b""
        if not isinstance(body, bytes):
            if isinstance(headers, RawHeaders):
                headers = headers.twisted()
            return self.fallback.request(method, uri, headers, bodyProducer)
        scheme, _, rest = uri.partition(b"://")
        netloc, slash, tail = rest.partition(b"/")
        key, host, parsed = self._origin(scheme, netloc)
        lines = [method + b" " + (slash + tail or b"/") + b" HTTP/1.1", b"Host: " + host]
        for name, values in headers.getAllRawHeaders() if headers is not None else ():
            lines.extend(name + b": " + value for value in values)
        if bodyProducer is not None:
            lines.append(b"Content-Length: %d" % len(body))
        data = b"\r\n".join(lines) + b"\r\n\r\n" + body
        kept = self._take(key)
        if kept is not None:
            sent = kept.send(data, method)
            if not self.fresh and not self.idle.get(key):
                # The next request finds a connection ready too, rather than
                # every other one waiting for its connect.
                self._spare(key, parsed)
            return sent
        connecting = self._connect(key, parsed)
        if not self.fresh:
            self._spare(key, parsed)
        made: list[_Connection] = []

        def cancel(_: object) -> None:
            if made:
                made[0].abort()
            else:
                connecting.cancel()

        answer: defer.Deferred[IResponse] = defer.Deferred(cancel)

        def settle(result: Any) -> None:
            if not answer.called:  # else it was cancelled, and the connection aborted
                if isinstance(result, Failure):
                    answer.errback(result)
                else:
                    answer.callback(result)

        def connected(connection: _Connection) -> None:
            made.append(connection)
            if answer.called:
                connection.close()
                return
            connection.send(data, method).addBoth(settle)

        connecting.addCallbacks(connected, settle)
        return answer

    def _origin(self, scheme: bytes, netloc: bytes) -> tuple[tuple[bytes, bytes, int], bytes, URI]:
        """A backend's pool key, Host header and address, worked out once: there are few backends."""
        found = self._origins.get((scheme, netloc))
        if found is None:
            parsed = URI.fromBytes(scheme + b"://" + netloc)
            default = {b"http": 80, b"https": 443}.get(parsed.scheme)
            host = parsed.host if parsed.port == default else b"%s:%d" % (parsed.host, parsed.port)
            if b":" in parsed.host and not parsed.host.startswith(b"["):
                host = b"[%s]:%d" % (parsed.host, parsed.port)
            found = self._origins[(scheme, netloc)] = (
                (parsed.scheme, parsed.host, parsed.port),
                host,
                parsed,
            )
        return found

    def _connect(self, key: tuple[bytes, bytes, int], uri: URI) -> defer.Deferred[_Connection]:
        endpoint: IStreamClientEndpoint = self.endpoints.endpointForURI(uri)
        factory = Factory.forProtocol(lambda: _Connection(self, key))
        factory.noisy = False
        d: defer.Deferred[_Connection] = endpoint.connect(factory)  # type: ignore[assignment]
        return d

    def _spare(self, key: tuple[bytes, bytes, int], uri: URI) -> None:
        """
        One more connection, kept for the next request, whenever none is:
        llama-server closes each after a streamed answer.
        """
        if key in self.spares or self.closed:
            return
        spare = self.spares[key] = self._connect(key, uri)
        spare.addCallbacks(self.putBack, lambda _: None)

        def settled(_: None) -> None:
            # Not a lambda returning pop's value: that is this very Deferred.
            self.spares.pop(key, None)

        spare.addBoth(settled)

    def _take(self, key: tuple[bytes, bytes, int]) -> _Connection | None:
        connections = self.idle.get(key) or []
        while connections:
            connection = connections.pop()
            connection.idle.stop()
            if not connection.lost:
                return connection
        return None

    def putBack(self, connection: _Connection) -> None:
        if self.fresh or self.closed:
            connection.close()
            return
        self.idle.setdefault(connection.key, []).append(connection)
        connection.idle.arm(self.idleTimeout, connection.close)

    def forget(self, connection: _Connection) -> None:
        connections = self.idle.get(connection.key)
        if connections and connection in connections:
            connections.remove(connection)
        connection.idle.cancel()

    def closeCachedConnections(self) -> defer.Deferred[None]:
        self.closed = True
        for spare in list(self.spares.values()):
            spare.cancel()
        for connections in self.idle.values():
            for connection in list(connections):
                connection.abort()
        self.idle = {}
        return defer.succeed(None)
