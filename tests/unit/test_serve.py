"""
The proxy port's HTTP/1.1 server (bioproxy/serve.py) in memory: framing of
requests however their bytes are split, pipelining, refusals, deadlines,
Expect: 100-continue, HEAD, HTTP/1.0, and the response's framing.
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransportWithDisconnection
from twisted.trial.unittest import SynchronousTestCase

from bioproxy.metrics import Metrics
from bioproxy.serve import READ_AHEAD, ProxyRequest, ProxySite


class Echo:
    """Answers each request with what it got, at once or when the test says."""

    def __init__(self, now: bool = True) -> None:
        self.now = now
        self.seen: list[tuple[bytes, bytes, bytes]] = []
        self.waiting: list[ProxyRequest] = []
        self.requests: list[ProxyRequest] = []

    def render(self, request: ProxyRequest) -> None:
        self.requests.append(request)
        self.seen.append((request.method, request.uri, request.content.read()))
        if self.now:
            answer(request)
        else:
            self.waiting.append(request)


def answer(request: ProxyRequest, body: bytes | None = None, sized: bool = False) -> None:
    if body is None:
        body = b"%s %s %d" % (request.method, request.uri, request.content.seek(0, 2))
    request.setHeader(b"content-type", b"text/plain")
    if sized:
        request.setHeader(b"content-length", b"%d" % len(body))
    request.write(body)
    request.finish()


class Connection:
    def __init__(self, renderer: Any = None, maxBody: int = 1000, timeout: float = 60.0) -> None:
        self.clock = Clock()
        self.renderer = renderer or Echo()
        self.site = ProxySite(self.renderer, Metrics(), self.clock, maxBody, accessLog=False, timeout=timeout)
        self.channel = self.site.buildProtocol(None)
        self.transport = StringTransportWithDisconnection(peerAddress=IPv4Address("TCP", "127.0.0.1", 5555))
        self.transport.protocol = self.channel
        self.channel.makeConnection(self.transport)

    def send(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.channel.dataReceived(piece)

    def responses(self) -> list[tuple[int, dict[bytes, bytes], bytes]]:
        return parseResponses(self.transport.value())

    @property
    def closed(self) -> bool:
        return not self.transport.connected or bool(self.transport.disconnecting)


def parseResponses(raw: bytes) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Every whole response in raw: status, headers (lower-case names), decoded body."""
    out = []
    while raw:
        head, found, raw = raw.partition(b"\r\n\r\n")
        if not found:
            break
        first, *lines = head.split(b"\r\n")
        status = int(first.split(b" ")[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        if status == 100:
            out.append((status, headers, b""))
            continue
        if headers.get(b"transfer-encoding") == b"chunked":
            body = b""
            while True:
                size, _, raw = raw.partition(b"\r\n")
                n = int(size, 16)
                body, raw = body + raw[:n], raw[n + 2 :]
                if not n:
                    break
        else:
            n = int(headers.get(b"content-length", b"0"))
            body, raw = raw[:n], raw[n:]
        out.append((status, headers, body))
    return out


def chunked(body: bytes, size: int) -> bytes:
    pieces = [body[i : i + size] for i in range(0, len(body), size)]
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


requests = st.lists(
    st.tuples(
        st.sampled_from([b"GET", b"POST-length", b"POST-chunked", b"HEAD"]),
        st.binary(max_size=60),
        st.integers(min_value=1, max_value=9),
    ),
    min_size=1,
    max_size=5,
)


def encode(method: str | bytes, i: int, body: bytes, chunk: int) -> tuple[bytes, tuple[bytes, bytes, bytes]]:
    uri = b"/r/%d?q=%d" % (i, i)
    if method == b"GET" or method == b"HEAD":
        return b"%s %s HTTP/1.1\r\nHost: p\r\n\r\n" % (method, uri), (bytes(method), uri, b"")
    if method == b"POST-length":
        raw = b"POST %s HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n%s" % (uri, len(body), body)
    else:
        raw = b"POST %s HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n" % uri + chunked(
            body, chunk
        )
    return raw, (b"POST", uri, body)


class FramingTests(SynchronousTestCase):
    @settings(max_examples=150, deadline=None)
    @given(requests, st.lists(st.integers(min_value=1, max_value=40), min_size=1, max_size=40), st.booleans())
    def test_pipelinedRequestsHoweverSplit(
        self, spec: list[tuple[bytes, bytes, int]], cuts: list[int], now: bool
    ) -> None:
        """Each request is read whole, once, in order, and answered in order, however the bytes come."""
        wire, expected = b"", []
        for i, (method, body, chunk) in enumerate(spec):
            raw, seen = encode(method, i, body, chunk)
            wire += raw
            expected.append(seen)
        c = Connection(Echo(now))
        at = 0
        for cut in cuts * (len(wire) // sum(cuts) + 1):
            c.send(wire[at : at + cut])
            at += cut
            if not now:
                while c.renderer.waiting:
                    answer(c.renderer.waiting.pop(0))
            if at >= len(wire):
                break
        self.assertEqual(c.renderer.seen, expected)
        got = c.responses()
        self.assertEqual([r[0] for r in got], [200] * len(spec))
        for (_, _, body), (method, uri, sent) in zip(got, expected, strict=True):
            if method == b"HEAD":
                self.assertEqual(body, b"")
            else:
                self.assertEqual(body, b"%s %s %d" % (method, uri, len(sent)))
        self.assertFalse(c.closed)

    def test_sizedResponseIsNotChunked(self) -> None:
        renderer = Echo(now=False)
        c = Connection(renderer)
        c.send(b"GET / HTTP/1.1\r\nHost: p\r\n\r\n")
        answer(renderer.waiting.pop(), b"hello", sized=True)
        [(status, headers, body)] = c.responses()
        self.assertEqual((status, body, headers.get(b"transfer-encoding")), (200, b"hello", None))

    def test_noBodyCodes(self) -> None:
        renderer = Echo(now=False)
        c = Connection(renderer)
        c.send(b"DELETE /x HTTP/1.1\r\nHost: p\r\n\r\n")
        request = renderer.waiting.pop()
        request.setResponseCode(204)
        request.write(b"ignored")
        request.finish()
        # No body, no length, no chunking: the status and the request's id alone.
        self.assertEqual(
            c.transport.value(), b"HTTP/1.1 204 No Content\r\nx-request-id: %s\r\n\r\n" % request.requestId
        )

    def test_emptyResponseIsSized(self) -> None:
        renderer = Echo(now=False)
        c = Connection(renderer)
        c.send(b"GET / HTTP/1.1\r\nHost: p\r\n\r\n")
        renderer.waiting.pop().finish()
        [(status, headers, body)] = c.responses()
        self.assertEqual((status, headers[b"content-length"], body), (200, b"0", b""))

    def test_http10ClosesAndIsNotChunked(self) -> None:
        c = Connection()
        c.send(b"GET /old HTTP/1.0\r\n\r\n")
        raw = c.transport.value()
        self.assertNotIn(b"chunked", raw)
        self.assertTrue(raw.endswith(b"GET /old 0"))
        self.assertIn(b"connection: close", raw.lower())
        self.assertTrue(c.closed)

    def test_connectionCloseIsHonoured(self) -> None:
        c = Connection()
        c.send(b"GET /a HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\nGET /b HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertEqual([s[1] for s in c.renderer.seen], [b"/a"])
        [(status, headers, _)] = c.responses()
        self.assertEqual(headers[b"connection"], b"close")
        self.assertTrue(c.closed)

    def test_headersAndAddress(self) -> None:
        renderer = Echo(now=False)
        c = Connection(renderer)
        c.send(b"GET /p?x=1 HTTP/1.1\r\nHost: p\r\nX-A: one\r\nx-a: two\r\nAuthorization:  Bearer k \r\n\r\n")
        request = renderer.waiting.pop()
        self.assertEqual((request.path, request.uri), (b"/p", b"/p?x=1"))
        self.assertEqual(request.requestHeaders.getRawHeaders(b"x-a"), [b"one", b"two"])
        self.assertEqual(request.getHeader(b"authorization"), b"Bearer k")
        self.assertEqual(request.getClientAddress().host, "127.0.0.1")  # type: ignore[attr-defined]
        self.assertFalse(request.isSecure())

    def test_emptyLinesBeforeARequestAreSkipped(self) -> None:
        c = Connection()
        c.send(b"\r\n\r\nGET / HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertEqual([r[0] for r in c.responses()], [200])

    def test_largeBodyGoesToAFile(self) -> None:
        c = Connection(maxBody=4 << 20)
        body = bytes(range(256)) * (6 << 10)  # 1.5 MiB
        c.send(b"POST /up HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % len(body), body)
        [(_, _, got)] = c.renderer.seen
        self.assertEqual(got, body)
        self.assertEqual(c.responses()[0][2], b"POST /up %d" % len(body))
        self.assertNotIsInstance(c.renderer.requests[0].content, BytesIO)


class RefusalTests(SynchronousTestCase):
    def assertRefused(self, raw: bytes, status: int, code: str | None = None) -> Connection:
        c = Connection()
        c.send(raw)
        [(got, headers, body)] = c.responses()
        self.assertEqual(got, status, raw[:60])
        self.assertEqual(headers[b"content-type"], b"application/json")
        error = json.loads(body)["error"]
        if code is not None:
            self.assertEqual(error["code"], code)
        self.assertTrue(c.closed)
        self.assertEqual(c.renderer.seen, [])
        return c

    def test_tooLong(self) -> None:
        self.assertRefused(b"GET /" + b"a" * 20000, 414, "uri_too_long")
        self.assertRefused(b"GET /" + b"a" * 20000 + b" HTTP/1.1\r\nHost: p\r\n\r\n", 414)
        # A header line still coming is refused once the head passes MAX_HEAD.
        self.assertRefused(b"GET / HTTP/1.1\r\nX-Big: " + b"b" * 40000, 431)
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: p\r\nX-Big: " + b"b" * 20000 + b"\r\n\r\n", 431)
        many = b"".join(b"X-%d: v\r\n" % i for i in range(501))
        self.assertRefused(b"GET / HTTP/1.1\r\nHost: p\r\n" + many + b"\r\n", 431, "headers_too_large")

    def test_malformed(self) -> None:
        for raw in (
            b"NONSENSE\r\n\r\n",
            b"GET / HTTP/2.0\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: p\r\nNo-Colon\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: p\r\nX-Space : v\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: p\r\nX-A: v\r\n folded\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: p\r\nX-A: v\nX-Smuggled: w\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: p\r\nX-A: v\rX-Smuggled: w\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
            b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: -3\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            b"POST / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"POST / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n-5\r\nabc\r\n",
        ):
            self.assertRefused(raw, 400, "invalid_request")

    def test_declaredTooLarge(self) -> None:
        c = Connection(maxBody=10)
        c.send(b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 11\r\n\r\n", b"x" * 11)
        [(status, headers, body)] = c.responses()
        self.assertEqual((status, json.loads(body)["error"]["code"]), (413, "request_too_large"))
        self.assertEqual(c.renderer.seen, [])
        self.assertTrue(c.closed)

    def test_chunkedTooLarge(self) -> None:
        c = Connection(maxBody=10)
        c.send(b"POST / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n", chunked(b"y" * 12, 6))
        [(status, _, _)] = c.responses()
        self.assertEqual(status, 413)
        self.assertEqual(c.renderer.seen, [])

    def test_chunkedInHTTP10IsRefused(self) -> None:
        """Issue 26, item 9: HTTP/1.0 has no chunked coding (RFC 9112, section 6.1)."""
        c = Connection(maxBody=100)
        c.send(b"POST / HTTP/1.0\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n", chunked(b"y" * 12, 6))
        [(status, _, _)] = c.responses()
        self.assertEqual(status, 400)
        self.assertEqual(c.renderer.seen, [])
        self.assertTrue(c.closed)

    def test_expectContinue(self) -> None:
        c = Connection(maxBody=10)
        c.send(b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n")
        self.assertEqual(c.transport.value(), b"HTTP/1.1 100 Continue\r\n\r\n")
        c.send(b"abcd")
        self.assertEqual([r[0] for r in c.responses()], [100, 200])

    def test_expectContinueTooLarge(self) -> None:
        """The point of Expect: the client learns of the limit before it sends the body."""
        c = Connection(maxBody=10)
        c.send(b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 400\r\nExpect: 100-continue\r\n\r\n")
        self.assertEqual([r[0] for r in c.responses()], [413])


class DeadlineTests(SynchronousTestCase):
    def test_slowHeadIs408(self) -> None:
        c = Connection(timeout=10)
        c.send(b"GET / HT")
        c.clock.advance(9)
        c.send(b"TP/1.1\r\nHost:")
        self.assertFalse(c.closed)
        c.clock.advance(1)
        [(status, _, body)] = c.responses()
        self.assertEqual((status, json.loads(body)["error"]["code"]), (408, "request_timeout"))
        self.assertTrue(c.closed)

    def test_slowBodyIs408(self) -> None:
        c = Connection(timeout=10)
        c.send(b"POST / HTTP/1.1\r\nHost: p\r\nContent-Length: 5\r\n\r\nab")
        c.clock.advance(10)
        self.assertEqual([r[0] for r in c.responses()], [408])
        self.assertEqual(c.renderer.seen, [])

    def test_answeringIsNotTimedOut(self) -> None:
        renderer = Echo(now=False)
        c = Connection(renderer, timeout=10)
        c.send(b"GET / HTTP/1.1\r\nHost: p\r\n\r\n")
        c.clock.advance(100)
        self.assertFalse(c.closed)
        answer(renderer.waiting.pop())
        self.assertEqual([r[0] for r in c.responses()], [200])
        c.clock.advance(9)
        self.assertFalse(c.closed)
        c.clock.advance(1)  # idle for the timeout: closed, silently
        self.assertTrue(c.closed)
        self.assertEqual(len(c.responses()), 1)

    def test_deadlineCountsFromTheFirstByte(self) -> None:
        """The idle timer, already running, is not what times the request."""
        c = Connection(timeout=10)
        c.clock.advance(5)
        c.send(b"GET / HT")
        c.clock.advance(9)
        self.assertFalse(c.closed)
        c.clock.advance(1)
        self.assertEqual([r[0] for r in c.responses()], [408])

    def test_oneTimerPerConnection(self) -> None:
        """Requests on a kept-alive connection move its one timer; they do not pile up timers."""
        c = Connection(timeout=10)
        timers: list[float] = []
        callLater = c.clock.callLater

        def counted(delay: float, f: Any, *a: Any, **kw: Any) -> Any:
            if delay:  # not the site's record of the request, a turn later
                timers.append(delay)
            return callLater(delay, f, *a, **kw)

        c.clock.callLater = counted  # type: ignore[method-assign]
        for _ in range(5):
            c.send(b"GET / HTTP/1.1\r\nHost: p\r\n\r\n")
            c.clock.advance(0)
            self.assertEqual(len(c.clock.getDelayedCalls()), 1)
            c.clock.advance(3)
        # Armed at the start for 10 s; at 10 s it finds the last request
        # ended at 12 s and waits for the rest: one more, not ten.
        self.assertEqual(len(timers), 1)
        self.assertEqual([r[0] for r in c.responses()], [200] * 5)
        c.clock.advance(6.9)
        self.assertFalse(c.closed)
        c.clock.advance(0.1)
        self.assertTrue(c.closed)
        self.assertEqual(c.clock.getDelayedCalls(), [])

    def test_idleFromTheStart(self) -> None:
        c = Connection(timeout=10)
        c.clock.advance(10)
        self.assertTrue(c.closed)
        self.assertEqual(c.transport.value(), b"")


class ConnectionTests(SynchronousTestCase):
    def test_clientLostWhileAnswering(self) -> None:
        renderer = Echo(now=False)
        c = Connection(renderer)
        c.send(b"GET / HTTP/1.1\r\nHost: p\r\n\r\n")
        request = renderer.waiting.pop()
        failed: list[Any] = []
        request.notifyFinish().addErrback(failed.append)
        c.transport.loseConnection()
        self.assertEqual(len(failed), 1)
        request.write(b"late")  # dropped, not raised
        request.finish()
        self.assertEqual(c.transport.value(), b"")
        self.assertEqual(c.site.active, set())

    def test_readAheadIsBounded(self) -> None:
        renderer = Echo(now=False)
        c = Connection(renderer, maxBody=1 << 20)
        c.send(b"GET /a HTTP/1.1\r\nHost: p\r\n\r\n")
        body = b"z" * (READ_AHEAD + 1)
        c.send(b"POST /b HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % len(body), body)
        self.assertEqual(c.transport.producerState, "paused")
        self.assertEqual(len(renderer.seen), 1, "the next request waits for this one's answer")
        answer(renderer.waiting.pop())
        self.assertEqual(c.transport.producerState, "producing")
        self.assertEqual([s[1] for s in renderer.seen], [b"/a", b"/b"])

    def test_failureInRenderIsJSON500(self) -> None:
        class Broken:
            def render(self, request: ProxyRequest) -> None:
                raise RuntimeError("boom")

        c = Connection(Broken())
        c.send(b"GET / HTTP/1.1\r\nHost: p\r\n\r\nGET / HTTP/1.1\r\nHost: p\r\n\r\n")
        self.assertEqual([r[0] for r in c.responses()], [500, 500])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 2)
