"""
The proxy end to end: real sockets on 127.0.0.1, a real HTTP client (treq),
bioproxy built by makeService exactly as twistd builds it.
"""

from __future__ import annotations

import hashlib
import json
from io import BytesIO
from typing import Any

import treq
from twisted.internet import defer, reactor
from twisted.internet.protocol import Protocol
from twisted.trial.unittest import TestCase
from twisted.web.client import ResponseFailed
from twisted.web.iweb import UNKNOWN_LENGTH, IBodyProducer
from zope.interface import implementer

from bioproxy.config import validate
from bioproxy.service import makeService

from ..helpers import Recorder, asyncTest, boundPort, client, listen, sleep

R: Any = reactor


def startProxy(testCase: TestCase, backendURL: str, **overrides: Any) -> str:
    """Start bioproxy on ephemeral ports; return the proxy's base URL."""
    config = validate(
        {
            "backend_url": backendURL,
            "listen": "tcp:0:interface=127.0.0.1",
            "admin_listen": "tcp:0:interface=127.0.0.1",
            "health_check_interval": 60,
            **overrides,
        }
    )
    service = makeService(config, R)
    service.startService()
    testCase.addCleanup(service.stopService)
    testCase.service = service  # type: ignore[attr-defined]
    return f"http://127.0.0.1:{boundPort(service, 'proxy')}"


@implementer(IBodyProducer)
class _Unsized:
    """A body producer of unknown length, so treq uploads it chunked."""

    length = UNKNOWN_LENGTH

    def __init__(self, parts: list[bytes]) -> None:
        self.parts = parts

    def startProducing(self, consumer: Any) -> defer.Deferred[None]:
        for part in self.parts:
            consumer.write(part)
        return defer.succeed(None)

    def stopProducing(self) -> None:
        pass

    def pauseProducing(self) -> None:
        pass

    def resumeProducing(self) -> None:
        pass


class _Timed(Protocol):
    """Collects body chunks with their arrival times."""

    def __init__(self) -> None:
        self.chunks: list[tuple[float, bytes]] = []
        self.done: defer.Deferred[Any] = defer.Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append((R.seconds(), data))

    def connectionLost(self, reason: Any = None) -> None:
        self.reason = reason
        self.done.callback(None)


