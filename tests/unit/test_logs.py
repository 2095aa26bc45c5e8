"""Issue 15, item 3: one access line per request, whose fields --log-format json carries."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st
from twisted.logger import LogLevel, formatEventAsClassicLogText
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from bioproxy.logs import jsonLine, textLine, twistdLogsToStdout
from bioproxy.testing.memory import Memory

from ..helpers import logEvents


class AccessLineTests(SynchronousTestCase):
    def events(self) -> list[dict[str, Any]]:
        return logEvents(self)

    def test_slotRequestLine(self) -> None:
        m = Memory(Path(self.mktemp()), unified=False)
        m.template("@t", "Review this:\n<{message}>")
        m.found()
        seen = self.events()
        status, _ = m.postRaw("/v1/chat/completions", {"messages": [{"role": "user", "content": "@t hi"}]})
        self.assertEqual(status, 200)
        [line] = [e for e in seen if e.get("log_namespace") == "bioproxy.serve" and "path" in e]
        self.assertEqual(
            (line["method"], line["path"], line["status"]), ("POST", "/v1/chat/completions", 200)
        )
        self.assertEqual(line["prefix"], "@t")
        self.assertIsInstance(line["slot"], int)
        self.assertGreater(line["cached"], 0)
        self.assertGreater(line["computed"], 0)
        self.assertIsNotNone(line["ttfb_ms"])
        record = json.loads(jsonLine(line))
        self.assertEqual(record["priority"], 6)
        for key in ("method", "path", "status", "prefix", "slot", "cached", "computed", "ttfb_ms", "ms"):
            self.assertIn(key, record)
        self.assertIn(f"@t slot {line['slot']} cached {line['cached']}", record["message"])
        self.assertNotIn(record["message"], [v for k, v in record.items() if k != "message"], "the line once")

    def test_refusalsAreLogged(self) -> None:
        m = Memory(Path(self.mktemp()))
        seen = self.events()
        m.postRaw("/slots/0?action=erase", {})
        [line] = [e for e in seen if e.get("log_namespace") == "bioproxy.serve" and "path" in e]
        self.assertEqual(line["status"], 403)
        self.assertIsNone(line["slot"])

    def test_priorityFollowsLevel(self) -> None:
        event = {
            "log_level": LogLevel.error,
            "log_format": "boom",
            "log_time": 0,
            "prefix": "@x",
            "obj": object(),
        }
        record = json.loads(jsonLine(event))
        self.assertEqual((record["priority"], record["prefix"]), (3, "@x"))
        self.assertNotIn("obj", record)


class ReadyTests(SynchronousTestCase):
    """Issue 15, item 5: /ready is 503 until the backend is probed and every template has been tried."""

    def ready(self, m: Memory) -> tuple[int, dict[str, Any]]:
        from treq.testing import StubTreq

        from bioproxy.admin import ReadyResource
        from bioproxy.snapshot import Snapshot

        class Watched:
            library = m.library

        snapshot = Snapshot(m.clock, Watched(), [m.member])  # type: ignore[arg-type]
        http = StubTreq(ReadyResource(snapshot))
        answers: list[Any] = []
        http.get("http://admin/").addCallback(
            lambda r: r.json().addCallback(lambda j: answers.append((r.code, j)))
        )
        http.flush()
        return answers[0]  # type: ignore[no-any-return]

    def test_readyAfterEveryTemplateWasTried(self) -> None:
        m = Memory(Path(self.mktemp()), unified=False)
        m.template("@t", "Review this:\n<{message}>")
        code, answer = self.ready(m)
        self.assertEqual((code, answer["backend_ready"]), (503, False))
        m.found()
        m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
        self.assertEqual(
            self.ready(m), (200, {"ready": True, "backend_ready": True, "templates_untried": []})
        )
        m.template("@u", "Translate:\n<{message}>")  # loaded, not yet warmed
        code, answer = self.ready(m)
        self.assertEqual((code, answer["templates_untried"]), (503, ["@u"]))
        m.warmer.queueWarmup("@u")
        m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
        self.assertEqual(self.ready(m)[0], 200)


class PhaseTests(SynchronousTestCase):
    """Issue 15, items 4 and 5: is a head warm, where, and why not."""

    def test_phases(self) -> None:
        from bioproxy.backend.warmup import Phase
        from bioproxy.heads import templateHead

        m = Memory(Path(self.mktemp()), unified=False, slots=1, cacheRam=False)
        t = templateHead(m.template("@t", "Review this:\n<{message}>"))
        u = templateHead(m.template("@u", "Translate this:\n<{message}>"))
        self.assertEqual(m.warmer.phase(t), Phase.BACKEND_DOWN)
        m.found()
        m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
        phases = {m.warmer.phase(t), m.warmer.phase(u)}
        self.assertEqual(
            phases, {Phase.IN_SLOT, Phase.ON_DISK}, "one slot: one holds it, the other is a file"
        )
        m.warmer.retrying.add("@t")
        self.assertEqual(m.warmer.phase(t), Phase.RETRYING)
        m.warmer.retrying.clear()
        m.cache.state(t).error = "prompt too long"
        self.assertEqual(m.warmer.phase(t), Phase.REFUSED)

    def test_clearedModeIsTheRamCache(self) -> None:
        from bioproxy.backend.warmup import Phase
        from bioproxy.heads import templateHead

        m = Memory(Path(self.mktemp()), unified=True)
        t = templateHead(m.template("@t", "Review this:\n<{message}>"))
        m.found()
        m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
        self.assertEqual(m.warmer.phase(t), Phase.IN_RAM)
        view = m.cache.state(t).view(m.backend)
        self.assertEqual(view["last_warmup_how"], "prefill")
        self.assertRegex(view["last_warmup_at"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00$")


class TextLineTests(SynchronousTestCase):
    """The text format is twistd's line, made with less work per line."""

    @given(
        st.sampled_from(["{access}", "plain words", "{n} of {m}", "{access} and more", "{missing}", ""]),
        st.sampled_from([None, LogLevel.info, LogLevel.warn, LogLevel.error]),
        st.one_of(st.none(), st.floats(min_value=0, max_value=4e9)),
        st.sampled_from([None, "bioproxy.serve"]),
        st.text(max_size=20),
        st.booleans(),
    )
    def test_sameAsTwistds(
        self, format: str, level: Any, when: Any, namespace: Any, access: str, failed: bool
    ) -> None:
        event: dict[str, Any] = {"log_format": format, "access": access, "n": 1, "m": 2}
        for key, value in (("log_level", level), ("log_time", when), ("log_namespace", namespace)):
            if value is not None:
                event[key] = value
        if failed:
            event["log_failure"] = Failure(ValueError("boom"))
        self.assertEqual(textLine(event), formatEventAsClassicLogText(event))

    def test_sameTimeTwice(self) -> None:
        """The time is worked out once a second: a line in the next second has that second's time."""
        lines = [textLine({"log_format": "x", "log_time": t}) for t in (100.2, 100.9, 101.0)]
        self.assertEqual(
            lines,
            [formatEventAsClassicLogText({"log_format": "x", "log_time": t}) for t in (100.2, 100.9, 101.0)],
        )
        self.assertNotEqual(lines[1], lines[2])

    def test_whereTwistdWrites(self) -> None:
        self.assertTrue(twistdLogsToStdout({"nodaemon": True, "logfile": None, "syslog": False}))
        self.assertTrue(twistdLogsToStdout({"nodaemon": True, "logfile": "-", "syslog": False}))
        self.assertFalse(twistdLogsToStdout({"nodaemon": True, "logfile": "b.log", "syslog": False}))
        self.assertFalse(twistdLogsToStdout({"nodaemon": False, "logfile": None, "syslog": False}))
        self.assertFalse(twistdLogsToStdout({"nodaemon": True, "logfile": None, "syslog": True}))
        self.assertFalse(twistdLogsToStdout(None))


class BackendNamedTests(SynchronousTestCase):
    def test_everyLineAboutABackendNamesIt(self) -> None:
        """Issue 27: with several backends, a line about one says which; here a probe, warmups and a restart."""
        from pathlib import Path

        from twisted.logger import capturedLogs, formatEvent

        from bioproxy.testing.memory import Memory

        with capturedLogs() as events:
            m = Memory(Path(self.mktemp()), url="http://second:8081")
            m.template("@code", "You are a careful reviewer. " * 40 + "{message}")
            m.found()
            m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
            m.monitor._record(False, "refused")
            m.restarted()
        about = [
            formatEvent(e)
            for e in events
            if e.get("log_namespace", "").startswith(
                (
                    "bioproxy.backend.monitor",
                    "bioproxy.backend.process",
                    "bioproxy.backend.warmup",
                    "bioproxy.backend.kvcache",
                )
            )
        ]
        self.assertGreater(len(about), 3, about)
        for line in about:
            self.assertTrue(line.startswith("http://second:8081: "), line)
