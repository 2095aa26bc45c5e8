"""
The proxy Site and Forwarder in memory: a StringTransport for the client,
treq's RequestTraversalAgent for the backend, a Clock for time.
"""

from __future__ import annotations

import json
from typing import Any

from treq.testing import RequestTraversalAgent
from twisted.internet import defer
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectionDone, ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport, StringTransportWithDisconnection
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase
from twisted.web._newclient import RequestNotSent, ResponseFailed, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from bioproxy.forward import Forwarder
from bioproxy.headers import RawHeaders
from bioproxy.metrics import Metrics
from bioproxy.proxy import ProxyResource
from bioproxy.serve import ProxyRequest, ProxySite


class Backend(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []
        self.gone: list[bytes] = []

    def render(self, request: Request) -> bytes | int:
        self.requests.append(request)
        request.notifyFinish().addErrback(lambda _: self.gone.append(request.path))
        if request.path == b"/hang":
            return NOT_DONE_YET
        if request.path == b"/drip":  # the test writes the body
            request.setHeader(b"content-type", b"text/event-stream")
            request.write(b"data: 1\n\n")
            return NOT_DONE_YET
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"got": len(request.content.read())}).encode()


class _Refusing:
    def request(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.fail(ConnectionRefusedError("nobody home"))


class _Lost:
    def request(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        return defer.fail(ResponseFailed([Failure(ConnectionDone())]))


class _StaleOnce:
    """A pool whose first connection the backend had just closed: the request is never sent."""

    def __init__(self, backend: Resource) -> None:
        self.agent = RequestTraversalAgent(backend)
        self.calls = 0

    def request(self, *args: Any, **kwargs: Any) -> defer.Deferred[Any]:
        self.calls += 1
        if self.calls == 1:
            return defer.fail(RequestNotSent())
        return self.agent.request(*args, **kwargs)

    def flush(self) -> None:
        self.agent.flush()


class _ClosedAfterSending:
    """A pooled connection the backend closes once the request is sent: the body was consumed."""

    def __init__(self, backend: Resource) -> None:
        self.agent = RequestTraversalAgent(backend)
        self.calls = 0
        self.bodies: list[bytes] = []

    def request(self, method: bytes, uri: bytes, headers: Any = None, bodyProducer: Any = None) -> Any:
        self.calls += 1
        if self.calls > 1:
            return self.agent.request(method, uri, headers, bodyProducer)
        consumer = _Collect()
        sent = bodyProducer.startProducing(consumer)
        sent.addCallback(lambda _: self.bodies.append(b"".join(consumer.chunks)))
        return sent.addCallback(lambda _: defer.fail(ResponseNeverReceived([Failure(ConnectionDone())])))

    def flush(self) -> None:
        self.agent.flush()


class _Collect:
    def __init__(self) -> None:
        self.chunks: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.chunks.append(data)


class Harness:
    def __init__(
        self, agent: Any = None, maxBody: int = 1000, timeout: float = 5.0, idleTimeout: float = 600.0
    ) -> None:
        self.clock = Clock()
        self.backend = Backend()
        self.agent = agent or RequestTraversalAgent(self.backend)
        self.metrics = Metrics()
        forwarder = Forwarder(
            self.agent, "http://backend:8081", self.clock, self.metrics, timeout, idleTimeout=idleTimeout
        )
        self.site = ProxySite(ProxyResource(forwarder), self.metrics, self.clock, maxBody)

    def connect(self) -> tuple[Any, StringTransport]:
        channel = self.site.buildProtocol(IPv4Address("TCP", "127.0.0.1", 5555))
        transport = StringTransportWithDisconnection(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        transport.protocol = channel
        channel.makeConnection(transport)
        return channel, transport

    def send(self, raw: bytes) -> tuple[Any, StringTransport]:
        channel, transport = self.connect()
        channel.dataReceived(raw)
        self.flush()
        return channel, transport

    def flush(self) -> None:
        if isinstance(self.agent, RequestTraversalAgent):
            self.agent.flush()
        self.clock.advance(0)
        if isinstance(self.agent, RequestTraversalAgent):
            self.agent.flush()

    def sample(self, name: str, **labels: str) -> float | None:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value


def status(transport: StringTransport) -> int:
    return int(transport.value().split(b" ", 2)[1])


def body(transport: StringTransport) -> Any:
    raw = transport.value().split(b"\r\n\r\n", 1)[1]
    if b"transfer-encoding: chunked" in transport.value().lower():
        raw = raw.split(b"\r\n", 1)[1].rsplit(b"\r\n0\r\n", 1)[0]
    return json.loads(raw)


class ForwardTests(TestCase):
    def test_forwardsAndCounts(self) -> None:
        h = Harness()
        _, transport = h.send(b"POST /tokenize HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nhello")
        self.assertEqual(status(transport), 200)
        self.assertEqual(body(transport), {"got": 5})
        labels = {"path": "/tokenize", "method": "POST", "status": "200", "prefix": ""}
        self.assertEqual(h.sample("bioproxy_requests_total", **labels), 1.0)
        self.assertEqual(h.sample("bioproxy_requests_in_flight"), 0.0)
        self.assertEqual(h.sample("bioproxy_request_duration_seconds_count", path="/tokenize"), 1.0)

    def test_unknownPathsShareOneLabel(self) -> None:
        h = Harness()
        h.send(b"GET /made/up/1 HTTP/1.1\r\nHost: p\r\n\r\n")
        h.send(b"GET /made/up/2 HTTP/1.1\r\nHost: p\r\n\r\n")
        labels = {"path": "other", "method": "GET", "status": "200", "prefix": ""}
        self.assertEqual(h.sample("bioproxy_requests_total", **labels), 2.0)

    def test_declaredBodyTooLarge(self) -> None:
        h = Harness(maxBody=10)
        _, transport = h.send(
            b"POST /v1/completions HTTP/1.1\r\nHost: p\r\nContent-Length: 11\r\n\r\n" + b"x" * 11
        )
        self.assertEqual(status(transport), 413)
        self.assertEqual(body(transport)["error"]["type"], "invalid_request_error")
        self.assertEqual(h.backend.requests, [])

    def test_chunkedBodyTooLarge(self) -> None:
        h = Harness(maxBody=10)
        chunks = b"6\r\nxxxxxx\r\n6\r\nyyyyyy\r\n0\r\n\r\n"
        _, transport = h.send(
            b"POST /completion HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks
        )
        self.assertEqual(status(transport), 413)
        self.assertEqual(h.backend.requests, [])

    def test_bodyAtTheLimitPasses(self) -> None:
        h = Harness(maxBody=10)
        _, transport = h.send(b"POST /upload HTTP/1.1\r\nHost: p\r\nContent-Length: 10\r\n\r\n" + b"x" * 10)
        self.assertEqual(body(transport), {"got": 10})

    def test_timeoutIs504AndClosesBackend(self) -> None:
        h = Harness(timeout=5)
        _, transport = h.send(b"GET /hang HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertEqual(transport.value(), b"")
        h.clock.advance(5)
        h.flush()
        self.assertEqual(status(transport), 504)
        self.assertEqual(body(transport)["error"]["code"], "backend_timeout")
        self.assertEqual(h.backend.gone, [b"/hang"])
        self.assertEqual(
            h.sample("bioproxy_backend_errors_total", backend="http://backend:8081", kind="timeout"), 1.0
        )

    def test_backendSilentForIdleTimeoutIsCutOff(self) -> None:
        """
        backend_idle_timeout counts from the backend's last bytes, not from
        the first: a backend that keeps sending is never cut off.
        """
        h = Harness(idleTimeout=10.0)
        _, transport = h.send(b"GET /drip HTTP/1.1\r\nHost: x\r\n\r\n")
        (backendRequest,) = h.backend.requests
        for _ in range(3):  # 24 s in all, never 10 s without bytes
            h.clock.advance(8)
            backendRequest.write(b"data: more\n\n")
            h.flush()
        self.assertFalse(transport.disconnected)
        self.assertEqual(
            h.sample("bioproxy_backend_errors_total", backend="http://backend:8081", kind="idle"), None
        )
        h.clock.advance(9.5)
        self.assertFalse(transport.disconnected)
        h.clock.advance(0.5)
        h.flush()
        self.assertTrue(transport.disconnected)
        self.assertEqual(
            h.sample("bioproxy_backend_errors_total", backend="http://backend:8081", kind="idle"), 1.0
        )
        self.assertEqual(transport.value().count(b"data: more"), 3)

    def test_unreachableIs502(self) -> None:
        h = Harness(agent=_Refusing())
        _, transport = h.send(b"GET /v1/models HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertEqual(status(transport), 502)
        self.assertIn("unreachable", body(transport)["error"]["message"])
        self.assertEqual(
            h.sample("bioproxy_backend_errors_total", backend="http://backend:8081", kind="connect"), 1.0
        )

    def test_aRefusalSaysTheRequestDidNotReachTheBackend(self) -> None:
        """What the router places again (issue 26, item 5): no connection, no work, no 502 written."""
        for agent, reached in ((_Refusing(), False), (_Lost(), True)):
            h = Harness(agent=agent)
            forwarder = Forwarder(agent, "http://backend:8081", h.clock, h.metrics, 5.0)
            channel, transport = h.connect()
            request = ProxyRequest(channel, b"GET", b"/v1/models", b"HTTP/1.1", RawHeaders())
            outcome = self.successResultOf(forwarder.forward(request, replaceable=True))
            self.assertEqual((outcome.error, outcome.status, outcome.reached), ("connect", None, reached))
            self.assertEqual(transport.value(), b"")

    def test_requestNotSentOnAStaleConnectionIsRetriedOnce(self) -> None:
        stale = _StaleOnce(Backend())
        h = Harness(agent=stale)
        _, transport = h.send(b"POST /tokenize HTTP/1.1\r\nHost: p\r\nContent-Length: 2\r\n\r\n{}")
        stale.flush()
        h.clock.advance(0)
        stale.flush()
        self.assertEqual((stale.calls, status(transport)), (2, 200))
        self.assertEqual(body(transport), {"got": 2})

    def test_retryAfterTheBodyWasSentSendsItAgain(self) -> None:
        closing = _ClosedAfterSending(Backend())
        h = Harness(agent=closing)
        _, transport = h.send(b"POST /tokenize HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nhello")
        for _ in range(5):
            h.clock.advance(0)
            closing.flush()
        self.assertEqual(closing.bodies, [b"hello"])
        self.assertEqual((closing.calls, status(transport)), (2, 200))
        self.assertEqual(body(transport), {"got": 5})

    def test_clientGoneBeforeHeadersCancelsBackend(self) -> None:
        h = Harness()
        channel, _ = h.send(b"GET /hang HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertEqual(len(h.backend.requests), 1)
        channel.connectionLost(Failure(ConnectionDone()))
        h.flush()
        self.assertEqual(h.backend.gone, [b"/hang"])
        labels = {"path": "other", "method": "GET", "status": "499", "prefix": ""}
        self.assertEqual(h.sample("bioproxy_requests_total", **labels), 1.0)
        self.assertEqual(h.sample("bioproxy_requests_in_flight"), 0.0)

    def test_drainWaitsForInFlight(self) -> None:
        h = Harness(timeout=100)
        _, transport = h.send(b"GET /hang HTTP/1.1\r\nHost: p\r\n\r\n")
        drained = defer.ensureDeferred(h.site.drain(grace=30))
        h.clock.advance(10)
        self.assertNoResult(drained)
        request = h.backend.requests[0]
        request.write(b"{}")
        request.finish()
        h.flush()
        h.clock.advance(0.1)
        self.successResultOf(drained)
        # The response went out whole, then the connection was closed.
        self.assertTrue(transport.value().endswith(b"0\r\n\r\n"))
        self.assertFalse(transport.connected)

    def test_drainGivesUpAfterGrace(self) -> None:
        h = Harness(timeout=100)
        h.send(b"GET /hang HTTP/1.1\r\nHost: p\r\n\r\n")
        drained = defer.ensureDeferred(h.site.drain(grace=30))
        h.clock.advance(29)
        self.assertNoResult(drained)
        h.clock.advance(1)
        self.successResultOf(drained)
