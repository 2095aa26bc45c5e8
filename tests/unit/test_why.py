"""
Every request's reason (bioproxy/why.py), each caused here in memory
against fakellama: warm in a slot, in the RAM cache, restored; first use,
a template edited, after a restart, evicted, a restore refused, no cache
files, a start too short, not learned yet, a conversation that diverged,
nothing to reuse. And the request ids, and counts that mean what they say.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bioproxy.heads import templateHead
from bioproxy.templates import Template
from bioproxy.testing.memory import Memory
from bioproxy.why import Reason, Why

from ..helpers import logEvents

TEMPLATE = "You are a careful reviewer of code. Look for bugs, then for style. " * 30 + "<{message}>"
SYSTEM = "You answer questions about the project's build, briefly and exactly. " * 30


def warm(m: Memory) -> None:
    m.advanceUntil(lambda: m.warmer.ready and not m.warmer.jobs and not m.warmer.wanted)


def restartedWithNoWarmups(test: SynchronousTestCase, persistent: bool = True) -> tuple[Memory, Template]:
    """One template warm, then bioproxy's warmer stopped: the requests after a restart meet it cold."""
    m = Memory(Path(test.mktemp()), persistent=persistent, unified=False)
    template = m.template("@t", TEMPLATE)
    m.found()
    warm(m)
    m.warmer.stopService()
    return m, template


def ask(
    m: Memory, content: str | list[dict[str, Any]], system: str | None = None, **headers: str
) -> dict[str, Any]:
    """One chat through bioproxy; its record among the site's recent requests."""
    messages = content if isinstance(content, list) else [{"role": "user", "content": content}]
    if system is not None:
        messages = [{"role": "system", "content": system}, *messages]
    status, answer = m.postRaw(
        "/v1/chat/completions", {"messages": messages, "max_tokens": 4}, headers=headers
    )
    assert status == 200, answer
    m.clock.advance(0)  # the access record is written a turn after the response ends
    record: dict[str, Any] = m.site.recent[-1]
    record["answer"] = json.loads(answer)
    return record


class ReasonTests(SynchronousTestCase):
    def test_warm(self) -> None:
        """In a slot where slots keep their contents; in the RAM cache where idle slots are cleared."""
        for unified, why in ((False, Why.IN_SLOT), (True, Why.IN_RAM)):
            m = Memory(Path(self.mktemp()), unified=unified)
            m.template("@t", TEMPLATE)
            m.found()
            warm(m)
            ask(m, "@t hello")  # in CLEARED mode, the warmup's slot is taken by the next task
            record = ask(m, "@t one more")
            self.assertEqual((record["reason"], record["computed"] < 100), (why.label, True), unified)

    def test_firstUseAndEdited(self) -> None:
        m = Memory(Path(self.mktemp()), unified=False)
        m.found()
        m.warmer.stopService()  # nothing warmed in the background: the requests meet the head cold
        m.template("@t", TEMPLATE)
        self.assertEqual(ask(m, "@t first")["reason"], Why.FIRST_USE.label)
        m.template("@t", TEMPLATE.replace("bugs", "mistakes"))
        self.assertEqual(ask(m, "@t after the edit")["reason"], Why.EDITED.label)

    def test_afterARestartWithNoFiles(self) -> None:
        m, _ = restartedWithNoWarmups(self, persistent=False)
        m.restarted()
        record = ask(m, "@t after the restart")
        self.assertEqual(record["reason"], Why.RESTARTED.label)
        self.assertIn("--slot-save-path", record["reason_text"])

    def test_restoredAfterARestart(self) -> None:
        m, _ = restartedWithNoWarmups(self)
        m.restarted()
        record = ask(m, "@t after the restart")
        self.assertEqual((record["reason"], record["computed"] < 100), (Why.RESTORED.label, True))

    def test_restoreRefused(self) -> None:
        """Its file gone from llama-server's disk: the restore fails, and the request says so."""
        m, template = restartedWithNoWarmups(self)
        name = m.cache.filename(templateHead(template))
        assert name is not None
        (m.dir / "slots" / name).unlink()
        m.restarted()
        self.assertEqual(ask(m, "@t after the restart")["reason"], Why.RESTORE_REFUSED.label)

    def test_evictedAndNoFiles(self) -> None:
        """
        What llama-server dropped behind bioproxy's back is evicted; a head
        evicted where no file can serve it says why none can.
        """
        m = Memory(Path(self.mktemp()), unified=False, cacheRam=False, slots=1)
        m.template("@t", TEMPLATE)
        m.found()
        warm(m)
        m.fake.slots[0].tokens = b""  # dropped by llama-server itself
        record = ask(m, "@t after it was dropped")
        self.assertEqual(record["reason"], Why.EVICTED.label)
        m = Memory(Path(self.mktemp()), persistent=False, unified=False, cacheRam=False, slots=1)
        m.template("@t", TEMPLATE)
        m.template("@u", TEMPLATE.replace("code", "prose"))
        m.found()
        warm(m)
        ask(m, "@t one")
        m.warmer.stopService()
        ask(m, "@u takes the only slot")
        record = ask(m, "@t again")
        self.assertEqual(record["reason"], Why.NO_FILES.label)
        self.assertIn("--slot-save-path", record["reason_text"])

    def test_placedByTheLoadGuard(self) -> None:
        """A request the router's load guard sent where its head was cold says so (test_router: when it is marked)."""
        from bioproxy.serve import ProxyRequest

        m = Memory(Path(self.mktemp()), unified=False)
        m.found()
        m.warmer.stopService()
        m.template("@t", TEMPLATE)
        self.patch(ProxyRequest, "placedByGuard", True)
        self.assertEqual(ask(m, "@t sent away")["reason"], Why.LOAD_GUARD.label)

    def test_learnedHeads(self) -> None:
        """A system prompt: not learned yet, then warm; a short one, below the threshold."""
        m = Memory(Path(self.mktemp()), unified=False)
        m.book.learnAfter = 2
        m.found()
        record = ask(m, "first", system=SYSTEM)
        self.assertEqual(
            (record["reason"], record["reason_text"]),
            (Why.NOT_LEARNED.label, "not learned yet (seen 1 of 2 times)"),
        )
        [skipped] = m.book.skipped()  # as /templates lists it
        self.assertEqual(
            (skipped["uses"], skipped["reason_text"]), (1, "not learned yet (seen 1 of 2 times)")
        )
        ask(m, "second", system=SYSTEM)
        warm(m)
        self.assertEqual(ask(m, "third", system=SYSTEM)["reason"], Why.IN_SLOT.label)
        self.assertEqual(ask(m, "hello", system="Be brief.")["reason"], Why.SHORT.label)

    def test_nothingToReuseAndDiverged(self) -> None:
        m = Memory(Path(self.mktemp()), unified=False)
        m.found()
        record = ask(m, "a question with no system prompt")
        self.assertEqual(record["reason"], Why.NO_HEAD.label)
        messages: list[dict[str, Any]] = []
        for turn in ("hi", "Now read this: " + "a long file line. " * 120, "and what of it?"):
            messages.append({"role": "user", "content": turn})
            messages.append(ask(m, messages)["answer"]["choices"][0]["message"])
        # Its next turn resumes the conversation bioproxy kept.
        self.assertEqual(
            ask(m, [*messages, {"role": "user", "content": "next"}])["reason"], Why.IN_SLOT.label
        )
        edited = [messages[0], {"role": "assistant", "content": "something else"}, *messages[2:]]
        record = ask(m, [*edited, {"role": "user", "content": "next"}])
        self.assertEqual(
            (record["reason"], record["reason_text"]),
            (Why.DIVERGED.label, "diverged from the cached conversation (at message 1 (assistant))"),
        )


