"""
The lean client (bioproxy/wire.py): chunked decoding however the bytes are
split across reads, writes sent at once, and its spare connections.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.internet import defer
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol, connectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from twisted.web.client import URI

from bioproxy.testing.memory import Memory
from bioproxy.wire import BadChunk, LeanAgent, _Chunks, _Connection, sendNow


def chunked(pieces: list[bytes], trailer: bytes = b"") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n" + trailer + b"\r\n"


class ChunksTests(SynchronousTestCase):
    @given(
        st.lists(st.binary(min_size=1, max_size=300), max_size=8),
        st.lists(st.integers(min_value=1, max_value=50), min_size=1, max_size=30),
        st.booleans(),
    )
    def test_anySplit(self, pieces: list[bytes], cuts: list[int], trailer: bool) -> None:
        wire = chunked(pieces, b"X-Check: 1\r\n" if trailer else b"") + b"NEXT"
        decoder, out, rest, i = _Chunks(), [], b"", 0
        while i < len(wire) and not decoder.done:
            step = cuts[i % len(cuts)]
            rest = decoder.feed(wire[i : i + step], out)
            i += step
        self.assertTrue(decoder.done)
        self.assertEqual(b"".join(out), b"".join(pieces))
        self.assertEqual(rest + wire[i:], b"NEXT")

    def test_extensionsAndCase(self) -> None:
        decoder, out = _Chunks(), []
        decoder.feed(b"A;name=value\r\n0123456789\r\n0\r\n\r\n", out)
        self.assertEqual((b"".join(out), decoder.done), (b"0123456789", True))


class BadChunkTests(SynchronousTestCase):
    def test_notAChunkSize(self) -> None:
        for wire in (b"zz\r\n", b"-5\r\nabc\r\n", b"\r\n", b"0x5\r\n", b"1" * 16 + b"\r\n", b"5" * 20000):
            self.assertRaises(BadChunk, _Chunks().feed, wire, [])


class _Socket:
    def __init__(self, takes: int | None = None, fails: bool = False) -> None:
        self.sent: list[bytes] = []
        self.takes = takes  # bytes the kernel takes of each send, all if None
        self.fails = fails

    def send(self, data: bytes) -> int:
        if self.fails:
            raise BlockingIOError()
        taken = data if self.takes is None else data[: self.takes]
        self.sent.append(taken)
        return len(taken)


class _Transport:
    """What sendNow reads of a Twisted TCP connection."""

    def __init__(self, sock: _Socket | None) -> None:
        if sock is not None:
            self.socket = sock
        self.dataBuffer = b""
        self._tempDataBuffer: list[bytes] = []
        self.connected = True
        self.disconnecting = False
        self.TLS = False
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(data)
        self._tempDataBuffer.append(data)


class SendNowTests(SynchronousTestCase):
    def test_emptyBufferSendsAtOnce(self) -> None:
        t = _Transport(_Socket())
        sendNow(t, b"event one")
        self.assertEqual((t.socket.sent, t.written), ([b"event one"], []))

    def test_whatTheKernelLeavesIsQueued(self) -> None:
        t = _Transport(_Socket(takes=3))
        sendNow(t, b"abcdefg")
        self.assertEqual((t.socket.sent, t.written), ([b"abc"], [b"defg"]))

    def test_queuedBytesGoFirst(self) -> None:
        """Nothing overtakes what is already queued: the order on the wire holds."""
        t = _Transport(_Socket(takes=3))
        sendNow(t, b"abcdefg")
        sendNow(t, b"second")
        self.assertEqual((t.socket.sent, t.written), ([b"abc"], [b"defg", b"second"]))

    def test_errorsAreLeftToTwisted(self) -> None:
        t = _Transport(_Socket(fails=True))
        sendNow(t, b"data")
        self.assertEqual(t.written, [b"data"])

    def test_otherTransportsWriteAsUsual(self) -> None:
        for change in ("nosocket", "tls", "closing", "gone"):
            t = _Transport(None if change == "nosocket" else _Socket())
            t.TLS = change == "tls"
            t.disconnecting = change == "closing"
            t.connected = change != "gone"
            sendNow(t, b"data")
            self.assertEqual(t.written, [b"data"], change)


class SpareTests(TestCase):
    def test_spareConnectionRaisesNoWarning(self) -> None:
        """The spare's bookkeeping callback once returned its own Deferred (Twisted warns of it)."""
        m = Memory(Path(self.mktemp()))
        m.found()
        status, _ = m.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 200)
        self.assertEqual(
            [w["message"] for w in self.flushWarnings() if "Callback returned" in str(w["message"])], []
        )


class _Connected:
    """Endpoints whose every connect succeeds at once, over a StringTransport."""

    def __init__(self) -> None:
        self.made: list[tuple[Any, StringTransport]] = []

    def endpointForURI(self, uri: URI) -> Any:
        return self

    def connect(self, factory: Any) -> defer.Deferred[Any]:
        protocol, transport = factory.buildProtocol(None), StringTransport()
        protocol.makeConnection(transport)
        self.made.append((protocol, transport))
        return defer.succeed(protocol)


