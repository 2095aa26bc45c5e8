"""The slot scheduler's rules, on a Clock, including a Hypothesis state machine."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from twisted.internet import defer
from twisted.internet.task import Clock
from twisted.trial.unittest import SynchronousTestCase

from bioproxy.backend.scheduler import (
    EMPTY,
    MIN_SHARED,
    UNKNOWN,
    USER,
    WARMUP,
    BackendGone,
    BadSlot,
    Lease,
    QueueFull,
    QueueTimeout,
    SlotScheduler,
    commonLength,
    holding,
)
from bioproxy.metrics import Metrics

OTHER = holding(None, "some other prompt")


def scheduler(slots: int = 2, retains: bool = True, **kwargs: Any) -> tuple[SlotScheduler, Clock]:
    """A scheduler for a backend whose slots keep their contents, unless retains is False."""
    clock = Clock()
    s = SlotScheduler(clock, slots, Metrics(), **kwargs)
    s.reset(slots, retains)
    return s, clock


def slotOf(lease: Lease) -> int | None:
    return lease.slot.id if lease.slot else None


def granted(d: defer.Deferred[Lease]) -> Lease | None:
    results: list[Lease] = []
    d.addCallback(results.append)
    return results[0] if results else None


class PlacementTests(SynchronousTestCase):
    def test_prefersSlotHoldingTemplate(self) -> None:
        s, clock = scheduler(3)
        s.slots[2].contents = holding("code@1")
        lease = self.successResultOf(s.lease("code@1"))
        self.assertEqual(lease.slot.id if lease.slot else None, 2)
        self.assertTrue(lease.warm)

    def test_otherwiseEmptyOrUnknownThenLeastRecentlyUsed(self) -> None:
        s, clock = scheduler(3)
        s.slots[0].contents, s.slots[0].lastUsed = holding("a@1"), 5.0
        s.slots[1].contents, s.slots[1].lastUsed = OTHER, 3.0
        s.slots[2].contents, s.slots[2].lastUsed = holding("b@1"), 9.0
        lease = self.successResultOf(s.lease("code@1"))
        self.assertEqual((lease.slot.id if lease.slot else None, lease.warm), (1, False))
        s.slots[0].contents = EMPTY
        untemplated = self.successResultOf(s.lease(None))
        self.assertEqual(untemplated.slot.id if untemplated.slot else None, 0)

    def test_longestSharedStartWins(self) -> None:
        """An untemplated prompt returns to the slot holding most of its start, as llama-server's choice."""
        s, clock = scheduler(4)
        head = "You answer in haiku. " * 20
        s.slots[0].contents, s.slots[0].lastUsed = holding(None, head[:100] + "x"), 9.0
        s.slots[1].contents, s.slots[1].lastUsed = holding(None, head + "why?"), 1.0
        s.slots[2].contents, s.slots[2].lastUsed = EMPTY, 0.0
        lease = self.successResultOf(s.lease(None, text=head + "how?"))
        self.assertEqual(slotOf(lease), 1)

    def test_aShortSharedStartIsNoReason(self) -> None:
        """What every chat's JSON starts with, or under a tenth of the prompt, does not count."""
        s, clock = scheduler(2)
        common = '{}\n{"content": "'
        s.slots[0].contents, s.slots[0].lastUsed = holding(None, common + "a" * 500), 1.0
        s.slots[1].contents = EMPTY
        lease = self.successResultOf(s.lease(None, text=common + "b" * 500))
        self.assertEqual(slotOf(lease), 1)
        lease.release()
        s.slots[1].contents, s.slots[1].lastUsed = holding(None, "x" * (MIN_SHARED + 10) + "z" * 300), 10.0
        lease = self.successResultOf(s.lease(None, text="x" * (MIN_SHARED + 10) + "y" * 5000))
        self.assertEqual(slotOf(lease), 0, "shares under a tenth: the least recently used instead")

    def test_aConversationReturnsToItsSlot(self) -> None:
        """
        The client's prompt_cache_key names a conversation: it goes back to
        the slot that served it, where the prompts alone cannot tell (two
        conversations that began alike, greedy answers and all).
        """
        s, clock = scheduler(3)
        turn1 = "You are a coding agent. " * 40 + "list the files" + "a.py b.py"
        for slot, conversation in ((0, "b"), (1, "a")):
            lease = self.successResultOf(s.lease(None, pin=slot, text=turn1, conversation=conversation))
            lease.release(holding(None, turn1))
            self.assertEqual(s.slots[slot].contents.conversation, conversation)
        lease = self.successResultOf(s.lease(None, text=turn1 + "now fix a.py", conversation="a"))
        self.assertEqual(slotOf(lease), 1)
        lease.release(holding(None, turn1))
        unnamed = self.successResultOf(s.lease(None, text=turn1 + "now fix a.py"))
        self.assertEqual(slotOf(unnamed), 0, "without the key, the first of equals")

    def test_whatAFileGivesBackIsCheapToLose(self) -> None:
        """A template slot with a short message costs a restore; a long untemplated prompt costs it all."""
        s, clock = scheduler(2)
        s.slots[0].contents, s.slots[0].lastUsed = holding(None, "s" * 1000), 1.0
        s.slots[1].contents, s.slots[1].lastUsed = holding("t@1", "t" * 1000 + "why?", backed=1000), 9.0
        lease = self.successResultOf(s.lease(None, text="an unrelated question"))
        self.assertEqual(slotOf(lease), 1)

    def test_contentsDoNotCountWhereSlotsAreCleared(self) -> None:
        """On llama-server's default, idle slots are cleared: a lease is capacity, never warm."""
        s, clock = scheduler(3, retains=False)
        s.slots[2].contents = holding("code@1", "text")
        s.slots[0].lastUsed, s.slots[1].lastUsed, s.slots[2].lastUsed = 5.0, 1.0, 3.0
        lease = self.successResultOf(s.lease("code@1", text="text"))
        self.assertEqual((slotOf(lease), lease.warm), (1, False))

    def test_releaseRecordsContents(self) -> None:
        s, clock = scheduler(1)
        lease = self.successResultOf(s.lease("code@1"))
        clock.advance(3)
        lease.release(holding("code@1"))
        self.assertEqual(s.slots[0].contents, holding("code@1"))
        self.assertEqual(s.slots[0].lastUsed, 3)
        again = self.successResultOf(s.lease("code@1"))
        self.assertTrue(again.warm)
        again.release()  # KEEP
        self.assertEqual(s.slots[0].contents, holding("code@1"))

    def test_gaugesReadTheSchedulerWhenScraped(self) -> None:
        s, _ = scheduler(2)
        registry = s.metrics.registry

        def sample(name: str, **labels: str) -> float | None:
            value: float | None = registry.get_sample_value(name, labels)
            return value

        first = self.successResultOf(s.lease("code@1"))
        self.successResultOf(s.lease(None))
        waiting = s.lease(None)
        self.assertEqual(sample("bioproxy_slots", backend="", state="busy"), 2)
        self.assertEqual(sample("bioproxy_queue_depth", backend="", priority="user"), 1)
        first.release(holding("code@1"))
        self.successResultOf(waiting)
        self.assertEqual(sample("bioproxy_slots", backend="", state="busy"), 2)
        self.assertEqual(sample("bioproxy_queue_depth", backend="", priority="user"), 0)
        s.slots[0].lease.release(holding("code@1"))  # type: ignore[union-attr]
        self.assertEqual(sample("bioproxy_slots", backend="", state="template"), 1)
        self.assertEqual(sample("bioproxy_slots", backend="", state="empty"), 0)

    def test_failWaitingGivesBackendGone(self) -> None:
        s, _ = scheduler(1)
        running = self.successResultOf(s.lease("a"))
        waiting = s.lease("b")
        warming = s.lease("c", WARMUP)
        self.assertEqual(s.failWaiting("http://b:1"), 1)
        self.failureResultOf(waiting, BackendGone)
        self.assertNoResult(warming)  # the warmer cancels its own
        running.release()
        self.assertIsNotNone(granted(warming))

    def test_pinnedLeaseWaitsForItsSlot(self) -> None:
        s, clock = scheduler(2)
        first = self.successResultOf(s.lease(None, pin=1))
        pinned = s.lease(None, pin=1)
        self.assertNoResult(pinned)
        # The other slot is free, and an unpinned user behind it gets it.
        other = self.successResultOf(s.lease(None))
        self.assertEqual(other.slot.id if other.slot else None, 0)
        first.release()
        self.assertEqual(self.successResultOf(pinned).slot, s.slots[1])

    def test_pinOutOfRange(self) -> None:
        s, clock = scheduler(2)
        self.failureResultOf(s.lease(None, pin=2), BadSlot)


