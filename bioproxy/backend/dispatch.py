# -*- test-case-name: tests.unit.test_policy,tests.unit.test_conversations -*-
"""
A request that uses a slot: it waits for a lease, so that the backend never
runs more than one request per slot and users go before warmups; its
head is made ready (restored from its file where nothing holds it); it
goes to the backend pinned to its slot where slots keep their contents, and
unpinned where llama-server clears idle slots into its RAM cache (a request
pinned to a cleared slot would not look there); and the cache learns what
happened from the response's timings.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..body import Body
from ..errors import writeError
from ..expand import promptText
from ..forward import Forwarder, Outcome
from ..heads import Head, HeadBook, Kind
from ..serve import ProxyRequest
from ..timings import TimingsReader
from ..why import Reason, Why
from . import Backend
from .cacheio import CacheIO
from .kvcache import KVCache, Prepared
from .monitor import BackendMonitor
from .scheduler import (
    EMPTY,
    UNKNOWN,
    USER,
    BackendGone,
    BadSlot,
    Contents,
    Lease,
    Overloaded,
    SlotScheduler,
    holding,
)
from .warmup import Warmer

log = Logger()

# How long a request waits for a check of a backend last seen away (the
# check itself is two short calls when it is back).
RECHECK_TIMEOUT = 5.0
# How long a request waits for a new backend process's probe (a few short
# completions), so as to restore its head instead of computing it.
PROBE_TIMEOUT = 10.0
# A request with no head of bioproxy's that reused at least this share of
# its prompt found it in llama-server's own cache.
HALF = 0.5
# How long a request for a model its router has not loaded waits for the
# load bioproxy asks for, before it goes on (and the router loads it anyway).
LOAD_TIMEOUT = 120.0


class Dispatcher:
    def __init__(
        self,
        scheduler: SlotScheduler,
        cache: KVCache,
        cacheIO: CacheIO,
        forwarder: Forwarder,
        warmer: Warmer,
        monitor: BackendMonitor,
        backend: Backend,
        book: HeadBook,
    ) -> None:
        self.book = book  # told of each conversation answered
        self.scheduler = scheduler
        self.cache = cache
        self.cacheIO = cacheIO
        self.forwarder = forwarder
        self.warmer = warmer
        self.monitor = monitor
        self.backend = backend
        # Whether a request whose backend cannot be reached may go to another
        # (the router says, while there are several); else it gets a 502.
        self.replaceable: Callable[[], bool] = lambda: False

    async def send(self, request: ProxyRequest, body: Body, pinnable: bool = True) -> None:
        """
        Forward body on a leased slot. body.head is the head the prompt
        starts with, whose cache the slot can reuse. pinnable: llama-server reads
        id_slot on this route; where it does not (Anthropic Messages), the
        request still takes a lease, and the slot it is placed on is where
        llama-server's own choice will find what it starts with.
        """
        if self.backend.passesThrough:  # nothing to model: relayed as it is
            await self.forwarder.forward(request, body.forwarded if body.expanded else None)
            return
        if self.monitor.swappable:
            # A model of llama-server's router: it may have been unloaded,
            # or unloaded and loaded again, since the last poll; asked now.
            await self.monitor.checkNow(RECHECK_TIMEOUT)
        if self.monitor.unloaded:
            # A model of llama-server's router that is not loaded: loading
            # it (as the router would for this request) is a new process,
            # whose probe and this request's restore then run first.
            await self.monitor.loadModel(LOAD_TIMEOUT)
        elif self.monitor.reachable is False:
            # It may be back as a new process that has lost every slot: ask
            # now, not at the next poll, so that this request restores its
            # head from its file instead of computing it.
            await self.monitor.checkNow(RECHECK_TIMEOUT)
        if not self.backend.ready and self.monitor.reachable:
            # A new process, being probed: its files are named once it is.
            await self.backend.probed(PROBE_TIMEOUT)
        head = self._resumed(body) or body.head
        pin = body.parsed.get("id_slot") if pinnable else None
        if "id_slot" in body.parsed and pinnable and (not isinstance(pin, int) or isinstance(pin, bool)):
            # Anything else would reach llama-server as a slot bioproxy did not reserve.
            writeError(request, 400, f"id_slot must be an integer slot number, not {json.dumps(pin)}.")
            return
        # Only where slots keep their contents does placement compare prompts.
        text = body.text if self.backend.pins else ""
        asking = self.scheduler.lease(head.key if head else None, USER, pin, text, body.conversation)
        gone: list[Failure] = []

        def clientLeft(reason: Failure) -> None:
            gone.append(reason)
            asking.cancel()

        request.notifyFinish().addErrback(clientLeft)
        try:
            lease = await asking
        except defer.CancelledError:
            return
        except Overloaded as e:
            writeError(
                request, 503, f"The backend is busy: {e}.", headers={b"retry-after": b"%d" % e.retryAfter}
            )
            return
        except BadSlot as e:
            writeError(request, 400, str(e))
            return
        contents: Contents | None = UNKNOWN
        rewarm: list[Head] = []
        try:
            contents = await self._run(request, lease, body, head, pinnable, gone, text, rewarm)
        finally:
            lease.release(contents)
        # Only now: a warmup that asked for a slot while this request held
        # one would get another, and evict what that one holds. Now it
        # finds the head where this request left it.
        for missed in rewarm:
            self.warmer.queueWarmup(missed.name)

    async def _run(
        self,
        request: ProxyRequest,
        lease: Lease,
        body: Body,
        head: Head | None,
        pinnable: bool,
        gone: list[Failure],
        text: str,
        rewarm: list[Head],
    ) -> Contents | None:
        """The request on its leased slot; heads to warm again once it is released go in rewarm."""
        restoring = (
            not self.backend.pins
            and head is not None
            and not self.cache.state(head).inRam
            and self.cache.mayRestore(head)
        )
        # Where its head is restored into an empty slot for it, no warmup's
        # task may take that slot before this request has run on it.
        with self.cacheIO.restoredForUser() if restoring else contextlib.nullcontext():
            assert lease.slot is not None
            pins = self.backend.pins
            slot = lease.slot.id
            how: Prepared = "warm"
            if pins:
                how = await self._preparePinned(lease, head)
            elif head is not None:
                how = await self._prepareUnpinned(slot, head)
            if head is not None and how in ("failed", "cold") and not head.learned:
                # A template that was not warm. (A learned head is not warmed:
                # its request computes it, and its slot is saved as its file.)
                rewarm.append(head)
            if gone:
                if not pins:
                    return UNKNOWN
                if how == "restored" and head:
                    return self.cache.holding(head, self.cache.warmText(head))
                return EMPTY if how == "failed" else None  # a failed restore leaves the slot empty
            reader = TimingsReader()
            pinned = pins and pinnable
            if pinned:
                request.slot = slot  # for the access line
            # Why it would be cold, from the facts as they stand before it runs.
            cold = self._coldReason(head, how, body, request) if how in ("cold", "failed") else None
            await self.cacheIO.quiet()
            outcome = await self.forwarder.forward(
                request, body.pinned(slot if pinned else None), reader.feed, self.replaceable()
            )
            contents = self._learn(outcome, reader, head, body, slot, how, pinned, text, rewarm)
            if outcome.complete and reader.timings is not None and (outcome.status or 500) < 400:
                request.reason = self._reason(head, how, cold, reader.timings, body, request)
                if head is not None:
                    cached = int(reader.timings.get("cache_n", 0))
                    self.cache.noteRequest(head, request.reason, slot, cached, request.requestId.decode())
            if outcome.error == "connect" and outcome.status is None and self.replaceable():
                # Nothing was answered: the router places the request on another backend.
                raise BackendGone(self.forwarder.backend.decode())
            if reader.timings is not None:  # for the access line
                request.cached = reader.timings.get("cache_n")
                request.computed = reader.timings.get("prompt_n")
            return contents if pins else UNKNOWN

    def _resumed(self, body: Body) -> Head | None:
        """
        The longest kept conversation that body continues, where this
        backend holds it or can restore its file (after a restart, say);
        None to start from the head body begins with, as any request.
        """
        for head in body.resumes:
            if self.cache.state(head).warm or self.cache.mayRestore(head):
                return head
        return None

    async def _preparePinned(self, lease: Lease, head: Head | None) -> Prepared:
        """Slots keep their contents: the leased slot gets the head unless it holds it."""
        assert lease.slot is not None
        held = lease.slot.contents.key
        if head is None:
            self.cache.noteDisplaced(held)
            return "warm"
        if lease.warm or self.cache.holds(lease.slot.contents, head):
            return "warm"
        return await self.cacheIO.prepare(lease.slot.id, head, held, ram=True)

    async def _prepareUnpinned(self, slot: int, head: Head) -> Prepared:
        """
        Idle slots are cleared into the RAM cache: a head that is there
        needs nothing; one that is not is restored into an empty slot, where
        llama-server's own choice finds it.
        """
        if self.cache.state(head).inRam:
            return "ram"
        if not self.cache.mayRestore(head):
            return "cold"
        if await self.cacheIO.restoreIntoEmptySlot(slot, head):
            return "restored"
        return "failed"

    def _reason(
        self,
        head: Head | None,
        how: Prepared,
        cold: Reason | None,
        timings: dict[str, Any],
        body: Body,
        request: ProxyRequest,
    ) -> Reason:
        """Why the request's prompt was or was not reused, now that its timings say what it reused."""
        cached, computed = int(timings.get("cache_n", 0)), int(timings.get("prompt_n", 0))
        mostly = cached >= max(1, cached + computed) * HALF
        if head is None:
            return Reason(Why.FOUND) if mostly else cold or self._headless(body, request)
        # Against the head's size, once known; before (its first use), against the prompt's.
        reused = self.cache.reused(head, timings) if self.cache.sized(head) else "hit" if mostly else "lost"
        if reused == "checkpoint":
            return Reason(Why.CHECKPOINT)
        if reused == "hit":
            warm = {"warm": Why.IN_SLOT, "ram": Why.IN_RAM, "restored": Why.RESTORED}
            return Reason(warm.get(how, Why.IN_SLOT if self.backend.pins else Why.FOUND))
        if how == "restored":
            return Reason(Why.RESTORE_REFUSED, "restored, but llama-server reused none of it")
        if cold is not None:
            return cold
        return Reason(Why.EVICTED, "llama-server no longer held it")

    def _coldReason(self, head: Head | None, how: Prepared, body: Body, request: ProxyRequest) -> Reason:
        """Why a request whose head was neither held nor restored finds it cold."""
        if request.placedByGuard:
            return Reason(Why.LOAD_GUARD, "the backends were out of balance; it was warm elsewhere")
        if head is None:
            return self._headless(body, request)
        state = self.cache.state(head)
        if how == "failed" and state.refused is not None:
            return Reason(Why.RESTORE_REFUSED, f"llama-server: {state.refused}")
        noFiles = self.backend.noFilesWhy()
        pending = self.book.pending(head)
        if pending is not None:
            return Reason(Why.NOT_LEARNED, f"seen {pending[0]} of {pending[1]} times")
        if state.restarted:
            return Reason(Why.RESTARTED, noFiles)
        if not state.warm and state.lastWarmup is None and not state.hits + state.misses:
            if state.edited:
                return Reason(Why.EDITED)
            warming = head.name in self.warmer.jobs or head.name in self.warmer.wanted
            return Reason(Why.FIRST_USE, "its warmup had not finished" if warming else None)
        if noFiles is not None:
            return Reason(Why.NO_FILES, noFiles)
        return Reason(Why.EVICTED)

    def _headless(self, body: Body, request: ProxyRequest) -> Reason:
        """Why a request that starts with no head bioproxy keeps has nothing of bioproxy's to reuse."""
        if body.unmeasured is not None:
            return Reason(Why.SHORT, "its start is too short to keep until its tokens are counted")
        first = body.view.messages[0] if body.view is not None and body.view.messages else {}
        if isinstance(first, dict) and first.get("role") in ("system", "developer"):
            return Reason(Why.SHORT, "a system prompt too short to be worth keeping")
        parted = self.book.divergence(body.view)
        if parted is not None:
            index, role = parted
            return Reason(Why.DIVERGED, f"at message {index} ({role})")
        return Reason(Why.NO_HEAD)

    def _saveServed(self, head: Head, slot: int | None, timings: dict[str, Any] | None) -> None:
        """
        The slot that just computed head is saved as its file (by the
        warmer, which warms it instead where that fails). timings: None when
        the answer said nothing of them (an Anthropic stream from
        llama-server 11434 can leave out the event that carries its usage).
        """
        prompt = timings.get("cache_n", 0) + timings.get("prompt_n", 0) if timings else None
        generated = timings.get("predicted_n") if timings else None
        self.warmer.saveServed(head, slot, prompt, generated if isinstance(generated, int) else None)

    def _learn(
        self,
        outcome: Outcome,
        reader: TimingsReader,
        head: Head | None,
        body: Body,
        slot: int,
        how: Prepared,
        pinned: bool,
        text: str,
        rewarm: list[Head],
    ) -> Contents | None:
        """What the slot holds now, from how the exchange ended and its timings."""
        if outcome.error == "connect":
            self.monitor.noteUnreachable("a request could not connect")
        if not outcome.complete or outcome.status is None or outcome.status >= 500:
            return UNKNOWN
        if outcome.status >= 400:
            return None  # llama-server refuses before it touches the slot
        timings = reader.timings
        if timings is not None:
            self.cache.count(body.prefix, timings)
            self._measure(body, timings)
        conversation = self._kept(body, slot if pinned else None, timings)
        if head is not None:
            self._learnHead(head, slot, how, pinned, timings, rewarm, conversation)
        opening = body.head
        if head is not opening and opening is not None:
            # It resumed a conversation: what it began with is kept all the same.
            self._keepHead(opening, slot, pinned, timings, rewarm, conversation)
        # Whatever the reuse was, the slot has just computed the head the
        # request began with (by whose key placement finds it) and the
        # conversation (which placement finds by its text).
        base = opening if opening is not None else head if head is not None else conversation
        return self.cache.holding(base, text) if base is not None else holding(None, text)

    def _measure(self, body: Body, timings: dict[str, Any]) -> None:
        """The share of the request's prompt tokens that its unmeasured start takes, for the book."""
        shell = body.unmeasured
        if shell is None or shell.view is None or not body.text:
            return
        tokens = timings.get("cache_n", 0) + timings.get("prompt_n", 0)
        share = min(1.0, len(promptText(shell.view)) / len(body.text))
        self.book.measured(shell, int(tokens * share))

    def _kept(self, body: Body, slot: int | None, timings: dict[str, Any] | None) -> Head | None:
        """A chat was answered: the book keeps it as a conversation, whose file the warmer saves once it is idle."""
        if body.view is None:
            return None
        tokens = timings.get("cache_n", 0) + timings.get("prompt_n", 0) if timings else None
        # What the head it began with gives back, where that is warm already:
        # one that is not is warmed now, which in llama-server's default mode
        # takes this conversation out of the RAM cache (a cache entry moves
        # into the slot that uses it), so the conversation is kept, whatever
        # its length past the head.
        covered = 0
        state = self.cache.state(body.head) if body.head is not None else None
        if state is not None and state.warm and tokens:  # its boundary, or its share of the prompt
            assert body.head is not None
            covered = state.reusable or int(
                tokens * min(1.0, len(self.cache.warmText(body.head)) / max(1, len(body.text)))
            )
        kept = self.book.served(body.view, tokens or None, lambda: body.links, covered)
        if kept is None:
            return None
        conversation, grown = kept
        self.cache.noteServed(conversation, slot, timings)
        self.warmer.conversationServed(conversation, grown)
        return conversation

    def _keepHead(
        self,
        head: Head,
        slot: int,
        pinned: bool,
        timings: dict[str, Any] | None,
        rewarm: list[Head],
        conversation: Head | None,
    ) -> None:
        """
        The request just computed head (or went on from it): its file is
        saved from the slot, or it is warmed to its boundary; where the
        request is a kept conversation that would take the conversation out
        of llama-server's RAM cache, so the conversation is saved first
        (Warmer.warmAfter).
        """
        if conversation is not None and not self.cache.atBoundary(head):
            self.warmer.warmAfter(conversation, head)
        elif not self.cache.saved(head) and self.cache.persists(head):
            self._saveServed(head, slot if pinned else None, timings)
        elif not self.cache.atBoundary(head):
            rewarm.append(head)  # a warmup leaves it at its boundary, where every request extends it

    def _learnHead(
        self,
        head: Head,
        slot: int,
        how: Prepared,
        pinned: bool,
        timings: dict[str, Any] | None,
        rewarm: list[Head],
        conversation: Head | None,
    ) -> None:
        """
        What a request that began with head says of it: save it, warm it
        again, or trust its restores less. conversation: the conversation
        kept from the request, if any.
        """
        # A conversation's file is saved once it is idle; it is never warmed
        # again (its next turn resumes a longer one).
        kept = head.kind is not Kind.CONVERSATION
        if kept:
            self._keepHead(head, slot, pinned, timings, rewarm, conversation)
        # Only a pinned request right after a restore tells whether restores work.
        restored = how == "restored" and pinned
        missed = (
            timings is not None and self.cache.learn(head, slot, timings, restored, how == "ram") == "lost"
        )
        if missed and how in ("warm", "ram"):
            # What the backend held is gone: a new process, maybe, that no poll has seen yet.
            self.monitor.checkNow(RECHECK_TIMEOUT)
        if missed and kept and how not in ("cold", "failed"):
            rewarm.append(head)  # it should have been warm: warm it again
