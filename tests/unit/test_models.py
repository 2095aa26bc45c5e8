"""
Several models behind llama-server's router (bioproxy/models.py), in
memory: fakellama's FakeRouter with one model loaded at a time, bioproxy
wired over it as makeService wires it.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import Any

from treq.testing import StubTreq
from twisted.logger import formatEvent
from twisted.trial.unittest import SynchronousTestCase

from bioproxy.backend.process import Phase
from bioproxy.backend.warmup import Phase as WarmPhase
from bioproxy.heads import templateHead
from bioproxy.testing.fakellama import FakeLlamaResource, _error, chatPrompt
from bioproxy.testing.memory import ROUTER_CONFIG, Memory, RouterMemory

from ..helpers import logEvents

TEMPLATE = "You are a careful reviewer of code. Look for bugs, then style. " * 30 + "<{message}>"


class RouterModeTests(SynchronousTestCase):
    def setUp(self) -> None:
        config = dataclasses.replace(ROUTER_CONFIG, models=("alpha", "beta"))
        self.m = RouterMemory(Path(self.mktemp()), config=config)
        self.addCleanup(self.m.stop)
        self.t = self.m.template("@t", TEMPLATE)

    def test_eachModelIsABackendOfItsOwn(self) -> None:
        """The configured backend is the router, relayed to; each model it lists is a unit, not loaded yet."""
        m = self.m
        m.advanceUntil(lambda: len(m.units) == 2)
        self.assertIs(m.member.backend.phase, Phase.ROUTER)
        self.assertEqual(sorted(m.units), ["alpha", "beta"])
        for unit in m.units.values():
            self.assertEqual(unit.name, f"http://llama#{unit.model}")
            self.assertTrue(unit.monitor.unloaded)
        self.assertEqual(m.router.loads, [], "bioproxy loaded a model by itself")

    def test_aRequestReachesItsModel(self) -> None:
        m = self.m
        m.advanceUntil(lambda: len(m.units) == 2)
        for model in ("alpha", "beta", "alpha"):
            record = m.chat(model, "hello there")
            self.assertIn(b"hello there", record["prompt"], model)
        self.assertEqual(m.router.loads, ["alpha", "beta", "alpha"])

    def test_aModelNobodyServesGetsTheRoutersAnswer(self) -> None:
        """Not a guess: llama-server's router answers a model it does not have, or none named."""
        m = self.m
        m.advanceUntil(lambda: len(m.units) == 2)
        chat = {"messages": [{"role": "user", "content": "@t hello"}], "max_tokens": 1}
        status, answer = m.post("/v1/chat/completions", {**chat, "model": "gamma"})
        self.assertEqual((status, answer["error"]["message"]), (400, "model 'gamma' not found"))
        status, answer = m.post("/v1/chat/completions", chat)
        self.assertEqual(
            (status, answer["error"]["message"]), (400, "model name is missing from the request")
        )
        self.assertEqual(m.router.loads, [])

    def test_warmAfterEverySwap(self) -> None:
        """
        With one model loaded at a time, every templated request after the
        first swap finds its template warm: the unit restores it when its
        model is loaded again (a new process), before the request runs.
        """
        m = self.m
        m.advanceUntil(lambda: len(m.units) == 2)
        size = len(TEMPLATE)
        results = []
        computed: dict[str, int] = {}  # by the children after the first swap, probes aside
        for i, model in enumerate(("alpha", "beta", "alpha", "beta", "alpha")):
            before = {name: len(fake.log) for name, fake in m.fakes.items()}
            record = m.chat(model, f"@t check function number {i}, please")
            results.append((model, record["cache_n"], record["prompt_n"]))
            warmer = m.units[model].warmer
            m.advanceUntil(lambda w=warmer: not w.jobs and not w.wanted)  # type: ignore[misc]
            if i == 1:
                probesAfterFirstLoad = {
                    n: sum(b"bioproxy probe" in r["prompt"] for r in f.log) for n, f in m.fakes.items()
                }
                self.assertTrue(all(probesAfterFirstLoad.values()), probesAfterFirstLoad)
            if i >= 2:
                for name, fake in m.fakes.items():
                    work = [
                        r["prompt_n"]
                        for r in fake.log[before[name] :]
                        if b"bioproxy probe" not in r["prompt"]
                    ]
                    computed[name] = computed.get(name, 0) + sum(work)
        for model, cached, tail in results[2:]:
            self.assertGreater(cached, size * 0.9, (model, results))
            self.assertLess(tail, 100, (model, results))
        # Each model probed once: a process loaded again with the same file and flags is not probed again.
        probes = {n: sum(b"bioproxy probe" in r["prompt"] for r in f.log) for n, f in m.fakes.items()}
        self.assertEqual(probes, {n: probesAfterFirstLoad[n] for n in m.fakes}, probes)
        # Restored, never computed again: the requests' own tails, and a token per warmup check.
        self.assertLess(sum(computed.values()), 3 * 100, computed)
        self.assertGreater(sum(computed.values()), 3 * 50, computed)

    def test_unloadedMidWarmupIsNoRefusal(self) -> None:
        """
        The router unloads a model while bioproxy works on it (before its
        monitor knows): the head is not refused, its file not taken for
        missing; it is warmed again once the model is back.
        """
        m = self.m
        m.advanceUntil(lambda: len(m.units) == 2)
        m.chat("alpha", "hello")
        alpha, head = m.units["alpha"], templateHead(self.t)
        m.advanceUntil(lambda: not alpha.warmer.jobs and not alpha.warmer.wanted)
        self.assertTrue(alpha.cache.saved(head))
        m.router.unload("alpha")
        self.assertFalse(m.run(alpha.cacheIO.restore(0, head)))
        self.assertTrue(alpha.cache.mayRestore(head), "the file was taken for missing")
        alpha.warmer.queueWarmup("@t", force=True)  # its file written again: it asks llama-server
        m.settle()
        self.assertEqual(alpha.cache.state(head).error, None)
        self.assertNotEqual(alpha.warmer.phase(head), WarmPhase.REFUSED)
        self.assertIn("@t", alpha.warmer.wanted)
        self.assertEqual(m.router.loads, ["alpha"])

    def test_aConversationAfterASwap(self) -> None:
        """A kept conversation's next turn, after the other model was used, computes only that turn."""
        m = self.m
        m.advanceUntil(lambda: len(m.units) == 2)
        alpha = m.units["alpha"]
        messages: list[dict[str, Any]] = []
        for turn in range(3):
            messages.append(
                {"role": "user", "content": f"@t check function {turn}" if not turn else f"and {turn}?"}
            )
            status, answer = m.post(
                "/v1/chat/completions", {"model": "alpha", "messages": messages, "max_tokens": 4}
            )
            self.assertEqual(status, 200, answer)
            messages.append(answer["choices"][0]["message"])
        m.clock.advance(alpha.warmer.conversationIdle)  # it goes idle: its file is saved
        m.advanceUntil(lambda: not alpha.warmer.jobs and not alpha.warmer.wanted)
        self.assertTrue(any(e.bytes for e in m.book.conversations()), "no conversation saved")
        m.chat("beta", "hello")  # a swap
        messages.append({"role": "user", "content": "and after the swap?"})
        before = len(m.fakes["alpha"].log)
        status, answer = m.post(
            "/v1/chat/completions", {"model": "alpha", "messages": messages, "max_tokens": 4}
        )
        self.assertEqual(status, 200, answer)
        self.assertEqual(m.router.loads, ["alpha", "beta", "alpha"])
        record = next(r for r in m.fakes["alpha"].log[before:] if b"after the swap" in r["prompt"])
        added = len(chatPrompt(messages).encode()) - len(chatPrompt(messages[:-2]).encode())
        self.assertLessEqual(record["prompt_n"], added + 1, record["prompt_n"])
        self.assertGreater(record["cache_n"], len(TEMPLATE), record["cache_n"])

    def test_noLineTwice(self) -> None:
        """Ten minutes of a router with nothing asked of it: each line about it once, not once a poll."""
        seen = logEvents(self)
        m = RouterMemory(Path(self.mktemp()))
        self.addCleanup(m.stop)
        m.clock.pump([1.0] * 600)
        lines = Counter(formatEvent(e) for e in seen)
        self.assertIn(
            "http://llama#beta: the router has not loaded this model (it is warmed again once it is)", lines
        )
        self.assertEqual([line for line, n in lines.items() if n > 1], [])
        self.assertEqual(m.router.loads, [])