class PriorityTests(SynchronousTestCase):
    def test_usersBeforeWarmupsAndFIFO(self) -> None:
        s, clock = scheduler(1)
        holder = self.successResultOf(s.lease(None))
        warm = s.lease("a@1", WARMUP)
        users = [s.lease(None) for _ in range(3)]
        order: list[int] = []
        for i, d in enumerate(users):
            d.addCallback(lambda lease, i=i: (order.append(i), lease.release()))
        holder.release()
        self.assertEqual(order, [0, 1, 2])
        self.successResultOf(warm)

    def test_userPreemptsWarmup(self) -> None:
        s, clock = scheduler(1)
        warm = self.successResultOf(s.lease("a@1", WARMUP))
        user = s.lease(None)
        self.assertNoResult(user)
        self.successResultOf(warm.preempted)
        warm.release(UNKNOWN)
        self.assertEqual(self.successResultOf(user).slot, s.slots[0])

    def test_oneWarmupPreemptedPerWaitingUser(self) -> None:
        s, clock = scheduler(3)
        warms = [self.successResultOf(s.lease(f"t{i}@1", WARMUP)) for i in range(3)]
        s.lease(None)
        self.assertEqual([w.preempted.called for w in warms].count(True), 1)
        s.lease(None)
        self.assertEqual([w.preempted.called for w in warms].count(True), 2)

    def test_freeSlotMeansNoPreemption(self) -> None:
        s, clock = scheduler(2)
        warm = self.successResultOf(s.lease("a@1", WARMUP))
        self.successResultOf(s.lease(None))
        self.assertFalse(warm.preempted.called)


