"""
Warmups: every template is put into a slot and onto the backend's disk
before a user needs it, at warmup priority so that users never wait for one.

A warmup restores the template's file when there is one and prefills it when
there is not, then sends the template with an empty message and one token to
generate. That request is cheap on a warm slot, makes a cold one warm, and
its `cache_n` tells whether a restore really worked.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeVar

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .kvcache import HIT_SHARE, KVCache, WarmState, warmBody
from .llamacpp import BackendError, LlamaClient, fingerprint
from .metrics import Metrics
from .scheduler import UNKNOWN, WARMUP, Lease, SlotScheduler, holding
from .templates import Template, TemplateLibrary

log = Logger()
_T = TypeVar("_T")


class Warmer(Service):
    def __init__(
        self,
        library: TemplateLibrary,
        scheduler: SlotScheduler,
        cache: KVCache,
        llama: LlamaClient,
        clock: IReactorTime,
        metrics: Metrics,
        timeout: float,
        slots: int | None = None,
        retryDelay: float = 5.0,
    ) -> None:
        self.library = library
        self.scheduler = scheduler
        self.cache = cache
        self.llama = llama
        self.clock = clock
        self.metrics = metrics
        self.timeout = timeout
        self.slots = slots  # configured count; None means the backend's
        self.retryDelay = retryDelay
        self.ready = False  # the backend is up and its slots are known
        self.wanted: set[str] = set()
        self.jobs: dict[str, defer.Deferred[None]] = {}
        self._retries: list[IDelayedCall] = []
        self._probe: defer.Deferred[None] | None = None
        self._probed = False  # this backend process was probed, or could not be

    # -- what starts warmups

    def backendReady(self, props: dict[str, Any], restarted: bool) -> None:
        """The backend was found, or came back; after a restart nothing in its slots is known."""
        first = self.cache.fingerprint is None
        if restarted or first:
            self.scheduler.reset(int(self.slots or props.get("total_slots") or 1))
            for state in self.cache.states.values():
                state.warm = state.inRam = False
            self.cache.ramCache = None
            self._probed = False
        if not props:
            log.warn("the backend has no /props, so it is not llama-server: no warmups or cache files")
            self.ready, self.cache.fingerprint = False, None
            return
        self.cache.fingerprint = fingerprint(props)
        self.ready = True
        log.info(
            "backend has {count} slot(s), fingerprint {fp}; warming {n} template(s)",
            count=len(self.scheduler.slots),
            fp=self.cache.fingerprint,
            n=len(self.library.templates),
        )
        self.warmAll()

    def backendLost(self) -> None:
        self.ready = False

    def templateChanged(self, template: Template) -> None:
        self.request(template.prefix)

    def warmAll(self) -> None:
        for prefix in self.library.templates:
            self.request(prefix)

    def request(self, prefix: str, force: bool = False) -> bool:
        """Queue a warmup of prefix; force also writes its file again."""
        template = self.library.templates.get(prefix)
        if template is None:
            return False
        if force:
            name = self.cache.filename(template)
            self.cache.saved.discard(name or "")
        self.wanted.add(prefix)
        self._kick()
        return True

    # -- service

    def startService(self) -> None:
        super().startService()
        self._kick()

    def stopService(self) -> None:
        super().stopService()
        for call in self._retries:
            if call.active():
                call.cancel()
        for job in [*self.jobs.values(), *([self._probe] if self._probe else [])]:
            job.cancel()

    # -- running them

    def _kick(self) -> None:
        if not self.running or not self.ready:
            return
        for prefix in sorted(self.wanted - set(self.jobs)):
            self.wanted.discard(prefix)
            job = defer.ensureDeferred(self._run(prefix))
            self.jobs[prefix] = job
            job.addBoth(self._ended, prefix)
        if not self.jobs and not self.wanted and not self._probed and self._probe is None:
            self._probe = defer.ensureDeferred(self._probeRam())
            self._probe.addBoth(self._probeEnded)

    def _probeEnded(self, result: object) -> None:
        self._probe = None
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            log.failure("RAM cache probe failed unexpectedly", result)
            self._probed = True

    def _ended(self, result: object, prefix: str) -> None:
        del self.jobs[prefix]
        if isinstance(result, Failure) and not result.check(defer.CancelledError):
            log.failure("warmup of {prefix} failed unexpectedly", result, prefix=prefix)
        self._kick()

    async def _run(self, prefix: str) -> None:
        template = self.library.templates.get(prefix)
        if template is None:
            return
        state = self.cache.state(template)
        if state.reusable is None:
            state.reusable = await self.cache.measure(template)
        lease = await self.scheduler.lease(template.key, WARMUP)
        started = self.clock.seconds()
        try:
            how = await _yielding(lease, self._warm(lease, template, state))
        except Exception as e:  # noqa: BLE001 - a failed warmup is retried, never fatal
            lease.release(UNKNOWN)
            # A cancelled request surfaces as the HTTP client's own failure,
            # so the lease, not the exception, says whether a user took over.
            if lease.preempted.called:
                self.metrics.warmupCancellations.labels(prefix=prefix).inc()
                log.info("warmup of {prefix} gave its slot to a user request", prefix=prefix)
                self.wanted.add(prefix)
            elif isinstance(e, BackendError) and 400 <= e.status < 500:
                # The backend refuses this template (too long for a slot, say):
                # retrying cannot help until the template or the backend changes.
                state.error = str(e)
                log.error("warmup of {prefix} refused by the backend: {why}", prefix=prefix, why=str(e))
            elif not isinstance(e, defer.CancelledError):
                log.warn("warmup of {prefix} failed: {why}; retrying", prefix=prefix, why=str(e))
                self._retryLater(prefix)
            return
        state.error = None
        lease.release(holding(template.key))
        self.metrics.warmups.labels(prefix=prefix, how=how).inc()
        self.metrics.warmupDuration.labels(how=how).observe(self.clock.seconds() - started)
        log.info(
            "warmed {prefix} by {how} in {s:.3f} s ({tokens} tokens)",
            prefix=prefix,
            how=how,
            s=self.clock.seconds() - started,
            tokens=state.tokens,
        )

    async def _warm(self, lease: Lease, template: Template, state: WarmState) -> str:
        """Make lease's slot hold template and its file exist; returns how it was done."""
        assert lease.slot is not None
        slot = lease.slot.id
        if lease.warm and self.cache.filename(template) in self.cache.saved:
            return "resident"
        restored = not lease.warm and (
            await self.cache.prepare(slot, template, lease.slot.contents.key, ram=False) == "restored"
        )
        result = await self.llama.chat(warmBody(template, slot), self.timeout)
        timings = (result or {}).get("timings") or {}
        state.tokens = (timings.get("cache_n", 0) + timings.get("prompt_n", 0)) or state.tokens
        trusted = restored and self.cache.learn(template, slot, timings, restored=True)
        await self.cache.save(slot, template)
        state.warm = True
        state.lastWarmup = self.clock.seconds()
        if lease.warm:
            return "resident"
        return "restore" if trusted else "prefill"

    async def _probeRam(self) -> None:
        """
        Does llama-server's RAM prompt cache keep a template that a slot gives
        up? Then, while that server lives, a restore from disk is wasted time.
        Asked once per backend process: a slot holding a template runs a
        one-token prompt, then the template again, and cache_n answers.
        """
        resident = [
            t
            for t in self.library.templates.values()
            if self.scheduler.holders(t.key) and self.cache.state(t).reusable
        ]
        if not resident:
            self._probed = True
            return
        template = resident[0]
        lease = await self.scheduler.lease(template.key, WARMUP)
        assert lease.slot is not None
        if not lease.warm:
            lease.release()  # it moved; ask at the next warmup round
            return
        try:
            reused = await _yielding(lease, self._displaceAndReturn(lease.slot.id, template))
        except Exception as e:  # noqa: BLE001 - asked again at the next warmup round
            lease.release(UNKNOWN)
            if not lease.preempted.called:
                log.warn("RAM cache probe failed: {why}", why=str(e))
            return
        lease.release(holding(template.key))
        self.cache.ramCache = reused >= HIT_SHARE * (self.cache.state(template).reusable or 0)
        self.cache.state(template).inRam = self.cache.ramCache
        self._probed = True
        log.info(
            "llama-server's RAM prompt cache {does} keep templates a slot gives up",
            does="does" if self.cache.ramCache else "does not",
        )

    async def _displaceAndReturn(self, slot: int, template: Template) -> int:
        await self.cache.displace(slot)
        result = await self.llama.chat(warmBody(template, slot), self.timeout)
        reused: int = ((result or {}).get("timings") or {}).get("cache_n", 0)
        return reused

    def _retryLater(self, prefix: str) -> None:
        if not self.running:
            return
        self._retries = [c for c in self._retries if c.active()]
        self._retries.append(self.clock.callLater(self.retryDelay, self.request, prefix))


async def _yielding(lease: Lease, work: Coroutine[Any, Any, _T]) -> _T:
    """Run work for lease; a user who needs the slot cancels it at once."""
    running = defer.ensureDeferred(work)
    lease.preempted.addCallback(lambda _: running.cancel())
    return await running
