# -*- test-case-name: tests.unit.test_scheduler -*-
"""
Who runs on which llama-server slot, and in what order.

Bookkeeping only, with no I/O, so that its rules can be checked on a Clock:
at most one lease per slot; users before warmups, FIFO among users; a warmup
gives way the moment a user would otherwise wait.

Placement follows what the backend's slots do between tasks (`retains`).
Where they keep their contents, a request goes to the slot that holds its
template, else to the slot whose prompt shares the longest start with its
own (as llama-server's own choice would), else to the slot cheapest to lose.
Where llama-server clears idle slots into its RAM cache, contents do not
last, so a lease is only a share of the backend's capacity.
"""

from __future__ import annotations

import dataclasses
import enum
from collections import deque
from collections.abc import Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from ..metrics import Metrics

_T = TypeVar("_T")

USER = "user"
WARMUP = "warmup"


# A slot is worth returning to when it shares this much of a prompt's start,
# in characters and as a share of the prompt (llama-server's own default
# --slot-prompt-similarity is 0.1); less is the JSON every chat starts with.
MIN_SHARED = 64
SIMILARITY = 0.1
# A slot whose prompt has less than this beyond what a cache file can restore
# is cheap to lose, whatever its age: losing it costs a restore and a message.
CHEAP_TO_LOSE = 256


class Held(enum.Enum):
    UNKNOWN = "unknown"  # after a start or restart, or an exchange that failed
    EMPTY = "empty"  # a failed restore left it so
    PROMPT = "prompt"  # it holds `text`, and `key` when that starts with a template version


@dataclasses.dataclass(frozen=True)
class Contents:
    """What bioproxy believes a slot's KV cache starts with."""

    held: Held
    text: str = ""  # the prompt's stand-in text (expand.promptText), for shared starts
    key: str | None = None  # the template version it begins with, if any
    backed: int = 0  # how much of text a saved cache file can give back
    conversation: str | None = None  # the client's name for the conversation it holds (prompt_cache_key)

    @property
    def label(self) -> str:
        if self.held is not Held.PROMPT:
            return str(self.held.value)
        return "template" if self.key else "other"


UNKNOWN = Contents(Held.UNKNOWN)
EMPTY = Contents(Held.EMPTY)


def holding(key: str | None, text: str = "", backed: int = 0) -> Contents:
    return Contents(Held.PROMPT, text, key, backed)