class ForwardingTests(TestCase):
    def setUp(self) -> None:
        self.backend = Recorder(R)
        self.backendURL = listen(R, self.backend, self)
        self.proxy = startProxy(self, self.backendURL, max_body_bytes=8 * 1024 * 1024, backend_timeout=0.5)
        self.http = client(self)

    @asyncTest
    async def test_methodsPathsAndQueries(self) -> None:
        for method in ("GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            body = f"body of {method}".encode() if method in ("POST", "PUT", "PATCH") else None
            response = await self.http.request(method, self.proxy + "/echo/a%20b?x=1&y=2", data=body)
            self.assertEqual(response.code, 200)
            await treq.content(response)
            seen = self.backend.seen[-1]
            self.assertEqual((seen["method"], seen["uri"]), (method, "/echo/a%20b?x=1&y=2"))
            self.assertEqual(seen["body"], body or b"")

    @asyncTest
    async def test_headersBothWays(self) -> None:
        response = await self.http.get(
            self.proxy + "/multi",
            headers={
                "X-Multi": ["one", "two"],
                "Connection": "X-Secret",
                "X-Secret": "hop-only",
                "Keep-Alive": "timeout=5",
                "Proxy-Authorization": "Basic abc",
                "X-Forwarded-For": "10.0.0.1",
            },
        )
        self.assertEqual(await treq.content(response), b"hello")
        self.assertEqual(response.headers.getRawHeaders("set-cookie"), ["a=1", "b=2"])
        self.assertEqual(response.length, 5)  # Agent reports Content-Length here
        seen = self.backend.seen[-1]["headers"]
        self.assertEqual(seen["x-multi"], ["one", "two"])
        for hop in ("x-secret", "keep-alive", "proxy-authorization"):
            self.assertNotIn(hop, seen)
        self.assertEqual(seen["host"], [self.backendURL.split("//")[1]])
        self.assertEqual(seen["x-forwarded-for"], ["10.0.0.1, 127.0.0.1"])
        self.assertEqual(seen["x-forwarded-proto"], ["http"])

    @asyncTest
    async def test_chunkedUpload(self) -> None:
        parts = [b"first,", b"second,", b"third"]
        response = await self.http.post(self.proxy + "/echo", data=_Unsized(parts))
        await treq.content(response)
        seen = self.backend.seen[-1]
        self.assertEqual(seen["body"], b"".join(parts))
        # De-chunked on the way: the backend gets an exact length.
        self.assertEqual(seen["headers"]["content-length"], [str(len(b"".join(parts)))])

    @asyncTest
    async def test_largeBody(self) -> None:
        data = bytes(range(256)) * (5 * 1024 * 1024 // 256)
        response = await self.http.post(self.proxy + "/echo", data=BytesIO(data))
        self.assertEqual(response.code, 200)
        await treq.content(response)
        received = self.backend.seen[-1]["body"]
        self.assertEqual(hashlib.sha256(received).digest(), hashlib.sha256(data).digest())

    @asyncTest
    async def test_bodyOverLimit(self) -> None:
        for body in (BytesIO(b"x" * (9 * 1024 * 1024)), _Unsized([b"y" * (3 * 1024 * 1024)] * 3)):
            response = await self.http.post(self.proxy + "/echo", data=body)
            self.assertEqual(response.code, 413)
            error = json.loads(await treq.content(response))["error"]
            self.assertEqual(error["code"], "request_too_large")
        self.assertEqual([s for s in self.backend.seen if s["uri"] != "/health"], [])

    @asyncTest
    async def test_backendUnreachable(self) -> None:
        port = R.listenTCP(0, _nothing(), interface="127.0.0.1")
        deadURL = f"http://127.0.0.1:{port.getHost().port}"
        await port.stopListening()
        proxy = startProxy(self, deadURL)
        response = await self.http.post(proxy + "/v1/chat/completions", json={"messages": []})
        self.assertEqual(response.code, 502)
        error = json.loads(await treq.content(response))["error"]
        self.assertEqual((error["type"], error["code"]), ("server_error", "backend_unavailable"))

    @asyncTest
    async def test_backendTimeout(self) -> None:
        response = await self.http.get(self.proxy + "/hang")
        self.assertEqual(response.code, 504)
        self.assertEqual(json.loads(await treq.content(response))["error"]["code"], "backend_timeout")
        await sleep(R, 0.1)
        self.assertEqual(self.backend.closed, ["/hang"])

    @asyncTest
    async def test_sseEventsArriveOneByOne(self) -> None:
        response = await self.http.get(self.proxy + "/sse?n=5&gap=0.2")
        self.assertEqual(response.headers.getRawHeaders("content-type"), ["text/event-stream"])
        timed = _Timed()
        response.deliverBody(timed)
        await timed.done
        events = [(t, c) for t, c in timed.chunks if c.startswith(b"data: {")]
        self.assertEqual(len(events), 5, timed.chunks)
        gaps = [b[0] - a[0] for a, b in zip(events, events[1:], strict=False)]
        # Each event is passed on when it is made, 0.2 s apart, not bunched.
        self.assertTrue(all(g > 0.1 for g in gaps), gaps)

    @asyncTest
    async def test_clientDisconnectBeforeHeaders(self) -> None:
        d = self.http.get(self.proxy + "/hang")
        await sleep(R, 0.1)
        d.cancel()
        d.addErrback(lambda f: f.trap(defer.CancelledError, ResponseFailed))
        await sleep(R, 0.2)
        self.assertEqual(self.backend.closed, ["/hang"])

    @asyncTest
    async def test_clientDisconnectMidStream(self) -> None:
        response = await self.http.get(self.proxy + "/sse?n=1000&gap=0.02")
        timed = _Timed()
        response.deliverBody(timed)
        await sleep(R, 0.1)
        self.assertTrue(timed.chunks)
        timed.transport.loseConnection()  # type: ignore[union-attr]
        await sleep(R, 0.3)
        self.assertEqual(self.backend.closed, ["/sse"])

    @asyncTest
    async def test_backendDiesMidStream(self) -> None:
        response = await self.http.get(self.proxy + "/die")
        with self.assertRaises(ResponseFailed):
            await treq.content(response)

    @asyncTest
    async def test_slowClientBoundsMemory(self) -> None:
        """A client that stops reading pauses the backend: nothing piles up in the proxy."""
        response = await self.http.get(self.proxy + "/big?mb=512")
        timed = _Timed()
        response.deliverBody(timed)
        timed.transport.pauseProducing()  # type: ignore[union-attr]
        await sleep(R, 1.0)
        produced = self.backend.produced
        # Socket buffers on loopback hold a few MiB; the other ~500 MiB must wait.
        self.assertLess(produced, 48 * 1024 * 1024)
        timed.transport.resumeProducing()  # type: ignore[union-attr]
        timed.transport.loseConnection()  # type: ignore[union-attr]
        await sleep(R, 0.2)


def _nothing() -> Any:
    from twisted.internet.protocol import Factory

    return Factory.forProtocol(Protocol)


class _ClosesReusedConnections(Protocol):
    """
    Answers the first request on each connection, keeping it alive, and
    closes the connection without an answer when a second one arrives, as a
    server does that has just timed the idle connection out.
    """

    def __init__(self, bodies: list[bytes]) -> None:
        self.bodies = bodies
        self.buffer = b""
        self.answered = 0

    def dataReceived(self, data: bytes) -> None:
        self.buffer += data
        head, found, rest = self.buffer.partition(b"\r\n\r\n")
        if not found:
            return
        length = next(
            (
                int(line.split(b":")[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length")
            ),
            0,
        )
        if len(rest) < length:
            return
        self.buffer = rest[length:]
        ours = head.startswith(b"POST /v1/embeddings ")  # not bioproxy's own health checks
        if self.answered:
            if ours:
                self.bodies.append(b"closed unanswered")
            self.transport.loseConnection()  # type: ignore[union-attr]
            return
        self.answered += 1
        if ours:
            self.bodies.append(rest[:length])
        self.transport.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok")  # type: ignore[union-attr]


class RetryTests(TestCase):
    @asyncTest
    async def test_aReusedConnectionTheBackendClosedIsRetried(self) -> None:
        """Issue 14, item 6: the retry sends the same body again on a fresh connection, and the client gets the answer."""
        from twisted.internet.protocol import Factory

        bodies: list[bytes] = []
        port = R.listenTCP(
            0, Factory.forProtocol(lambda: _ClosesReusedConnections(bodies)), interface="127.0.0.1"
        )
        self.addCleanup(port.stopListening)
        proxy = startProxy(self, f"http://127.0.0.1:{port.getHost().port}")
        http = client(self)
        body = b'{"input": "' + b"x" * 5000 + b'"}'
        for _ in range(3):
            response = await http.post(proxy + "/v1/embeddings", data=body)
            self.assertEqual((response.code, await treq.content(response)), (200, b"ok"))
        # Requests met closed connections, and were sent again, whole, on fresh ones.
        self.assertEqual([b for b in bodies if b != b"closed unanswered"], [body] * 3)
        self.assertGreaterEqual(bodies.count(b"closed unanswered"), 1)
