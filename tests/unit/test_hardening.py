"""Issue 13's items, each with a test that fails without it: what clients may not do through the proxy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bioproxy.proxy import ProxyResource

from .memory import Memory


class IdSlotTests(SynchronousTestCase):
    """id_slot must be a slot bioproxy reserved: an integer in range, or a 400 that names the field."""

    def test_onlyAnIntegerInRange(self) -> None:
        m = Memory(Path(self.mktemp()), unified=False)
        m.found()
        before = len(m.completions())
        for value in (-1, "0", True, 3.0, 1e9, None, 4):
            status, raw = m.postRaw(
                "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "id_slot": value}
            )
            self.assertEqual(status, 400, (value, raw))
            self.assertIn("id_slot", json.loads(raw)["error"]["message"], value)
        self.assertEqual(len(m.completions()), before, "none reached llama-server")
        status, raw = m.postRaw(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "id_slot": 3}
        )
        self.assertEqual(status, 200, raw)
        self.assertEqual(m.completions()[-1]["slot"], 3)


class SlotActionTests(SynchronousTestCase):
    """Slot actions belong to bioproxy: refused on the proxy port unless allow_slot_actions."""

    def test_refusedByDefault(self) -> None:
        m = Memory(Path(self.mktemp()))
        m.found()
        for action in ("erase", "save", "restore"):
            status, raw = m.postRaw(f"/slots/0?action={action}", {"filename": "x.bin"})
            self.assertEqual(status, 403, raw)
            self.assertIn("allow_slot_actions", json.loads(raw)["error"]["message"])
        self.assertEqual([a for a in m.fake.actions if a[2] == "x.bin" or a[0] == "erase"], [])
        status, raw = m.postRaw("/slots", {}, method=b"GET")
        self.assertEqual(status, 200, raw)
        self.assertEqual(len(json.loads(raw)), len(m.fake.slots))

    def test_allowed(self) -> None:
        m = Memory(Path(self.mktemp()))
        resource = m.site.resource
        assert isinstance(resource, ProxyResource)
        resource.allowSlotActions = True
        status, raw = m.postRaw("/slots/0?action=erase", {})
        self.assertEqual(status, 200, raw)
        self.assertIn(("erase", 0, ""), m.fake.actions)


class MethodLabelTests(SynchronousTestCase):
    def test_madeUpMethodsShareOneSeries(self) -> None:
        m = Memory(Path(self.mktemp()))
        for method in (b"FOO", b"BAR", b"BAZ"):
            m.postRaw("/v1/models", {}, method=method)
        methods = {
            sample.labels["method"]
            for family in m.metrics.registry.collect()
            for sample in family.samples
            if sample.name == "bioproxy_requests_total"
        }
        self.assertEqual(methods, {"other"})


class FakeMarkerTests(SynchronousTestCase):
    def test_markerIsPerProcess(self) -> None:
        """As llama-server's: a fake started anew (another process) is seen as a restart, as is restart()."""
        from twisted.internet.task import Clock

        from bioproxy.testing.fakellama import FakeLlama

        first, second = FakeLlama(Clock()), FakeLlama(Clock())
        self.assertNotEqual(first.props()["media_marker"], second.props()["media_marker"])
        before = first.props()["media_marker"]
        first.restart()
        self.assertNotEqual(first.props()["media_marker"], before)


class EncodingTests(SynchronousTestCase):
    def test_loneSurrogateIsABadRequest(self) -> None:
        """A templated message cut mid-emoji cannot be encoded again: 400, and the next request is served."""
        m = Memory(Path(self.mktemp()))
        m.template("@t", "Review this:\n<{message}>")
        m.found()
        raw = b'{"messages": [{"role": "user", "content": "@t \\ud83d"}]}'
        status, answer = m.postRaw("/v1/chat/completions", json.loads(raw))
        self.assertEqual(status, 400, answer)
        self.assertIn("UTF-8", json.loads(answer)["error"]["message"])
        status, answer = m.postRaw(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "@t fine"}]}
        )
        self.assertEqual(status, 200, answer)


class StageFailureTests(SynchronousTestCase):
    def test_aFailingStageAnswersAndReleases(self) -> None:
        """An exception in a stage of a slot-using request is a JSON 500; the slot goes back; others are served."""
        m = Memory(Path(self.mktemp()), unified=False)
        m.template("@t", "Review this:\n<{message}>")
        m.found()
        quiet = m.cache.quiet

        def broken() -> Any:
            raise RuntimeError("injected")

        m.cache.quiet = broken  # type: ignore[method-assign]
        status, answer = m.postRaw(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "@t one"}]}
        )
        self.assertEqual(status, 500, answer)
        self.assertIn("injected", json.loads(answer)["error"]["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([s.id for s in m.scheduler.slots if s.lease is not None], [])
        m.cache.quiet = quiet  # type: ignore[method-assign]
        status, answer = m.postRaw(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "@t two"}]}
        )
        self.assertEqual(status, 200, answer)


class NestingTests(SynchronousTestCase):
    def test_deepNestingIsABadRequest(self) -> None:
        """Item 9: JSON nested past Python's recursion limit is a 400, not a 500 page."""
        from bioproxy.expand import BadRequest, parseBody

        with self.assertRaises(BadRequest) as e:
            parseBody(b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
        self.assertIn("too deeply", str(e.exception))
