"""
A request that uses a slot: it waits for a lease, lands on the slot that
holds its template (restoring the template's file there if none does), goes
to the backend pinned with `id_slot`, and teaches the cache what happened.
"""

from __future__ import annotations

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from .errors import writeError
from .expand import Body
from .forward import Forwarder, Outcome
from .kvcache import KVCache
from .monitor import BackendMonitor
from .scheduler import (
    EMPTY,
    KEEP,
    UNKNOWN,
    USER,
    BadSlot,
    Contents,
    Lease,
    Overloaded,
    SlotScheduler,
    holding,
)
from .templates import Template
from .timings import TimingsReader
from .warmup import Warmer

log = Logger()


class Dispatcher:
    def __init__(
        self,
        scheduler: SlotScheduler,
        cache: KVCache,
        forwarder: Forwarder,
        warmer: Warmer,
        monitor: BackendMonitor,
    ) -> None:
        self.scheduler = scheduler
        self.cache = cache
        self.forwarder = forwarder
        self.warmer = warmer
        self.monitor = monitor

    async def send(self, request: Request, body: Body, template: Template | None, prefix: str) -> None:
        """
        Forward body on a leased slot. template is the one the prompt starts
        with, whose cache the slot can reuse; prefix labels the metrics.
        """
        pin = body.parsed.get("id_slot")
        pin = pin if isinstance(pin, int) and not isinstance(pin, bool) and pin >= 0 else None
        asking = self.scheduler.lease(template.key if template else body.affinity, USER, pin)
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
        contents = UNKNOWN
        try:
            contents = await self._run(request, lease, body, template, prefix, gone)
        finally:
            lease.release(contents)

    async def _run(
        self,
        request: Request,
        lease: Lease,
        body: Body,
        template: Template | None,
        prefix: str,
        gone: list[Failure],
    ) -> Contents:
        assert lease.slot is not None
        slot = lease.slot.id
        held = lease.slot.contents.key
        how = "warm"
        if template is None:
            self.cache.displaced(held)
        elif not lease.warm:
            how = await self.cache.prepare(slot, template, held, ram=True)
            if how == "failed":
                self.warmer.request(template.prefix)
        if gone:
            if how == "restored" and template:
                return holding(template.key)
            return EMPTY if how == "failed" else KEEP  # a failed restore leaves the slot empty
        reader = TimingsReader()
        outcome = await self.forwarder.forward(request, body.pinned(slot), reader.feed)
        return self._learn(outcome, reader, template, prefix, slot, how, body.affinity)

    def _learn(
        self,
        outcome: Outcome,
        reader: TimingsReader,
        template: Template | None,
        prefix: str,
        slot: int,
        how: str,
        affinity: str | None,
    ) -> Contents:
        """What the slot holds now, from how the exchange ended and its timings."""
        if outcome.error == "connect":
            self.monitor.noteUnreachable("a request could not connect")
        if not outcome.complete or outcome.status is None or outcome.status >= 500:
            return UNKNOWN
        if outcome.status >= 400:
            return KEEP  # llama-server refuses before it touches the slot
        timings = reader.timings
        if timings is not None:
            self.cache.count(prefix, timings)
        if template is None:
            return Contents("other", affinity)
        if timings is not None and not self.cache.learn(
            template, slot, timings, how == "restored", how == "ram"
        ):
            self.warmer.request(template.prefix)
        # Whatever the reuse was, the slot has just computed the template.
        return holding(template.key)