class ProbeBackoffTests(SynchronousTestCase):
    def test_aProbeThatFailsTheSameWayIsLoggedOnce(self) -> None:
        """
        A backend that answers /props but refuses the probe's completions
        (as llama-server's router refused them, before bioproxy knew one):
        probed again with a backoff, and the reason logged once.
        """
        seen = logEvents(self)
        m = Memory(Path(self.mktemp()))
        attempts: list[float] = []
        resource = FakeLlamaResource(m.fake)

        def refuse(request: Any) -> bytes:
            attempts.append(m.clock.seconds())
            return _error(request, 400, "model name is missing from the request")

        for path in (b"/completion", b"/completions", b"/v1/completions"):
            resource.routes[(b"POST", path)] = refuse
        m.stub = StubTreq(resource)
        m.member.llama.http = m.stub
        m.found()
        m.clock.pump([1.0] * 600)
        failed = [e for e in seen if "probing the backend failed" in formatEvent(e)]
        self.assertEqual(len(failed), 1, [formatEvent(e) for e in failed])
        self.assertIn("model name is missing", formatEvent(failed[0]))
        # 1, 2, 4 ... 60 s apart: a few in ten minutes, not six hundred.
        tries = sorted(set(attempts))
        self.assertEqual(tries[:7], [0.0, 1.0, 3.0, 7.0, 15.0, 31.0, 63.0])
        self.assertEqual({b - a for a, b in zip(tries[6:], tries[7:], strict=False)}, {60.0})
        lines = Counter(formatEvent(e) for e in seen)
        self.assertEqual([line for line, n in lines.items() if n > 1], [])
        self.assertIs(m.backend.phase, Phase.PROBING)
        # As the line says: requests are relayed meanwhile, not held for a probe.
        status, answer = m.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
        self.assertEqual(status, 200, answer)
        m.backend.stop()