class CountTests(SynchronousTestCase):
    def test_aFreshBioproxyHasNoHits(self) -> None:
        """Its warmup's own check is not a user's request: no hit, no miss, no ratio."""
        m = Memory(Path(self.mktemp()), unified=True)
        template = m.template("@t", TEMPLATE)
        m.found()
        warm(m)
        state = m.cache.state(templateHead(template))
        view = state.view(m.backend)
        self.assertEqual((view["hits"], view["misses"], view["hit_ratio"]), (0, 0, None))
        ask(m, "@t hello")
        self.assertEqual(m.cache.state(templateHead(template)).hits, 1)

    def test_missesByReason(self) -> None:
        m = Memory(Path(self.mktemp()), unified=False)
        m.found()
        m.warmer.stopService()
        m.template("@t", TEMPLATE)
        ask(m, "@t first")
        self.assertEqual(m.metric("bioproxy_cache_misses_total", prefix="@t", reason="first_use"), 1)


class RequestIdTests(SynchronousTestCase):
    def test_keptSentAndReturned(self) -> None:
        """A client's X-Request-Id reaches llama-server, comes back, and is in the access line and the miss line."""
        seen = logEvents(self)
        m = Memory(Path(self.mktemp()), unified=False)
        m.found()
        m.warmer.stopService()
        m.template("@t", TEMPLATE)
        record = ask(m, "@t first", **{"x-request-id": "abc-123", "x-conversation-id": "conv-7"})
        self.assertEqual(record["request_id"], "abc-123")
        self.assertEqual(m.fake.log[-1]["request_id"], b"abc-123")
        self.assertEqual(m.fake.log[-1]["conversation_id"], b"conv-7")
        self.assertIn("x-request-id: abc-123", m.lastHead.decode())
        lines = [e for e in seen if e.get("request_id") == "abc-123"]
        self.assertEqual(
            sorted(e.get("log_namespace", "") for e in lines), ["bioproxy.backend.kvcache", "bioproxy.serve"]
        )

    def test_madeWhenMissingOrUnfit(self) -> None:
        m = Memory(Path(self.mktemp()), unified=False)
        m.found()
        ids = {
            ask(m, "hello")["request_id"],
            ask(m, "hello", **{"x-request-id": "bad id with spaces"})["request_id"],
        }
        self.assertEqual(len(ids), 2)
        for made in ids:
            self.assertRegex(made, r"^[0-9a-f]{16}$")


class ReasonTextTests(SynchronousTestCase):
    def test_text(self) -> None:
        self.assertEqual(str(Reason(Why.RESTARTED, "no files")), "llama-server restarted (no files)")
        self.assertEqual([w for w in Why if w.warm], [Why.IN_SLOT, Why.IN_RAM, Why.RESTORED, Why.FOUND])
        self.assertEqual({w.label for w in Why}, {w.name.lower() for w in Why})
