"""Issue 13's items, each with a test that fails without it: what clients may not do through the proxy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET

from bioproxy.backend.llamacpp import LlamaClient, TimedOut
from bioproxy.heads import templateHead
from bioproxy.proxy import ProxyResource
from bioproxy.testing.memory import Memory


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

    def test_encodedPathsAreGuardedAsRouted(self) -> None:
        """Issue 26, item 6: llama-server decodes the path before routing; so does the guard."""
        m = Memory(Path(self.mktemp()))
        m.found()
        status, raw = m.postRaw("/%73lots/0?action=erase", {})
        self.assertEqual(status, 403, raw)
        for ambiguous in (
            "/slots%2F0?action=erase",
            "/slots%2f0",
            "/./slots/0?action=erase",
            "/x/../slots/0",
        ):
            status, raw = m.postRaw(ambiguous, {})
            self.assertEqual(status, 400, (ambiguous, raw))
        self.assertEqual([a for a in m.fake.actions if a[0] == "erase"], [])
        m.template("@t", "Review: <{message}>")
        status, raw = m.postRaw("/v1/chat/completion%73", {"messages": [{"role": "user", "content": "@t x"}]})
        self.assertEqual(status, 200, raw)
        self.assertIn(b"Review: x", m.completions()[-1]["prompt"])

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
        # Methods llhttp knows (it refuses any other) that bioproxy has no label for.
        for method in (b"PROPFIND", b"PURGE", b"MKCOL"):
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
    """
    Item 2: an exception in any stage of a slot-using request ends it with
    a JSON error and releases what it held; the daemon serves the next one.
    """

    def check(self, stage: str, status: int = 500) -> None:
        import bioproxy.proxy

        m = Memory(Path(self.mktemp()), unified=False, cacheRam=False, slots=1)
        m.template("@t", "Review this:\n<{message}>")
        m.template("@u", "Translate this:\n<{message}>")
        m.found()
        resource = m.site.resource
        assert isinstance(resource, ProxyResource) and resource.dispatcher is not None
        dispatcher = resource.dispatcher

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError(f"injected into {stage}")

        targets: dict[str, tuple[Any, str]] = {
            "parse": (bioproxy.proxy, "parseBody"),
            "expand": (bioproxy.proxy, "expand"),
            "lease": (m.scheduler, "lease"),
            "restore": (m.cacheIO, "prepare"),
            "forward": (dispatcher.forwarder, "forward"),
            "learn": (m.cache, "learn"),
        }
        where, name = targets[stage]
        original = getattr(where, name)
        self.patch(where, name, broken)
        # The one slot holds one template: the other needs its file restored.
        cold = "@u" if (m.scheduler.slots[0].contents.key or "").startswith("@t@") else "@t"
        chat = {"messages": [{"role": "user", "content": f"{cold} one"}]}
        status_, answer = m.postRaw("/v1/chat/completions", chat)
        self.assertEqual(status_, status, (stage, answer))
        if status == 500:
            error = json.loads(answer)["error"]
            self.assertIn("injected", error["message"], stage)
            self.assertEqual(error["type"], "server_error")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1, stage)
        self.assertEqual([s.id for s in m.scheduler.slots if s.lease is not None], [], stage)
        self.assertEqual(m.site.active, set(), stage)
        setattr(where, name, original)
        status_, answer = m.postRaw("/v1/chat/completions", chat)
        self.assertEqual(status_, 200, (stage, answer))

    def test_parse(self) -> None:
        self.check("parse")

    def test_expand(self) -> None:
        self.check("expand")

    def test_lease(self) -> None:
        self.check("lease")

    def test_restore(self) -> None:
        self.check("restore")

    def test_forward(self) -> None:
        self.check("forward")

    def test_learn(self) -> None:
        """The answer was sent before learning failed: the client has it, and the slot is released."""
        self.check("learn", status=200)

    def test_quiet(self) -> None:
        m = Memory(Path(self.mktemp()), unified=False)
        m.template("@t", "Review this:\n<{message}>")
        m.found()
        quiet = m.cacheIO.quiet

        def broken() -> Any:
            raise RuntimeError("injected")

        m.cacheIO.quiet = broken  # type: ignore[method-assign]
        status, answer = m.postRaw(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": "@t one"}]}
        )
        self.assertEqual(status, 500, answer)
        self.assertIn("injected", json.loads(answer)["error"]["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        self.assertEqual([s.id for s in m.scheduler.slots if s.lease is not None], [])
        m.cacheIO.quiet = quiet  # type: ignore[method-assign]
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


class RewarmTests(SynchronousTestCase):
    """Item 8: a re-warm after a miss runs where the miss happened, after the request, and evicts nothing."""

    def test_rewarmAfterAFailedRestoreEvictsNothing(self) -> None:
        m = Memory(Path(self.mktemp()), unified=False, slots=2, cacheRam=False)
        for name in ("a", "b", "c"):
            m.template(f"@{name}", f"You review {name}. " * 40 + "\n<{message}>")
        m.found()
        m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
        heads = {p: m.book.get(p) for p in ("@a", "@b", "@c")}
        held = {slot.contents.key for slot in m.scheduler.slots}
        [onDisk] = [p for p, h in heads.items() if h is not None and h.key not in held]
        head = heads[onDisk]
        assert head is not None
        # Its file is gone, so the request's restore fails and it is computed.
        name = m.cache.filename(head)
        assert name is not None
        (m.dir / "slots" / name).unlink()
        warmups = len(m.completions())
        status, answer = m.postRaw(
            "/v1/chat/completions", {"messages": [{"role": "user", "content": f"{onDisk} now"}]}
        )
        self.assertEqual(status, 200, answer)
        m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
        after = [slot.contents.key for slot in m.scheduler.slots]
        self.assertIn(head.key, after)
        self.assertEqual(len(set(after)), 2, f"one of the others is still warm: {after}")
        # The only prompt computed was the request's own; the head's file came from its slot.
        self.assertEqual(len(m.completions()), warmups + 1)
        self.assertTrue(m.cache.saved(head))


class _Stalls(Resource):
    """Answers nothing, or (body=True) its headers and part of a body, and then nothing."""

    isLeaf = True

    def __init__(self, body: bool) -> None:
        super().__init__()
        self.body = body

    def render(self, request: Any) -> Any:
        if self.body:
            request.setHeader(b"content-length", b"100")
            request.write(b'{"status":')
        return NOT_DONE_YET


class DeadlineTests(SynchronousTestCase):
    """A call of bioproxy's own that gets no whole answer fails as timed out, not as a cancel."""

    def call(self, body: bool) -> tuple[Clock, Any]:
        clock = Clock()
        llama = LlamaClient(StubTreq(_Stalls(body)), "http://llama", clock, timeout=5)  # type: ignore[arg-type]
        d = defer.ensureDeferred(llama.health())
        return clock, d

    def test_noHeaders(self) -> None:
        clock, d = self.call(body=False)
        clock.advance(5)
        self.failureResultOf(d, TimedOut)

    def test_stalledBody(self) -> None:
        clock, d = self.call(body=True)
        self.assertNoResult(d)
        clock.advance(5)
        self.failureResultOf(d, TimedOut)

    def test_aStalledHealthCheckIsAFailedOne(self) -> None:
        """Issue 26, item 3: headers, then nothing: the backend is taken out, and the loop goes on."""
        from bioproxy.backend.monitor import BackendMonitor
        from bioproxy.metrics import Metrics

        clock = Clock()
        llama = LlamaClient(StubTreq(_Stalls(True)), "http://llama", clock, timeout=5)  # type: ignore[arg-type]
        monitor = BackendMonitor(llama, clock, Metrics(), 2)
        monitor.reachable = True
        monitor.startService()
        self.addCleanup(monitor.stopService)
        clock.advance(5)
        self.assertIs(monitor.reachable, False)
        self.assertIn("TimedOut", monitor.lastError or "")
        checked = monitor.lastChecked
        clock.pump([1] * 7)  # the next poll runs, and times out too
        self.assertGreater(monitor.lastChecked, checked)

    def test_cancelIsACancel(self) -> None:
        clock, d = self.call(body=True)
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(clock.getDelayedCalls(), [])


