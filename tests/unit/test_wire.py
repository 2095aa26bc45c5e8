"""
The lean client (bioproxy/wire.py): chunked decoding however the bytes are
split across reads, writes sent at once, and its spare connections.
"""

from __future__ import annotations

from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase, TestCase

from bioproxy.wire import _Chunks, sendNow

from .memory import Memory


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