class LimitTests(SynchronousTestCase):
    def test_queueFull(self) -> None:
        s, clock = scheduler(1, maxQueue=2)
        self.successResultOf(s.lease(None))
        s.lease(None)
        s.lease(None)
        self.failureResultOf(s.lease(None), QueueFull)
        # Warmups are not users and are never refused.
        self.assertNoResult(s.lease("a@1", WARMUP))

    def test_queueTimeout(self) -> None:
        s, clock = scheduler(1, maxWait=10)
        self.successResultOf(s.lease(None))
        waiting = s.lease(None)
        clock.advance(9)
        self.assertNoResult(waiting)
        clock.advance(1)
        self.failureResultOf(waiting, QueueTimeout)
        self.assertEqual(s.waiting(USER), 0)

    def test_cancelLeavesQueue(self) -> None:
        s, clock = scheduler(1)
        holder = self.successResultOf(s.lease(None))
        gone = s.lease(None)
        behind = s.lease(None)
        gone.cancel()
        self.failureResultOf(gone, defer.CancelledError)
        holder.release()
        self.successResultOf(behind)
        self.assertEqual(clock.getDelayedCalls(), [])


class CommonLengthTests(SynchronousTestCase):
    @given(st.text(max_size=300), st.text(max_size=300), st.text(max_size=300))
    def test_isTheCommonStart(self, shared: str, a: str, b: str) -> None:
        x, y = shared + a, shared + b
        n = commonLength(x, y)
        self.assertEqual(x[:n], y[:n])
        self.assertGreaterEqual(n, len(shared))
        self.assertTrue(n == min(len(x), len(y)) or x[n] != y[n])


class ResetTests(SynchronousTestCase):
    def test_resetForgetsContentsButKeepsInFlightLeases(self) -> None:
        s, clock = scheduler(2)
        s.slots[0].contents = holding("a@1")
        inFlight = self.successResultOf(s.lease(None))
        s.reset(3)
        self.assertEqual([slot.contents for slot in s.slots], [UNKNOWN] * 3)
        self.assertIs(s.slots[inFlight.slot.id if inFlight.slot else -1].lease, inFlight)
        inFlight.release(OTHER)
        self.assertIsNone(s.slots[0].lease)