def commonLength(a: Sequence[object], b: Sequence[object]) -> int:
    """The length of a's and b's common start (texts, or tokens), by bisection in C-speed slices."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    low, high = 0, n  # a[:low] == b[:low] and a[:high] != b[:high]
    while high - low > 1:
        middle = (low + high) // 2
        if a[low:middle] == b[low:middle]:
            low = middle
        else:
            high = middle
    return low


class Overloaded(Exception):
    """The queue cannot take or keep this request; answered with 503."""

    retryAfter = 5


class QueueFull(Overloaded):
    pass


class QueueTimeout(Overloaded):
    pass


class BackendGone(Exception):
    """The backend went away while this request waited for one of its slots: place it elsewhere."""


class BadSlot(ValueError):
    """A client pinned a slot the backend does not have."""


@dataclasses.dataclass(eq=False)
class Slot:
    id: int
    contents: Contents = UNKNOWN
    lease: Lease | None = None
    lastUsed: float = 0.0


class Lease:
    """The right to send one request to one slot, until released."""

    slot: Slot | None = None
    warm = False  # the slot already held `key` when granted
    released = False
    _timer: IDelayedCall | None = None

    def __init__(
        self,
        scheduler: SlotScheduler,
        priority: str,
        key: str | None,
        pin: int | None,
        seq: int,
        text: str = "",
        conversation: str | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.priority = priority
        self.key = key
        self.text = text
        self.conversation = conversation
        self.pin = pin
        self.seq = seq
        self.requestedAt = scheduler.clock.seconds()
        self.granted: defer.Deferred[Lease] = defer.Deferred(lambda d: scheduler._withdraw(self))
        # Fires when a user needs this warmup's slot; the holder must stop and release.
        self.preempted: defer.Deferred[None] = defer.Deferred()

    def accepts(self, slot: Slot) -> bool:
        return self.pin is None or self.pin == slot.id

    def release(self, contents: Contents | None = None) -> None:
        """Give the slot back; contents is what it holds now (None: as before)."""
        self.scheduler._release(self, contents)

    def __repr__(self) -> str:
        where = self.slot.id if self.slot else None
        return f"<Lease {self.priority} #{self.seq} key={self.key} slot={where}>"


class SlotScheduler:
    def __init__(
        self,
        clock: IReactorTime,
        slots: int,
        metrics: Metrics,
        maxQueue: int = 256,
        maxWait: float = 300.0,
        backend: str = "",
    ) -> None:
        self.clock = clock
        self.metrics = metrics
        self.maxQueue = maxQueue
        self.maxWait = maxWait
        self.slots = [Slot(i) for i in range(slots)]
        # Whether slots keep their contents between tasks; until the backend
        # is probed, assume not, and leave the choice to llama-server.
        self.retains = False
        self.queues: dict[str, deque[Lease]] = {USER: deque(), WARMUP: deque()}
        self._seq = 0
        self._dispatching = False
        self._again = False
        metrics.reportSlots(backend, self.counts)

    def lease(
        self,
        key: str | None = None,
        priority: str = USER,
        pin: int | None = None,
        text: str = "",
        conversation: str | None = None,
    ) -> defer.Deferred[Lease]:
        """
        A Deferred that fires with a Lease once a slot is free for this request.
        Cancelling it (the client left) takes the request out of the queue.
        conversation: the client's own name for the conversation (OpenAI's
        `prompt_cache_key`), which sends it back to the slot that holds it.
        """
        if pin is not None and not 0 <= pin < len(self.slots):
            return defer.fail(
                BadSlot(f"id_slot {pin} is out of range; the backend has {len(self.slots)} slots")
            )
        if priority == USER and len(self.queues[USER]) >= self.maxQueue:
            return defer.fail(QueueFull(f"{len(self.queues[USER])} requests are already waiting for a slot"))
        self._seq += 1
        lease = Lease(self, priority, key, pin, self._seq, text, conversation)
        self.queues[priority].append(lease)
        self._dispatch()
        if priority == USER and not lease.granted.called:
            # Only a request that waits is timed: most are granted at once.
            lease._timer = self.clock.callLater(self.maxWait, self._expire, lease)
        return lease.granted

    def reset(self, count: int, retains: bool = False) -> None:
        """The backend restarted (or was found, or probed): nothing it holds is known any more."""
        self.retains = retains
        old = {slot.id: slot for slot in self.slots}
        self.slots = [Slot(i) for i in range(count)]
        for slot in self.slots:
            previous = old.get(slot.id)
            if previous is not None and previous.lease is not None:
                # Still in flight; its release must land on the new slot.
                slot.lease = previous.lease
                previous.lease.slot = slot
        self._dispatch()

    def forget(self, slotId: int) -> None:
        """A slot's contents turned out not to be what we thought."""
        if slotId < len(self.slots):
            self.slots[slotId].contents = UNKNOWN

    def holders(self, key: str) -> list[Slot]:
        return [s for s in self.slots if s.contents.key == key]

    def waiting(self, priority: str) -> int:
        return len(self.queues[priority])

    # -- internals

    def _release(self, lease: Lease, contents: Contents | None) -> None:
        if lease.released:
            return
        lease.released = True
        slot = lease.slot
        if slot is not None and slot.lease is lease:
            slot.lease = None
            slot.lastUsed = self.clock.seconds()
            if contents is not None and contents.held is Held.PROMPT and lease.conversation:
                contents = dataclasses.replace(contents, conversation=lease.conversation)
            if contents is not None:
                slot.contents = contents
        self._dispatch()

    def _withdraw(self, lease: Lease) -> None:
        self._unqueue(lease)
        self._dispatch()

    def failWaiting(self, reason: str) -> int:
        """
        Give every user request still waiting its BackendGone, so that it is
        placed on another backend; returns how many there were.
        """
        waiting = list(self.queues[USER])
        for lease in waiting:
            self._unqueue(lease)
            lease.granted.errback(BackendGone(reason))
        return len(waiting)

    def _expire(self, lease: Lease) -> None:
        lease._timer = None
        self._unqueue(lease)
        lease.granted.errback(QueueTimeout(f"no slot became free within {self.maxWait:g} s"))
        self._dispatch()

    def _unqueue(self, lease: Lease) -> None:
        queue = self.queues[lease.priority]
        if lease in queue:
            queue.remove(lease)
        if lease._timer is not None and lease._timer.active():
            lease._timer.cancel()
        lease._timer = None

    def _dispatch(self) -> None:
        # Granting runs the holder's code, which may release or ask again:
        # loop here instead of recursing.
        if self._dispatching:
            self._again = True
            return
        self._dispatching = True
        try:
            self._again = True
            while self._again:
                self._again = False
                for lease in self._assign():
                    metrics = self.metrics
                    metrics.child(metrics.queueWait, lease.priority).observe(
                        self.clock.seconds() - lease.requestedAt
                    )
                    lease.granted.callback(lease)
                self._preempt()
        finally:
            self._dispatching = False

    def _assign(self) -> list[Lease]:
        """Give free slots to users in order, then to warmups; returns the new leases."""
        granted = []
        for priority in (USER, WARMUP):
            for lease in list(self.queues[priority]):
                slot = self._place(lease)
                if slot is None:
                    continue
                self._unqueue(lease)
                slot.lease = lease
                lease.slot = slot
                lease.warm = self.retains and lease.key is not None and slot.contents.key == lease.key
                granted.append(lease)
        return granted

    def _place(self, lease: Lease) -> Slot | None:
        free = [s for s in self.slots if s.lease is None and lease.accepts(s)]
        if not free:
            return None
        if not self.retains:
            return min(free, key=lambda s: s.lastUsed)
        if lease.conversation is not None:
            for slot in free:
                if slot.contents.conversation == lease.conversation:
                    return slot
        if lease.key is not None:
            for slot in free:
                if slot.contents.key == lease.key:
                    return slot
        if lease.text:
            shared, best = max(((commonLength(s.contents.text, lease.text), s) for s in free), key=_longest)
            if shared >= max(MIN_SHARED, SIMILARITY * len(lease.text)):
                return best
        return min(free, key=_costToLose)

    def _preempt(self) -> None:
        """Every waiting user gets a warmup slot to wait for, preempting one if needed."""
        yielding = [s for s in self._warmupSlots() if s.lease is not None and s.lease.preempted.called]
        running = [s for s in self._warmupSlots() if s.lease is not None and not s.lease.preempted.called]
        for user in self.queues[USER]:
            claimed = next((s for s in yielding if user.accepts(s)), None)
            if claimed is not None:
                yielding.remove(claimed)
                continue
            victim = next((s for s in running if user.accepts(s)), None)
            if victim is None:
                continue
            running.remove(victim)
            assert victim.lease is not None
            victim.lease.preempted.callback(None)

    def _warmupSlots(self) -> Iterator[Slot]:
        return (s for s in self.slots if s.lease is not None and s.lease.priority == WARMUP)

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """Requests waiting by priority, and slots by what they hold (busy, template, other, empty, unknown)."""
        waiting = {priority: len(queue) for priority, queue in self.queues.items()}
        states = dict.fromkeys(("unknown", "empty", "template", "other", "busy"), 0)
        for slot in self.slots:
            states["busy" if slot.lease else slot.contents.label] += 1
        return waiting, states


def _costToLose(slot: Slot) -> tuple[int, bool, float]:
    """
    Empty or unknown slots cost nothing to reuse; then those whose prompt a
    cache file gives back but for a little; then the least recently used.
    """
    contents = slot.contents
    if contents.held is not Held.PROMPT:
        return (0, False, slot.lastUsed)
    return (1, len(contents.text) - contents.backed >= CHEAP_TO_LOSE, slot.lastUsed)


def _longest(candidate: tuple[int, Slot]) -> tuple[int, float]:
    """The longest shared start; among equals, the most recently used, which llama-server also keeps."""
    shared, slot = candidate
    return (shared, slot.lastUsed)


async def yielding(leases: list[Lease], work: Coroutine[Any, Any, _T]) -> _T:
    """Run work on leases; a user who needs one of their slots cancels it at once."""
    running = defer.ensureDeferred(work)
    for lease in leases:
        lease.preempted.addCallback(lambda _: running.cancel())
    return await running
