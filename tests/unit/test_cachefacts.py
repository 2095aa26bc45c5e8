"""Pure pieces of the cache policy: file names, timings in streams, slot pins, the cache's facts."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from bioproxy.backend.kvcache import sanitise
from bioproxy.body import Body, withSlot
from bioproxy.heads import templateHead
from bioproxy.testing.memory import Memory
from bioproxy.timings import TimingsReader

jsonValues = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


class SanitiseTests(SynchronousTestCase):
    @given(st.text())
    def test_safeAndNonEmpty(self, prefix: str) -> None:
        name = sanitise(prefix)
        self.assertRegex(name, r"^[A-Za-z0-9_-]{1,64}$")

    def test_readable(self) -> None:
        self.assertEqual(sanitise("@code"), "_code")
        self.assertEqual(sanitise("../../etc"), "______etc")


class TimingsTests(SynchronousTestCase):
    timings = {"cache_n": 812, "prompt_n": 9, "prompt_ms": 3.5}

    @given(st.lists(st.integers(min_value=0), max_size=12), st.booleans())
    def test_streamAnyChunking(self, cuts: list[int], crlf: bool) -> None:
        events = [{"choices": [{"delta": {"content": "x"}}]}] * 3 + [{"choices": [], "timings": self.timings}]
        sep = "\r\n\r\n" if crlf else "\n\n"
        stream = "".join(f"data: {json.dumps(e)}{sep}" for e in events) + f"data: [DONE]{sep}"
        reader = TimingsReader()
        for piece in chunked(stream.encode(), cuts):
            reader.feed(piece)
        self.assertEqual(reader.timings, self.timings)

    @given(st.lists(st.integers(min_value=0), max_size=8))
    def test_jsonAnyChunking(self, cuts: list[int]) -> None:
        body = json.dumps({"choices": [{"message": {"content": "hi"}}], "timings": self.timings}, indent=1)
        reader = TimingsReader()
        for piece in chunked(body.encode(), cuts):
            reader.feed(piece)
        self.assertEqual(reader.timings, self.timings)

    def test_noTimings(self) -> None:
        for body in (b'{"content": "x"}', b"data: {}\n\ndata: [DONE]\n\n", b"not json", b""):
            reader = TimingsReader()
            reader.feed(body)
            self.assertIsNone(reader.timings)

    def test_streamKeepsOnlyTheUnfinishedEvent(self) -> None:
        reader = TimingsReader()
        for _ in range(1000):
            reader.feed(b'data: {"choices": [{"delta": {"content": "token"}}]}\n\n')
        self.assertEqual(reader._buffer, b"")


class PinTests(SynchronousTestCase):
    @settings(suppress_health_check=[HealthCheck.too_slow])
    @given(
        st.dictionaries(st.text(max_size=8).filter(lambda k: k != "id_slot"), jsonValues, max_size=5),
        st.integers(0, 64),
        st.sampled_from(["", " ", "\n  "]),
    )
    def test_withSlotAddsOnlyThePin(self, body: dict[str, object], slot: int, space: str) -> None:
        raw = (space + json.dumps(body, indent=1 if slot % 2 else None)).encode()
        pinned = withSlot(raw, slot)
        self.assertEqual(json.loads(pinned), {"id_slot": slot, **body})
        self.assertEqual(re.sub(rb'"id_slot":\d+,?', b"", pinned, count=1), raw)

    def test_clientPinIsKept(self) -> None:
        raw = b'{"id_slot": 1, "prompt": "x"}'
        self.assertEqual(Body(raw, json.loads(raw)).pinned(0), raw)
        expanded = Body(raw, {"id_slot": 1, "prompt": "expanded"}, expanded=True)
        self.assertEqual(json.loads(expanded.pinned(0)), {"id_slot": 1, "prompt": "expanded"})


class FactsTests(SynchronousTestCase):
    """KVCache as the one writer of a head's facts: what each reported outcome does to them."""

    def setUp(self) -> None:
        self.m = Memory(Path(self.mktemp()), unified=False)
        self.m.found()
        self.cache = self.m.cache
        self.head = templateHead(self.m.template("@t", "Review this:\n<{message}>"))

    def test_aMissingFileIsNotRestored(self) -> None:
        """A file llama-server does not have is not asked for again until a save writes it."""
        cache, head = self.cache, self.head
        name = cache.filename(head)
        assert name is not None
        told: list[tuple[str, int]] = []
        cache.onSaved.append(lambda prefix, size: told.append((prefix, size)))
        cache.noteNoFile(name)
        self.assertFalse(cache.mayRestore(head))
        self.assertFalse(cache.saved(head))
        cache.noteSaved(head, 1234)
        self.assertTrue(cache.mayRestore(head))
        self.assertTrue(cache.saved(head))
        self.assertEqual(told, [("@t", 1234)])
        self.assertEqual(cache.state(head).fileBytes, 1234)

    def test_saveFailuresAreNewsOnce(self) -> None:
        """The same failure again is counted, not news (one log line); a save that works clears it."""
        cache, head = self.cache, self.head
        self.assertEqual(
            [cache.noteSaveFailed(head, why) for why in ("full", "full", "read-only")], [True, False, True]
        )
        self.assertEqual((cache.state(head).saveError, cache.state(head).saveFailures), ("read-only", 3))
        cache.noteSaved(head, 1)
        self.assertEqual((cache.state(head).saveError, cache.state(head).saveFailures), (None, 0))

    def test_forgetGivesBackItsFilesOnly(self) -> None:
        """A head given up loses its facts and files; another head whose name it begins is untouched."""
        cache = self.cache
        other = templateHead(self.m.template("@t-2", "Translate:\n<{message}>"))
        cache.noteSaved(self.head, 1)
        cache.noteSaved(other, 1)
        cache.noteBoundary(self.head, [1, 2, 3])
        self.assertEqual(cache.forget("@t"), [cache.filename(self.head)])
        self.assertEqual(cache.state(self.head).boundary, None)
        self.assertFalse(cache.saved(self.head))
        self.assertTrue(cache.saved(other))
