"""
Warmups: every template is put into a slot and onto the backend's disk
before a user needs it, at warmup priority so that users never wait for one.

A warmup restores the template's file when there is one and prefills it when
there is not, then sends the template with an empty message and one token to
generate. That request is cheap on a warm slot, makes a cold one warm, and
its `cache_n` tells whether a restore really worked.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from .kvcache import KVCache, WarmState, warmBody
from .llamacpp import BackendError, LlamaClient, fingerprint
from .metrics import Metrics
from .scheduler import UNKNOWN, WARMUP, Lease, SlotScheduler, holding
from .templates import Template, TemplateLibrary

log = Logger()


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

    # -- what starts warmups

    def backendReady(self, props: dict[str, Any], restarted: bool) -> None:
        """The backend was found, or came back; after a restart nothing in its slots is known."""
        first = self.cache.fingerprint is None
        if restarted or first:
            self.scheduler.reset(int(self.slots or props.get("total_slots") or 1))
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
        for job in list(self.jobs.values()):
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
        work = defer.ensureDeferred(self._warm(lease, template, state))
        lease.preempted.addCallback(lambda _: work.cancel())
        try:
            how = await work
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
        restored = (
            not lease.warm and self.cache.mayRestore(template) and await self.cache.restore(slot, template)
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

    def _retryLater(self, prefix: str) -> None:
        if not self.running:
            return
        self._retries = [c for c in self._retries if c.active()]
        self._retries.append(self.clock.callLater(self.retryDelay, self.request, prefix))