class SchedulerMachine(RuleBasedStateMachine):
    """Random arrivals, completions, cancellations and preemptions."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.s = SlotScheduler(self.clock, 3, Metrics(), maxQueue=1000, maxWait=50)
        self.s.reset(3, retains=True)
        self.requested: list[tuple[Lease | None, defer.Deferred[Lease], str]] = []
        self.outcomes: dict[int, str] = {}
        self.grantOrder: list[int] = []

    def _ask(self, priority: str, key: str | None, pin: int | None = None, text: str = "") -> None:
        d = self.s.lease(key, priority, pin, text)
        index = len(self.requested)
        self.requested.append((None, d, priority))

        def got(lease: Lease) -> None:
            self.requested[index] = (lease, d, priority)
            self.outcomes[index] = "granted"
            if priority == USER and pin is None:
                self.grantOrder.append(index)
            if priority == WARMUP:
                # Users come first: no waiting user could have had this slot.
                assert not any(u.accepts(lease.slot) for u in self.s.queues[USER] if lease.slot), lease

        def failed(f: Any) -> None:
            self.outcomes[index] = f.type.__name__

        d.addCallbacks(got, failed)

    @rule(
        key=st.sampled_from([None, "a@1", "b@1", "c@1"]), text=st.sampled_from(["", "a" * 99, "a" * 80 + "b"])
    )
    def user(self, key: str | None, text: str) -> None:
        self._ask(USER, key, text=text)

    @rule(retains=st.booleans())
    def probed(self, retains: bool) -> None:
        self.s.reset(3, retains)

    @rule(pin=st.integers(0, 2))
    def pinnedUser(self, pin: int) -> None:
        self._ask(USER, None, pin)

    @rule(key=st.sampled_from(["a@1", "b@1", "c@1", "d@1"]))
    def warmup(self, key: str) -> None:
        self._ask(WARMUP, key)

    def _held(self) -> list[Lease]:
        return [lease for lease, _, _ in self.requested if lease is not None and not lease.released]

    @precondition(lambda self: self._held())
    @rule(data=st.data(), contents=st.sampled_from([None, UNKNOWN, OTHER, holding("a@1", "a" * 99)]))
    def finish(self, data: st.DataObject, contents: Any) -> None:
        lease = data.draw(st.sampled_from(self._held()))
        lease.release(contents) if contents is not None else lease.release()

    @rule()
    def preemptedWarmupsYield(self) -> None:
        for lease in self._held():
            if lease.preempted.called:
                lease.release(UNKNOWN)

    @precondition(lambda self: any(i not in self.outcomes for i in range(len(self.requested))))
    @rule(data=st.data())
    def disconnect(self, data: st.DataObject) -> None:
        waiting = [i for i in range(len(self.requested)) if i not in self.outcomes]
        i = data.draw(st.sampled_from(waiting))
        self.requested[i][1].cancel()

    @rule(seconds=st.floats(0, 60))
    def time(self, seconds: float) -> None:
        self.clock.advance(seconds)

    @invariant()
    def oneLeasePerSlot(self) -> None:
        held = self._held()
        slots = [lease.slot.id for lease in held if lease.slot is not None]
        assert len(slots) == len(set(slots)), held
        for slot in self.s.slots:
            if slot.lease is not None:
                assert slot.lease in held

    @invariant()
    def usersFIFO(self) -> None:
        assert self.grantOrder == sorted(self.grantOrder)

    @invariant()
    def noUserWaitsBehindARunningWarmup(self) -> None:
        warmups = [lease for lease in self._held() if lease.priority == WARMUP]
        running = [lease for lease in warmups if not lease.preempted.called]
        yielding = [lease for lease in warmups if lease.preempted.called]
        unpinned = [u for u in self.s.queues[USER] if u.pin is None]
        if unpinned:
            assert not running or len(yielding) >= len(unpinned), (running, yielding, unpinned)

    @invariant()
    def noLeaseLost(self) -> None:
        for i, (_, d, _) in enumerate(self.requested):
            if i not in self.outcomes:
                # Still waiting: it must be queued, and no slot it accepts is free.
                queued = [lease for q in self.s.queues.values() for lease in q]
                match = [lease for lease in queued if lease.granted is d]
                assert len(match) == 1
                assert not any(slot.lease is None and match[0].accepts(slot) for slot in self.s.slots)
            else:
                assert self.outcomes[i] in ("granted", "CancelledError", "QueueTimeout"), self.outcomes[i]


SchedulerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


class SchedulerMachineTests(SynchronousTestCase):
    def test_machine(self) -> None:
        SchedulerMachine.TestCase().runTest()
