"""The lean client's chunked decoding (bioproxy/wire.py), however the bytes are split across reads."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from bioproxy.wire import _Chunks


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
