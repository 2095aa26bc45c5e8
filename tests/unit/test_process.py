"""
A backend's process as its machine sees it (bioproxy/backend/process.py):
unknown -> probing -> ready, lost and back, a new process probed afresh,
something that is not llama-server, and stop; in memory, over fakellama.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from bioproxy.backend.process import Phase
from bioproxy.backend.scheduler import UNKNOWN, USER
from bioproxy.testing.memory import Memory


class Listener:
    def __init__(self) -> None:
        self.events: list[str] = []

    def backendReady(self) -> None:
        self.events.append("ready")

    def backendLost(self) -> None:
        self.events.append("lost")


def harness(test: SynchronousTestCase) -> tuple[Memory, Listener]:
    m = Memory(Path(test.mktemp()))
    listener = Listener()
    m.backend.listeners.append(listener)
    return m, listener


class PhaseTests(SynchronousTestCase):
    def test_probedThenReady(self) -> None:
        m, listener = harness(self)
        self.assertIs(m.backend.phase, Phase.UNKNOWN)
        self.assertEqual(m.backend.view()["phase"], "unknown")
        m.found()
        self.assertIs(m.backend.phase, Phase.READY)
        self.assertTrue(any(b"bioproxy probe" in r["prompt"] for r in m.fake.log), "it was probed")
        self.assertEqual(listener.events, ["ready"])

    def test_aBlipIsNotProbedAgain(self) -> None:
        m, listener = harness(self)
        m.found()
        probes = len(m.fake.log)
        m.backend.backendLost()
        self.assertIs(m.backend.phase, Phase.LOST)
        m.backend.backendReady(m.fake.props(), restarted=False)
        self.assertIs(m.backend.phase, Phase.READY, "the same process: ready at once")
        m.settle()
        self.assertEqual(len(m.fake.log), probes, "no probe ran")
        self.assertEqual(listener.events, ["ready", "lost", "ready"])

    def test_aNewProcessIsProbedAfresh(self) -> None:
        m, listener = harness(self)
        m.found()
        m.restarted()
        self.assertIs(m.backend.phase, Phase.READY)
        self.assertEqual(listener.events, ["ready", "lost", "ready"])

    def test_lostWhileProbingIsProbedWhenBack(self) -> None:
        m, listener = harness(self)
        user = m.run(m.scheduler.lease(None, USER, pin=0))  # the probe waits for slot 0
        m.backend.backendReady(m.fake.props(), restarted=False)
        self.assertIs(m.backend.phase, Phase.PROBING)
        m.backend.backendLost()
        self.assertIs(m.backend.phase, Phase.LOST)
        m.backend.backendReady(m.fake.props(), restarted=False)
        self.assertIs(m.backend.phase, Phase.PROBING, "never probed: probed now")
        user.release(UNKNOWN)
        m.settle()
        self.assertIs(m.backend.phase, Phase.READY)
        self.assertEqual(listener.events, ["lost", "ready"])

    def test_notLlamaServer(self) -> None:
        m, listener = harness(self)
        m.backend.backendReady({}, restarted=False)
        self.assertIs(m.backend.phase, Phase.FOREIGN)
        self.assertEqual(m.backend.view()["phase"], "not llama-server")
        m.backend.backendReady(m.fake.props(), restarted=False)
        m.settle()
        self.assertIs(m.backend.phase, Phase.READY)

    def test_stoppedStartsNothing(self) -> None:
        m, listener = harness(self)
        m.backend.stop()
        m.backend.backendReady(m.fake.props(), restarted=True)
        m.backend.backendLost()
        m.settle()
        self.assertIs(m.backend.phase, Phase.STOPPED)
        self.assertEqual((listener.events, m.fake.log), ([], []))
        self.assertEqual(m.clock.getDelayedCalls(), [])

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.sampled_from(["found", "restarted", "foreign", "lost", "settle"]), max_size=12))
    def test_anySequence(self, events: list[str]) -> None:
        """Whatever the monitor says in whatever order, once things settle the phase follows the last word."""
        m, listener = harness(self)
        last: Any = None
        for event in events:
            if event == "found":
                m.backend.backendReady(m.fake.props(), restarted=False)
            elif event == "restarted":
                m.fake.restart()
                m.backend.backendReady(m.fake.props(), restarted=True)
            elif event == "foreign":
                m.backend.backendReady({}, restarted=False)
            elif event == "lost":
                m.backend.backendLost()
            else:
                m.settle()
            last = event if event != "settle" else last
        m.settle()
        expected = {
            None: Phase.UNKNOWN,
            "found": Phase.READY,
            "restarted": Phase.READY,
            "foreign": Phase.FOREIGN,
            "lost": Phase.LOST,
        }[last]
        self.assertIs(m.backend.phase, expected, events)
        self.assertEqual(m.backend.ready, expected is Phase.READY)
        # What it last told its listeners agrees with where it stands.
        if expected is Phase.READY:
            self.assertEqual(listener.events[-1:], ["ready"], events)
        elif expected is Phase.LOST:
            self.assertEqual(listener.events[-1:], ["lost"], events)