class UnwritableSaveTests(SynchronousTestCase):
    """Issue 26, item 11: a slot directory llama-server cannot write."""

    def test_warmWithAReasonAndBackoff(self) -> None:
        for unified in (True, False):
            m = Memory(Path(self.mktemp()), unified=unified)
            m.template("@t", "You are a careful reviewer. Follow every rule. " * 30 + "Input: <{message}>")
            m.found()
            m.advanceUntil(lambda m=m: m.warmer.ready and not m.warmer.jobs and not m.warmer.wanted)
            head = templateHead(m.library.templates["@t"])
            m.fake.saveDir = m.dir / "slots" / "missing"  # the disk goes read-only: saves fail with 500
            m.cache.forgetFile(head)
            m.warmer.queueWarmup("@t", force=True)
            m.advanceUntil(lambda m=m: not m.warmer.jobs and not m.warmer.wanted)
            state = m.cache.state(head)
            view = state.view(m.backend)
            self.assertTrue(view["warm"], unified)
            self.assertIsNone(view["warmup_error"], unified)
            self.assertIn("Unable to save", view["save_error"] or "", unified)
            before = len(m.completions())
            saves = len([a for a in m.fake.actions if a[0] == "save"])
            for _ in range(120):  # ten minutes
                m.clock.advance(5)
                m.settle()
            tries = len([a for a in m.fake.actions if a[0] == "save"]) - saves
            self.assertLessEqual(tries, 8, (unified, "backing off"))
            self.assertGreaterEqual(tries, 3, (unified, "retried"))
            computed = [r["prompt_n"] for r in m.completions()[before:]]
            self.assertTrue(all(n < 60 for n in computed), (unified, computed, "never computed again"))
            m.fake.saveDir = m.dir / "slots"  # writable again
            m.clock.advance(300)
            m.advanceUntil(lambda m=m: not m.warmer.jobs and not m.warmer.wanted)
            self.assertTrue(m.cache.saved(head), unified)
            self.assertIsNone(m.cache.state(head).saveError, unified)
