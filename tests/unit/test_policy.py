"""
Placement, warmup and verification rules in each of llama-server's modes,
in memory (bioproxy/testing/memory.py): what the probe concludes, where warmups
put templates, what gets pinned, and which misses count against restores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.trial.unittest import SynchronousTestCase

from bioproxy.backend import Persistence, SlotMode
from bioproxy.backend.kvcache import RAM_MISS_LIMIT, RESTORE_MISS_LIMIT
from bioproxy.backend.llamacpp import Unauthorized
from bioproxy.heads import templateHead
from bioproxy.testing.memory import Alone, Memory

TEMPLATE = "You are a careful reviewer. " * 30 + "\n<{message}>"


class ProbeTests(SynchronousTestCase):
    def memory(self, **fake: Any) -> Memory:
        m = Memory(Path(self.mktemp()), **fake)
        m.found()
        self.assertTrue(m.backend.ready)
        return m

    def test_defaultServerClearsIdleSlots(self) -> None:
        m = self.memory(unified=True)
        self.assertEqual((m.backend.mode, m.backend.ramCache), (SlotMode.CLEARED, True))
        self.assertFalse(m.backend.pins)
        self.assertFalse(m.scheduler.retains)
        self.assertEqual(m.backend.persistence, Persistence.FILES)

    def test_explicitSlotsKeepTheirs(self) -> None:
        m = self.memory(unified=False)
        self.assertEqual((m.backend.mode, m.backend.ramCache), (SlotMode.RETAINED, True))
        self.assertTrue(m.scheduler.retains)

    def test_withoutRamCacheNothingIsCleared(self) -> None:
        for unified in (True, False):
            m = self.memory(unified=unified, cacheRam=False)
            self.assertEqual((m.backend.mode, m.backend.ramCache), (SlotMode.RETAINED, False), unified)

    def test_noIdleSlotCaching(self) -> None:
        m = self.memory(unified=True, cacheIdleSlots=False)
        self.assertEqual((m.backend.mode, m.backend.ramCache), (SlotMode.RETAINED, True))

    def test_oneSlot(self) -> None:
        m = self.memory(slots=1, unified=False)
        self.assertEqual(m.backend.mode, SlotMode.RETAINED)
        self.assertEqual(m.backend.slotCount, 1)

    def test_noSlotSavePathIsNoPersistence(self) -> None:
        m = Memory(Path(self.mktemp()), persistent=False, unified=True)
        m.found()
        self.assertEqual(m.backend.persistence, Persistence.NONE)

    def test_slotFilesComeBackWithTheFlag(self) -> None:
        """Restarted with --slot-save-path after running without: files work again."""
        m = Memory(Path(self.mktemp()), persistent=False, unified=True)
        m.found()
        m.fake.saveDir = m.dir / "slots"
        m.restarted()
        self.assertEqual(m.backend.persistence, Persistence.FILES)

    def test_apiKeyRefusedIsTyped(self) -> None:
        m = Memory(Path(self.mktemp()), apiKey="secret")
        with self.assertRaises(Unauthorized):
            m.run(m.llama.props())

    def test_missingApiKeyIsReportedNotProbed(self) -> None:
        """llama-server wants a key bioproxy lacks: /health says which setting, and nothing loops."""
        m = Memory(Path(self.mktemp()), apiKey="secret")
        m.monitor.listeners.append(m.backend)
        for _ in range(3):
            m.run(m.monitor.check())
        self.assertTrue(m.monitor.reachable)
        self.assertIn("backend_api_key", m.monitor.lastError or "")
        self.assertFalse(m.backend.ready)
        self.assertEqual(m.fake.log, [])

    def test_aBlipIsNoNewProcess(self) -> None:
        """Unreachable for a moment, then the same process: not probed again, and warmups resume."""
        m = self.memory(unified=False)
        probes = len(m.fake.log)
        m.backend.backendLost()
        self.assertFalse(m.backend.ready)
        m.backend.backendReady(m.fake.props(), restarted=False)
        m.settle()
        self.assertTrue(m.backend.ready)
        self.assertEqual(len(m.fake.log), probes)

    def test_newProcessIsProbedAgain(self) -> None:
        m = self.memory(unified=False)
        m.fake.unified = True
        m.restarted()
        self.assertEqual(m.backend.mode, SlotMode.CLEARED)


class WarmupTests(SynchronousTestCase):
    def warmed(self, unified: bool, persistent: bool = True, **fake: Any) -> Memory:
        m = Memory(Path(self.mktemp()), persistent=persistent, unified=unified, **fake)
        m.template("@t", TEMPLATE)
        m.found()
        self.assertEqual(m.warmer.jobs, {})
        return m

    def test_clearedModeWarmsIntoTheRamCache(self) -> None:
        """The template ends up where an unpinned request finds it, and on disk."""
        m = self.warmed(unified=True)
        template = m.library.templates["@t"]
        self.assertTrue(m.cache.state(templateHead(template)).inRam)
        self.assertTrue(m.cache.saved(templateHead(template)))
        m.fake.log.clear()
        body = {"messages": [{"role": "user", "content": template.render("a question")}], "max_tokens": 1}
        timings = m.run(m.llama.chat(body, 10))["timings"]
        self.assertGreaterEqual(timings["cache_n"], 0.9 * m.cache.state(templateHead(template)).reusable)

    def test_clearedModeRestoreIsVerifiedUnpinned(self) -> None:
        m = self.warmed(unified=True)
        m.restarted()
        self.assertEqual(m.metric("bioproxy_warmup_total", prefix="@t", how="restore"), 1)
        [check] = [r for r in m.completions() if r["started"] == m.clock.seconds()][-1:]
        self.assertGreater(check["cache_n"], 0)

    def test_clearedModeWarmupsRunOneAtATime(self) -> None:
        m = Memory(Path(self.mktemp()), unified=True, msPerPromptToken=1.0)
        for i in range(3):
            m.template(f"@t{i}", f"Template {i}. " * 40 + "<{message}>")
        m.found()
        m.advanceUntil(lambda: m.warmer.jobs)
        running = []
        m.advanceUntil(lambda: running.append(len(m.warmer.jobs)) or not (m.warmer.jobs or m.warmer.wanted))
        self.assertEqual(max(running), 1)
        for template in m.library.templates.values():
            self.assertTrue(m.cache.saved(templateHead(template)), template.prefix)

    def test_lossyRestoresCountOnlyRightAfterTheRestore(self) -> None:
        for unified in (True, False):
            m = self.warmed(unified=unified)
            m.fake.faults.lossyRestore = True
            for _ in range(RESTORE_MISS_LIMIT):
                m.restarted()
            state = m.cache.state(templateHead(m.library.templates["@t"]))
            self.assertTrue(state.prefill, unified)
            self.assertIn("gave no reuse", state.prefillWhy or "")

    def test_noPersistenceWarmsByPrefillOnce(self) -> None:
        m = self.warmed(unified=True, persistent=False)
        template = m.library.templates["@t"]
        self.assertEqual(m.metric("bioproxy_warmup_total", prefix="@t", how="prefill"), 1)
        self.assertEqual(m.fake.actions, [])  # the probe's restore answered 501 and was not recorded
        m.clock.advance(60)
        m.settle()
        self.assertEqual(m.metric("bioproxy_warmup_total", prefix="@t", how="prefill"), 1, "no retry loop")
        view = m.cache.state(templateHead(template)).view(m.backend)
        self.assertEqual(view["warmup_mode"], "prefill")

    def test_lostBackendCancelsWarmups(self) -> None:
        m = Memory(Path(self.mktemp()), unified=False, msPerPromptToken=5.0)
        m.template("@t", TEMPLATE)
        m.found()
        m.advanceUntil(lambda: m.warmer.jobs and any(s.busy for s in m.fake.slots))
        [busy] = [s for s in m.fake.slots if s.busy]
        m.backend.backendLost()
        m.settle()
        self.assertEqual(m.warmer.jobs, {})
        self.assertIn("@t", m.warmer.wanted, "warmed again when the backend returns")
        self.assertFalse(busy.busy, "the warmup's connection was closed, which stops llama-server's task")


class QuietTests(SynchronousTestCase):
    def test_tasksWaitForASave(self) -> None:
        """A task that starts during a save would clear the slot being saved (CLEARED mode): it waits."""
        m = Memory(Path(self.mktemp()), unified=True)
        waited = []
        with m.cacheIO._quietWhile():
            m.cacheIO.quiet().addCallback(waited.append)
            with m.cacheIO._quietWhile():
                pass
            self.assertEqual(waited, [], "still saving")
        self.assertEqual(waited, [None])
        self.assertTrue(m.cacheIO.quiet().called, "nothing saving: at once")


class VerificationTests(SynchronousTestCase):
    def test_evictionIsNoEvidenceAgainstRestores(self) -> None:
        """A miss of a request that relied on the RAM cache, or came later, never switches to prefill."""
        m = Memory(Path(self.mktemp()), unified=True)
        template = m.template("@t", TEMPLATE)
        m.found()
        state = m.cache.state(templateHead(template))
        for _ in range(RESTORE_MISS_LIMIT + 2):
            self.assertEqual(
                m.cache.learn(templateHead(template), None, {"cache_n": 0}, restored=False, fromRam=True),
                "lost",
            )
        self.assertFalse(state.prefill)
        self.assertFalse(state.inRam, "restored from disk next time")
        # Learning counts nothing: hits and misses are users' requests (KVCache.noteRequest).
        self.assertEqual(state.misses, 0)


class DispatchTests(SynchronousTestCase):
    def ask(self, m: Memory, content: str) -> dict[str, Any]:
        status, answer = m.post("/v1/chat/completions", {"messages": [{"role": "user", "content": content}]})
        self.assertEqual(status, 200, answer)
        message = content.split(" ", 1)[-1].encode()
        record: dict[str, Any] = [r for r in m.completions() if message in r["prompt"]][-1]
        return record

    def test_pinnedOnlyWhereSlotsKeepTheirContents(self) -> None:
        for unified, pinned in ((True, False), (False, True)):
            m = Memory(Path(self.mktemp()), unified=unified)
            m.template("@t", TEMPLATE)
            m.found()
            for question in ("one", "two"):
                record = self.ask(m, f"@t {question}")
                self.assertEqual(record["pinned"] is not None, pinned, unified)
                self.assertLess(record["prompt_n"], 40, (unified, record["prompt_n"]))

    def test_clearedModeRestoresWhatTheRamCacheKeepsLosing(self) -> None:
        """
        A template lost from llama-server's RAM is computed by the request
        that misses it, and the next finds it there, with no restore; once
        the RAM cache has lost it twice in a row, it is restored into an
        empty slot, where llama-server's own choice finds it.
        """
        m = Memory(Path(self.mktemp()), unified=True)
        template = m.template("@t", TEMPLATE)
        m.found()
        m.warmer.stopService()  # the request's own restore, not a re-warm, is what is tested here

        def lose() -> None:
            m.fake.ram.clear()  # type: ignore[union-attr]
            for slot in m.fake.slots:
                slot.tokens = b""

        def restores() -> float:
            return m.metric("bioproxy_kv_cache_restores_total", prefix="@t", status="ok")

        before = restores()
        lose()
        self.assertGreater(self.ask(m, "@t lost once")["prompt_n"], 500)
        self.assertLess(self.ask(m, "@t found in RAM")["prompt_n"], 60)
        self.assertEqual(restores(), before)
        for n in range(RAM_MISS_LIMIT):
            lose()
            self.assertGreater(self.ask(m, f"@t lost again, take {n}")["prompt_n"], 500)
        self.assertFalse(m.cache.state(templateHead(template)).inRam)
        lose()
        self.assertLess(self.ask(m, "@t after the misses")["prompt_n"], 60)
        self.assertGreater(restores(), before)
        self.assertFalse(m.cache.state(templateHead(template)).prefill)

    def test_untemplatedChatsStayOnTheirSlot(self) -> None:
        m = Memory(Path(self.mktemp()), unified=False)
        m.found()
        head = "You answer in haiku, always, about the sea. " * 20
        slots = {self.ask(m, head + question)["slot"] for question in ("why", "how", "when", "where")}
        self.assertEqual(len(slots), 1, "rotated across slots")


class VariantTests(SynchronousTestCase):
    """A template behind a system prompt is learned, warmed, saved, and restored after a restart."""

    SYSTEM = "You speak as a pirate and never break character. " * 10

    def ask(self, m: Memory, question: str) -> dict[str, Any]:
        body = {
            "messages": [
                {"role": "system", "content": self.SYSTEM},
                {"role": "user", "content": f"@t {question}"},
            ]
        }
        status, answer = m.post("/v1/chat/completions", body)
        self.assertEqual(status, 200, answer)
        record: dict[str, Any] = [r for r in m.completions() if question.encode() in r["prompt"]][-1]
        return record

    def test_secondIsWarmAfterRestart(self) -> None:
        for unified in (True, False):
            self.secondIsWarmAfterRestart(unified)

    def secondIsWarmAfterRestart(self, unified: bool) -> None:
        m = Memory(Path(self.mktemp()), unified=unified)
        m.template("@t", TEMPLATE)
        m.found()
        first = self.ask(m, "first question")
        cold = first["prompt_n"] + first["cache_n"]
        self.assertGreater(first["prompt_n"], 0.5 * cold, first)  # a new system prompt pays its prefill
        m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
        variants = m.book.variantsOf("@t")
        self.assertEqual(len(variants), 1, unified)
        self.assertTrue(m.cache.saved(variants[0]), unified)
        m.restarted()
        m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)
        record = self.ask(m, "after the restart")  # the new process had only the file
        self.assertLess(record["prompt_n"], 0.2 * cold, (unified, record))


class AloneTests(SynchronousTestCase):
    """
    The same requests to llama-server alone and through bioproxy, in each
    mode: bioproxy never computes more of a prompt than llama-server's own
    slot choice and RAM cache would.
    """

    PIRATE = {"role": "system", "content": "You speak as a pirate and never break character. " * 10}

    def test_neverWorseThanAlone(self) -> None:
        for unified in (True, False):
            self.neverWorseThanAlone(unified)

    def neverWorseThanAlone(self, unified: bool) -> None:
        m = Memory(Path(self.mktemp()), unified=unified)
        alone = Alone(m, unified=unified)
        texts = {
            f"@t{i}": f"Template {i}: " + "rule after rule. " * (30 + i) + "\n<{message}>" for i in range(6)
        }
        for prefix, text in texts.items():
            m.template(prefix, text)
        m.found()
        m.advanceUntil(lambda: not m.warmer.jobs and not m.warmer.wanted)

        def expand(content: str) -> str:
            prefix, _, message = content.partition(" ")
            return texts[prefix].replace("<{message}>", message) if prefix in texts else content

        worse: list[tuple[str, int, int]] = []

        def both(what: str, messages: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
            straight = alone.post(
                "/v1/chat/completions",
                {"messages": [{**msg, "content": expand(msg["content"])} for msg in messages]},
            )
            status, answer = m.post("/v1/chat/completions", {"messages": messages})
            self.assertEqual(status, 200, answer)
            proxied = m.completions()[-1]
            if proxied["prompt_n"] > straight["prompt_n"]:
                worse.append((what, straight["prompt_n"], proxied["prompt_n"]))
            return straight, proxied

        def user(content: str) -> list[dict[str, Any]]:
            return [{"role": "user", "content": content}]

        both("variant, first", [self.PIRATE, *user("@t0 the first question")])
        for take in range(3):
            for prefix in texts:
                both(f"switch {take}", user(f"{prefix} switching, take {take}"))
            both(f"variant, take {take}", [self.PIRATE, *user(f"@t0 again, take {take}")])
        first = user("@t1 a conversation")
        both("conversation, turn 1", first)
        for prefix in ("@t2", "@t3"):
            both("traffic", user(f"{prefix} in between"))
        reply = {"role": "assistant", "content": "a reply"}
        both("conversation, turn 2", [*first, reply, *user("and then?")])
        self.assertEqual(worse, [], f"unified={unified}: (request, alone, bioproxy) computed tokens")