class ReadyConnectionTests(SynchronousTestCase):
    def test_aSpareIsAlwaysReady(self) -> None:
        """
        llama-server closes the connection after each streamed answer. Every
        request after the first finds a connection already open, not every
        other one (the spare used to be opened only beside a new connection).
        """
        endpoints = _Connected()
        agent = LeanAgent(Clock(), endpoints, None, 30)  # type: ignore[arg-type]
        for i in range(4):
            before = len(endpoints.made)
            answer = agent.request(b"POST", b"http://b:80/v1/chat/completions", None, None)
            used = [t for _, t in endpoints.made if t.value()]
            self.assertEqual(len(used), i + 1)
            if i:
                # Sent on a connection opened before the request came.
                self.assertIn(used[-1], [t for _, t in endpoints.made[:before]])
            protocol = next(p for p, t in endpoints.made if t is used[-1])
            protocol.dataReceived(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
            self.assertEqual(self.successResultOf(answer).code, 200)
            self.assertTrue(used[-1].disconnecting)
            protocol.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(len(agent.idle[(b"http", b"b", 80)]), 1)


class KeptConnectionTests(SynchronousTestCase):
    def test_closedOnceIdleForTheTimeout(self) -> None:
        """Idle time counts from when a connection was last put back, however often it was used."""
        clock, endpoints = Clock(), _Connected()
        agent = LeanAgent(clock, endpoints, None, 30, fresh=False)  # type: ignore[arg-type]
        kept = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
        for _ in range(3):
            answer = agent.request(b"GET", b"http://b:80/v1/models", None, None)
            protocol, transport = next((p, t) for p, t in endpoints.made if t.value() and not t.disconnecting)
            transport.clear()
            protocol.dataReceived(kept)
            self.successResultOf(answer)
            clock.advance(20)
        self.assertFalse(transport.disconnecting)
        clock.advance(10)
        self.assertTrue(transport.disconnecting)


class _Owner:
    reactor = Clock()

    def forget(self, connection: Any) -> None:
        pass

    def putBack(self, connection: Any) -> None:
        pass


class _Pieces(Protocol):
    def __init__(self) -> None:
        self.pieces: list[bytes] = []
        self.ended = False

    def dataReceived(self, data: bytes) -> None:
        self.pieces.append(data)

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self.ended = True


class ResponseHeadTests(SynchronousTestCase):
    def exchange(self, head: bytes) -> tuple[StringTransport, defer.Deferred[Any]]:
        connection = _Connection(_Owner(), (b"http", b"b", 80))  # type: ignore[arg-type]
        transport = StringTransport()
        connection.makeConnection(transport)
        answer = connection.send(b"GET / HTTP/1.1\r\nHost: b\r\n\r\n", b"GET")
        connection.dataReceived(head)
        return transport, answer

    def test_headersAreRead(self) -> None:
        transport, answer = self.exchange(
            b"HTTP/1.1 200 OK\r\nX-A: one\r\nx-a: two\r\nContent-Length: 0\r\n\r\n"
        )
        response = self.successResultOf(answer)
        self.assertEqual((response.code, response.headers.getRawHeaders(b"x-a")), (200, [b"one", b"two"]))
        self.assertFalse(transport.disconnecting)

    def test_chunkByChunk(self) -> None:
        """Each chunk is its own piece (llama-server sends one event a chunk), however the reads split them."""
        transport, answer = self.exchange(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        response = self.successResultOf(answer)
        body = _Pieces()
        response.deliverBody(body)
        connection = body.transport.connection
        connection.dataReceived(b"3\r\none\r\n3\r\ntwo\r\n5\r\nth")
        connection.dataReceived(b"ree\r\n0\r\n\r\n")
        self.assertEqual(body.pieces, [b"one", b"two", b"th", b"ree"])
        self.assertTrue(body.ended)

    def test_aBareLineBreakIsNotPassedOn(self) -> None:
        """A backend's header with a bare LF would reach the client as two headers."""
        for head in (
            b"HTTP/1.1 200 OK\r\nX-A: v\nSet-Cookie: x=1\r\nContent-Length: 0\r\n\r\n",
            b"HTTP/1.1 200 OK\r\nX-A: v\rSet-Cookie: x=1\r\nContent-Length: 0\r\n\r\n",
        ):
            transport, answer = self.exchange(head)
            self.assertTrue(transport.disconnecting)
            self.assertNoResult(answer)


class QuietPoolTests(SynchronousTestCase):
    def test_aCallEndingAfterCloseIsNotCached(self) -> None:
        """
        A call in flight when bioproxy stops ends after its pool was closed:
        its connection is closed, not cached with a timer the stopped
        reactor would keep (issue 27: "Reactor was unclean" in test_scaling).
        """
        from twisted.internet.testing import MemoryReactorClock

        from bioproxy.connect import QuietPool

        class Quiescent:
            state = "QUIESCENT"

            def __init__(self) -> None:
                self.transport = StringTransport()

            def abort(self) -> defer.Deferred[None]:
                self.transport.loseConnection()
                return defer.succeed(None)

        reactor = MemoryReactorClock()
        pool = QuietPool(reactor, persistent=True)
        kept, late = Quiescent(), Quiescent()
        pool._putConnection(("http", b"b", 1), kept)
        self.assertEqual(len(reactor.getDelayedCalls()), 1)
        pool.closeCachedConnections()
        pool._putConnection(("http", b"b", 1), late)
        self.assertEqual(reactor.getDelayedCalls(), [])
        self.assertTrue(late.transport.disconnecting)
