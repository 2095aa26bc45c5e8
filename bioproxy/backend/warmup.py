# -*- test-case-name: tests.unit.test_policy,tests.unit.test_logs -*-
"""
Warmups: every head is put into a slot and onto the backend's disk
before a user needs it, at warmup priority so that users never wait for one.

A warmup restores the head's file when there is one and prefills it when
there is not: it sends the head's boundary tokens (everything before the
user's text, CacheIO.boundary) and one token to generate, so that what a
slot, the RAM cache and the file hold is a prefix of every request that
uses the head, which is all a hybrid model's file can serve. After a
restore it sends one token more than the head: cheap, and its `cache_n`
tells whether the restore really worked. Where a restored file gives
nothing (a sliding-window model), there are no files: heads are prefilled.

Where llama-server clears idle slots into its RAM cache (its default), the
warmup works in an idle, empty slot, checks a restore with an unpinned
request (reaching the head the way users' requests will), and warmups
run one at a time: each task llama-server starts clears the idle slots, so a
second warmup would empty the first one's slot before it is saved.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from typing import Any, Literal

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..heads import Head, HeadBook, Kind
from ..metrics import Metrics
from ..templates import Template
from . import Backend, Reuse
from .cacheio import CacheIO
from .kvcache import KVCache, WarmState
from .llamacpp import NotLoaded, Refused, Unauthorized, Unreachable
from .scheduler import UNKNOWN, WARMUP, Lease, SlotScheduler, yielding

log = Logger()

# The longest wait, in seconds, before a head whose file could not be written is saved again.
SAVE_RETRY_LIMIT = 300.0
# How a warmup made its head warm (the `how` label of bioproxy_warmup_total);
# "saved": a conversation's file, written from what llama-server held.
Warmed = Literal["prefill", "restore", "resident", "saved"]


class Phase(enum.Enum):
    """Where a head stands, as an operator asks it: is it warm, where, and why not."""

    QUEUED = "queued"  # a warmup is wanted and waits its turn
    WARMING = "warming"  # a warmup runs now
    RETRYING = "retrying"  # the last one failed; another is scheduled
    REFUSED = "refused"  # llama-server refused it (too long, wrong key); warmup_error says why
    IN_SLOT = "warm in a slot"  # a slot that keeps its contents holds it
    IN_RAM = "warm in llama-server's RAM cache"
    ON_DISK = "on disk"  # its file is saved: a restore away
    COLD = "cold"  # nothing holds it yet
    BACKEND_DOWN = "backend down"  # nothing can be warmed until llama-server is back


class Held(enum.Enum):
    """Where a backend holds a head, from its facts alone, whatever warmup or save is under way."""

    IN_SLOT = "slot"
    IN_RAM = "ram"
    ON_DISK = "disk"
    NOWHERE = "nowhere"


_WARMTH = {Held.IN_SLOT: 2, Held.IN_RAM: 2, Held.ON_DISK: 1, Held.NOWHERE: 0}
_PHASE_OF = {
    Held.IN_SLOT: Phase.IN_SLOT,
    Held.IN_RAM: Phase.IN_RAM,
    Held.ON_DISK: Phase.ON_DISK,
    Held.NOWHERE: Phase.COLD,
}


class Warmer(Service):
    def __init__(
        self,
        book: HeadBook,
        scheduler: SlotScheduler,
        cache: KVCache,
        cacheIO: CacheIO,
        backend: Backend,
        clock: IReactorTime,
        metrics: Metrics,
        timeout: float,
        retryDelay: float = 5.0,
        conversationIdle: float = 5.0,
        unloaded: Callable[[], None] = lambda: None,
    ) -> None:
        """unloaded: told when a warmup finds its model unloaded by llama-server's router (the monitor's noteUnloaded)."""
        self.book = book
        self.scheduler = scheduler
        self.cache = cache
        self.cacheIO = cacheIO
        self.backend = backend
        self.llama = backend.llama
        self.clock = clock
        self.metrics = metrics
        self.timeout = timeout
        self.retryDelay = retryDelay
        # Seconds without a turn after which a conversation's file is saved.
        self.conversationIdle = conversationIdle
        self.unloaded = unloaded
        self._idle: dict[str, IDelayedCall] = {}
        # The head each conversation opens with, to warm once it is saved (warmAfter).
        self._after: dict[str, str] = {}
        self.wanted: set[str] = set()
        self.jobs: dict[str, defer.Deferred[None]] = {}
        # Heads whose warmup has run to an end (warm, refused or failed) since
        # the backend was last found: what /ready waits for.
        self.tried: set[str] = set()
        self._retries: list[IDelayedCall] = []
        self.retrying: set[str] = set()
        # Whether a head is this backend's to warm; the router says, when
        # there are several (warm_on).
        self.assigned: Callable[[Head], bool] = lambda head: True

    @property
    def ready(self) -> bool:
        """The backend is up, probed, and its slots are known."""
        return self.backend.ready

    def phase(self, head: Head) -> Phase:
        """head's warm phase, from what the warmer, the slots and the cache know."""
        state = self.cache.state(head)
        if head.name in self.jobs:
            return Phase.WARMING
        if not self.ready:
            return Phase.BACKEND_DOWN
        if state.error is not None:
            return Phase.REFUSED
        if head.name in self.retrying:
            return Phase.RETRYING
        if head.name in self.wanted:
            return Phase.QUEUED
        return _PHASE_OF[self.held(head)]

    def warmth(self, head: Head) -> int:
        """
        What head costs a request here: 2 where held in a slot or the RAM
        cache, 1 where its file is saved, else 0 (placement's measure).
        """
        return _WARMTH[self.held(head)] if self.ready else 0

    def held(self, head: Head) -> Held:
        """
        Where head is held: the facts placement reads (a head re-warmed or
        re-saved is still where it was), and the operator's phase shows
        when no warmup is under way.
        """
        if self.backend.pins and any(slot.contents.key == head.key for slot in self.scheduler.slots):
            return Held.IN_SLOT
        if self.cache.state(head).inRam and not self.backend.pins:
            return Held.IN_RAM
        if self.cache.saved(head):
            return Held.ON_DISK
        return Held.NOWHERE

    def untried(self, prefixes: Iterable[str]) -> list[str]:
        """Those of prefixes whose warmup has not yet run to an end."""
        return sorted(p for p in prefixes if p not in self.tried)

    # -- what starts warmups

    def backendReady(self) -> None:
        """The backend was found or came back, and has been probed: warm everything."""
        log.info("{backend}: warming {n} head(s)", n=len(self.book.wanted()), backend=self.llama.name)
        self.tried.clear()
        self.warmAll()

    def backendLost(self) -> None:
        """Drop every warmup in flight, so that llama-server's shutdown never waits on one."""
        for prefix, job in list(self.jobs.items()):
            self.wanted.add(prefix)
            job.cancel()

    def templateChanged(self, template: Template) -> None:
        """A template's new version: warm it, and every head built on it."""
        self.queueWarmup(template.prefix)
        for head in self.book.variantsOf(template.prefix):
            self.queueWarmup(head.name)

    def saveServed(self, head: Head, slot: int | None, prompt: int | None, generated: int | None) -> None:
        """
        A request computed head, which has no file yet: its slot is saved
        as the file (CacheIO.saveServed), as a job of ours, so that a lost
        backend or a stop cancels it; where that cannot be done, head is
        warmed instead.
        """
        if head.name in self.jobs or not self.ready or not self.running:
            return  # (a request that ends as bioproxy stops starts nothing that outlives it)
        job = defer.ensureDeferred(self._saveServed(head, slot, prompt, generated))
        self.jobs[head.name] = job
        job.addBoth(self._ended, head.name)

    async def _saveServed(
        self, head: Head, slot: int | None, prompt: int | None, generated: int | None
    ) -> None:
        try:
            saved = await self.cacheIO.saveServed(head, slot, prompt, generated)
        except Unreachable:
            raise  # warmed later (_ended), or when llama-server is back
        except Exception:
            self.wanted.add(head.name)
            raise
        if not saved:
            self.wanted.add(head.name)

    def conversationServed(self, head: Head, grown: bool) -> None:
        """
        A conversation was answered. Its file is saved once it has had no
        turn for conversationIdle seconds (a turn sooner makes a longer
        one, and this one is dropped: HeadBook.served), or at once when it
        has grown much since its last file (grown): off every request's
        path, one conversation at a time.
        """
        if not self.running:
            return
        if grown and self.cache.persists(head):
            self.queueWarmup(head.name)
            return
        self._cancelIdle(head.name)
        self._idle[head.name] = self.clock.callLater(self.conversationIdle, self._wentIdle, head.name)

    def warmAfter(self, conversation: Head, opening: Head) -> None:
        """
        conversation opens with head opening, which is not yet warm at its
        boundary, where its warmup would leave it: that warmup would take the
        conversation out of llama-server's RAM cache and cut it there (a
        cache entry moves into the slot that uses it). So the conversation
        is saved first, at once, and opening warmed after
        (_afterConversation); its next turn is restored from its file.
        """
        self._after[conversation.name] = opening.name
        self._cancelIdle(conversation.name)
        if self.cache.persists(conversation) and not self.cache.saved(conversation):
            self.queueWarmup(conversation.name)
        else:
            self._afterConversation(conversation.name)

    def _wentIdle(self, name: str) -> None:
        del self._idle[name]
        head = self.book.get(name)
        if head is not None and self.cache.persists(head) and not self.cache.saved(head):
            self.queueWarmup(name)
        else:
            self._afterConversation(name)

    def _afterConversation(self, name: str) -> None:
        """
        Conversation name is saved, or had nothing to save: the head it
        opens with is warmed now. That takes the conversation out of
        llama-server's RAM cache (where the warmup finds the head), so its
        next turn is restored from its file instead.
        """
        opening = self._after.pop(name, None)
        head = self.book.get(name)
        if opening is None:
            return
        if head is not None and not self.backend.pins:
            self.cache.lostFromRam(head)
        self.queueWarmup(opening)

    def _cancelIdle(self, name: str) -> None:
        call = self._idle.pop(name, None)
        if call is not None and call.active():
            call.cancel()

    def forget(self, name: str) -> None:
        """The book gave head name up: nothing of it is wanted any more."""
        self._cancelIdle(name)
        self.wanted.discard(name)
        # A longer turn of it, which carries its opening on, replaced it; or
        # it was given up, and its opening waits for the next conversation.
        self._after.pop(name, None)

    def warmAll(self) -> None:
        for head in self.book.wanted():
            self.queueWarmup(head.name)

    def queueWarmup(self, prefix: str, force: bool = False) -> bool:
        """
        Queue a warmup of prefix (one not this backend's to warm is let go
        when its turn comes); force also writes its file again. False: no
        such head.
        """
        head = self.book.get(prefix)
        if head is None:
            return False
        if force:
            self.cache.forgetFile(head)
        self.wanted.add(prefix)
        self._kick()
        return True

    # -- service

    def startService(self) -> None:
        super().startService()
        self._kick()

    def stopService(self) -> None:
        super().stopService()
        for call in [*self._retries, *self._idle.values()]:
            if call.active():
                call.cancel()
        self._idle.clear()
        self.retrying.clear()
        for job in list(self.jobs.values()):
            job.cancel()

    # -- running them

    def _kick(self) -> None:
        if not self.running or not self.ready:
            return
        for prefix in sorted(self.wanted - set(self.jobs)):
            head = self.book.get(prefix)
            if head is not None and not self.assigned(head):
                self.wanted.discard(prefix)
                self.tried.add(prefix)  # another backend's to warm: nothing to wait for here
                continue
            if not self.backend.pins and self.jobs:
                # Each task llama-server starts clears the idle slots, so a
                # second warmup would clear the first's slot before its save.
                break
            if head is not None and head.kind is Kind.CONVERSATION and self._conversationJob():
                continue  # one conversation's file at a time: each is a long save
            self.wanted.discard(prefix)
            job = defer.ensureDeferred(self._run(prefix))
            self.jobs[prefix] = job
            job.addBoth(self._ended, prefix)

    def _conversationJob(self) -> bool:
        heads = (self.book.get(name) for name in self.jobs)
        return any(head is not None and head.kind is Kind.CONVERSATION for head in heads)

    def _ended(self, result: object, prefix: str) -> None:
        del self.jobs[prefix]
        if prefix in self._after:
            self._afterConversation(prefix)
        if prefix not in self.wanted:  # not given back to a user, nor cancelled by a lost backend
            self.tried.add(prefix)
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            if not self.ready:  # its backend went away under it: the reason is logged already
                log.info(
                    "{backend}: warmup of {prefix} stopped: {why}",
                    prefix=prefix,
                    why=result.getErrorMessage(),
                    backend=self.llama.name,
                )
            elif result.check(Unreachable):
                # llama-server stopped under it (killed while saving, say): what
                # was cut off is done again once it is back (backendReady).
                log.warn(
                    "{backend}: {prefix}: llama-server went away ({why})",
                    prefix=prefix,
                    why=result.getErrorMessage(),
                    backend=self.llama.name,
                )
                self._retryLater(prefix)
            else:
                log.failure(
                    "{backend}: warmup of {prefix} failed unexpectedly",
                    result,
                    prefix=prefix,
                    backend=self.llama.name,
                )
        self._kick()

    async def _run(self, prefix: str) -> None:
        head = self.book.get(prefix)
        if head is None:
            return
        state = self.cache.state(head)
        conversation = head.kind is Kind.CONVERSATION
        if conversation and (self.cache.saved(head) or not self.cache.persists(head)):
            return  # saved already, or no file can serve it (its next turn computes it, as alone)
        await self.cacheIO.boundary(head)
        if conversation and state.boundary is None:
            return  # llama-server cannot say where its next answer begins: no file
        lease = await self.scheduler.lease(head.key, WARMUP, text=self.cache.warmText(head))
        started = self.clock.seconds()
        try:
            how = await yielding([lease], self._warm(lease, head, state))
        except Exception as e:  # noqa: BLE001 - a failed warmup is retried, never fatal
            lease.release(UNKNOWN)
            # A cancelled request surfaces as the HTTP client's own failure,
            # so the lease, not the exception, says whether a user took over.
            if lease.preempted.called:
                self.metrics.warmupCancellations.labels(prefix=head.label).inc()
                log.info(
                    "{backend}: warmup of {prefix} gave its slot to a user request",
                    prefix=prefix,
                    backend=self.llama.name,
                )
                self.wanted.add(prefix)
            elif isinstance(e, Unauthorized):
                self.metrics.warmupFailures.labels(prefix=head.label, kind="unauthorized").inc()
                self.cache.noteRefused(head, str(e))
                log.error(
                    "{backend}: llama-server refused bioproxy's warmup of {prefix} ({why}): {fix}",
                    prefix=prefix,
                    why=str(e),
                    fix=e.fix,
                    backend=self.llama.name,
                )
            elif isinstance(e, NotLoaded):
                # A router's model, unloaded meanwhile: warmed once it is loaded again.
                self.metrics.warmupFailures.labels(prefix=head.label, kind="unloaded").inc()
                log.info(
                    "{backend}: warmup of {prefix} stopped: the router unloaded the model; "
                    "it is warmed once the model is loaded again",
                    prefix=prefix,
                    backend=self.llama.name,
                )
                self.wanted.add(prefix)
                self.unloaded()  # out of placement, and no warmup, until it is loaded again
            elif isinstance(e, Refused):
                # The backend refuses this head (too long for a slot, say):
                # retrying cannot help until the head or the backend changes.
                self.metrics.warmupFailures.labels(prefix=head.label, kind="refused").inc()
                self.cache.noteRefused(head, str(e))
                log.error(
                    "{backend}: warmup of {prefix} refused by the backend: {why}",
                    prefix=prefix,
                    why=str(e),
                    backend=self.llama.name,
                )
            elif not isinstance(e, defer.CancelledError):
                self.metrics.warmupFailures.labels(prefix=head.label, kind="error").inc()
                log.warn(
                    "{backend}: warmup of {prefix} failed: {why}; retrying",
                    prefix=prefix,
                    why=str(e),
                    backend=self.llama.name,
                )
                self._retryLater(prefix)
            return
        self.cache.noteRefused(head, None)
        if state.saveError is not None and self.running:
            # Warm, but with no file: saved again later, backing off, from
            # what llama-server holds (never computed again for it). It is
            # warm meanwhile, not "retrying".
            delay = min(self.retryDelay * 2**state.saveFailures, SAVE_RETRY_LIMIT)
            self._retries = [c for c in self._retries if c.active()]
            self._retries.append(self.clock.callLater(delay, self.queueWarmup, prefix))
        if how is None:
            lease.release(None)  # as it was: a conversation that was not there to save
            return
        lease.release(self.cache.holding(head, self.cache.warmText(head)) if self.backend.pins else UNKNOWN)
        self.metrics.warmups.labels(prefix=head.label, how=how).inc()
        self.metrics.warmupDuration.labels(how=how).observe(self.clock.seconds() - started)
        log.info(
            "{backend}: warmed {prefix} by {how} in {s:.3f} s ({tokens} tokens)",
            prefix=prefix,
            how=how,
            s=self.clock.seconds() - started,
            tokens=state.tokens,
            backend=self.llama.name,
        )

    async def _warm(self, lease: Lease, head: Head, state: WarmState) -> Warmed | None:
        """Make head reachable the way users' requests reach it, and its file exist; returns how (None: it was not)."""
        assert lease.slot is not None
        how: Warmed | None
        if head.kind is Kind.CONVERSATION:
            how = await self._keep(lease, head, state)
            if how is None:
                return None
        elif self.backend.pins:
            how = await self._warmPinned(lease, head, state)
        else:
            slot = await self.cacheIO.claimSlot(lease.slot.id)
            try:
                how = await self._warmUnpinned(slot, head, state)
            finally:
                self.cacheIO.unclaim(slot)
        # Unpinned, the slot's prompt is in llama-server's RAM cache once the next task starts.
        inRam = not self.backend.pins and head.kind is not Kind.CONVERSATION
        self.cache.noteWarmed(head, how, self.clock.seconds(), inRam)
        return how

    async def _warmPinned(self, lease: Lease, head: Head, state: WarmState) -> Warmed:
        """Slots keep their contents: the leased slot is made to hold the head."""
        assert lease.slot is not None
        slot = lease.slot.id
        if lease.warm and self.cache.saved(head):
            return "resident"
        restored = not lease.warm and (
            await self.cacheIO.prepare(slot, head, lease.slot.contents.key, ram=False) == "restored"
        )
        timings, _ = await self._complete(head, state, slot, check=restored)
        trusted = restored and self._verified(head, slot, timings)
        if restored and not trusted:
            await self._complete(head, state, slot)  # the check went one token past the head
        await self.cacheIO.save(slot, head, state.tokens)
        if lease.warm:
            return "resident"
        return "restore" if trusted else "prefill"

    async def _warmUnpinned(self, slot: int, head: Head, state: WarmState) -> Warmed:
        """
        llama-server clears idle slots into its RAM cache: the head is
        restored into an empty slot, or computed, and the next task moves it
        into the RAM cache, where users' unpinned requests find it. The check
        after a restore is unpinned too, to reach it as they do, and so is
        the computation where the head's tokens are known: llama-server then
        takes the RAM-cache entry that shares most with the head (an earlier
        conversation with it, say) into a slot, computes the head from there
        and puts the result back, instead of beside it. (Equally similar
        entries are taken oldest first, so on a model that reuses only up to
        checkpoints an older conversation would keep being chosen over a
        newer warm head, and be reused only 4 + 512 tokens short of its end.)
        The slot it ran on is saved.
        """
        if (
            state.inRam
            and self.cache.atBoundary(head)
            and (self.cache.saved(head) or not self.cache.persists(head))
        ):
            return "resident"
        if self.cache.mayRestore(head) and await self.cacheIO.restore(slot, head):
            if self._verified(head, None, (await self._complete(head, state, None, check=True))[0]):
                return "restore"
        timings, ran = await self._complete(head, state, None if state.boundary is not None else slot)
        slot = ran if ran is not None else slot
        if not await self.cacheIO.save(slot, head, state.tokens) and self.cache.persists(head):
            if state.saveError is None:
                self._retryLater(head.name)  # another task cleared the slot first
        return "prefill"

    async def _keep(self, lease: Lease, head: Head, state: WarmState) -> Warmed | None:
        """
        An idle conversation's file, written from what llama-server holds of
        it, and never computed anew when it holds nothing: that costs what
        its next turn would. On a dense model the slot that answered it is
        saved as it is (with the answer, which any file of a prefix serves);
        on another the file must end at the boundary, so the boundary is
        computed first, from the checkpoint llama-server kept near the end
        of its prompt (a few tokens, or at most one checkpoint's spacing).
        """
        assert lease.slot is not None
        if not state.warm:  # a new process since its last turn: nothing holds it any more
            self._notKept(head, "llama-server restarted since its last turn")
            return None
        slot, prompt, generated = state.served or (None, None, None)
        dense = self.backend.reuse is Reuse.PREFIX
        if self.backend.pins:
            if not self.cache.holds(lease.slot.contents, head):
                self._notKept(head, "its slot was given to another prompt")
                return None
            slot = lease.slot.id
        elif dense and prompt and generated is not None:
            # (Without the answer's length, any longer prompt in another slot would match.)
            slot = await self.cacheIO.slotHolding(prompt, generated)
        if not dense or slot is None:
            timings, ran = await self._complete(head, state, slot)
            slot = ran if ran is not None else slot
            if timings.get("cache_n", 0) < (state.reusable or 0) // 2:
                log.info(
                    "{backend}: {name}: llama-server no longer held it; computed it again",
                    name=head.name,
                    backend=self.llama.name,
                )
        if slot is not None and await self.cacheIO.save(slot, head, None):
            return "saved"
        self._notKept(head, "no slot held it to save")
        return None

    def _notKept(self, head: Head, why: str) -> None:
        log.info(
            "{backend}: conversation {name} not saved: {why}",
            name=head.name,
            why=why,
            backend=self.llama.name,
        )

    async def _complete(
        self, head: Head, state: WarmState, slot: int | None, check: bool = False
    ) -> tuple[dict[str, Any], int | None]:
        """
        The head's warmup request: its boundary tokens, with one token to
        generate, which llama-server samples and never computes, so the slot
        holds the head and nothing after it. check: the head was just
        restored, and this asks whether that worked; it sends one token more
        than the head, since a hybrid model's file serves only a request
        that extends it (the same tokens again would compute all of them),
        and llama-server then keeps a checkpoint at the head's end.
        Where the boundary is not known (a server that cannot tokenize), the
        head as a chat, as before. Returns the answer's timings, and the slot
        it ran on where llama-server says (its /completion answers do).
        """
        await self.cacheIO.quiet()
        if slot is None:
            await self.cacheIO.clearForWarmups()
        if state.boundary is not None:
            prompt = state.boundary + (await self.cacheIO.follower() if check else [])
            body: dict[str, Any] = {"prompt": prompt, "n_predict": 1, "cache_prompt": True}
            if slot is not None:
                body["id_slot"] = slot
            result = await self.llama.complete(body, self.timeout)
        elif head.prompt is not None:
            result = await self.llama.complete(head.warmBody(slot), self.timeout)
        else:
            result = await self.llama.chat(head.warmBody(slot), self.timeout)
        timings: dict[str, Any] = (result or {}).get("timings") or {}
        if not check:
            self.cache.noteWarmupTokens(head, timings.get("cache_n", 0) + timings.get("prompt_n", 0))
        ran = (result or {}).get("id_slot")
        return timings, ran if isinstance(ran, int) and not isinstance(ran, bool) and ran >= 0 else None

    def _verified(self, head: Head, slot: int | None, timings: dict[str, Any]) -> bool:
        """A restore that reported success: did the request right after it reuse it?"""
        if self.cache.learn(head, slot, timings, restored=True) == "hit":
            return True
        self.cache.forgetFile(head)  # the file is no good: write it anew
        return False

    def _retryLater(self, prefix: str) -> None:
        if not self.running:
            return
        self._retries = [c for c in self._retries if c.active()]
        self.retrying.add(prefix)
        self._retries.append(self.clock.callLater(self.retryDelay, self._retry, prefix))

    def _retry(self, prefix: str) -> None:
        self.retrying.discard(prefix)
        self.queueWarmup(prefix)
