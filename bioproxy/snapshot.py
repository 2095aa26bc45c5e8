# -*- test-case-name: tests.unit.test_admin -*-
"""
What bioproxy is doing, as one JSON-able snapshot. Every admin view is a
part of it (/health, /ready, /templates, /slots) or all of it (/status,
which the status page polls), so that each fact is written once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from . import __version__
from .backend.kvcache import KVCache, isoTime
from .backend.monitor import BackendMonitor
from .backend.scheduler import SlotScheduler
from .backend.warmup import Warmer
from .heads import Head, HeadBook, Kind, templateHead
from .templates import describe
from .watcher import TemplateWatcher

LISTED_PER_TURN = 100  # templates listed between two turns of the reactor


class Viewed(Protocol):
    """What the snapshot reads of a backend (a Member; in tests, parts of one)."""

    @property
    def name(self) -> str: ...
    @property
    def monitor(self) -> BackendMonitor: ...
    @property
    def cache(self) -> KVCache | None: ...
    @property
    def warmer(self) -> Warmer | None: ...
    @property
    def scheduler(self) -> SlotScheduler | None: ...


@dataclass
class Parts:
    """A backend as a test builds it, without every piece of a Member."""

    name: str
    monitor: BackendMonitor
    cache: KVCache | None = None
    warmer: Warmer | None = None
    scheduler: SlotScheduler | None = None


class Snapshot:
    """
    Every backend alike: each view lists them all, and where one number
    stands for a head (its warm state), it is that of the backend where the
    head is warmest, with the counts summed over all.
    """

    def __init__(
        self,
        clock: IReactorTime,
        watcher: TemplateWatcher,
        backends: Sequence[Viewed],
        book: HeadBook | None = None,
        recent: Iterable[dict[str, Any]] = (),
    ) -> None:
        self.clock = clock
        self.startedAt = clock.seconds()
        self.watcher = watcher
        # Read as it is at each view: a router's models join after start-up.
        self.backends = backends
        self.book = book
        self.recent = recent  # the proxy site's last requests, newest last

    @property
    def warmers(self) -> list[Warmer]:
        return [b.warmer for b in self.backends if b.warmer is not None]

    @property
    def caching(self) -> list[tuple[Viewed, KVCache]]:
        return [(b, b.cache) for b in self._modelled() if b.cache is not None]

    @property
    def slotted(self) -> list[tuple[Viewed, SlotScheduler]]:
        return [(b, b.scheduler) for b in self._modelled() if b.scheduler is not None]

    def _modelled(self) -> Sequence[Viewed]:
        """
        The backends whose slots and heads are bioproxy's to show: not
        llama-server's router itself, whose models are listed instead
        (unless it is all there is).
        """
        modelled = [b for b in self.backends if b.cache is None or not b.cache.backend.passesThrough]
        return modelled or self.backends

    def whole(self) -> dict[str, Any]:
        return self._whole(self.templates())

    async def wholeInTurns(self) -> dict[str, Any]:
        """whole(), its templates listed a slice per reactor turn (templatesInTurns)."""
        return self._whole(await self.templatesInTurns())

    def _whole(self, templates: dict[str, Any]) -> dict[str, Any]:
        return {
            "health": self.health(),
            "ready": self.ready(),
            "templates": templates,
            "slots": self.slots() if self.slotted else None,
            "requests": list(self.recent),
        }

    def health(self) -> dict[str, Any]:
        backends = [self._backendHealth(b.name, b.monitor) for b in self.backends]
        return {
            # The proxy itself is up whenever it answers; the backends'
            # state is reported beside it rather than failing the check.
            "status": "ok" if all(b["reachable"] for b in backends) else "degraded",
            "uptime_seconds": round(self.clock.seconds() - self.startedAt, 3),
            "version": __version__,
            "backends": backends,
            **({"backend": backends[0]} if len(backends) == 1 else {}),  # as before there were several
        }

    def _backendHealth(self, url: str, monitor: BackendMonitor) -> dict[str, Any]:
        now = self.clock.seconds()
        return {
            "url": url,
            "reachable": monitor.reachable,
            "last_checked_ago_seconds": (
                None if monitor.lastChecked is None else round(now - monitor.lastChecked, 3)
            ),
            "last_error": monitor.lastError,
        }

    def ready(self) -> dict[str, Any]:
        """Ready once a backend is probed and every template's warmup has run to an end on every ready one."""
        up = [w for w in self.warmers if w.ready]
        templates = self.watcher.library.templates
        untried = sorted({p for w in up for p in w.untried(templates)})
        backend = bool(up)
        return {"ready": backend and not untried, "backend_ready": backend, "templates_untried": untried}

    def templates(self) -> dict[str, Any]:
        uses = self.book.view() if self.book is not None else {}
        return self._templates(list(self._templateEntries(uses)), uses)

    async def templatesInTurns(self) -> dict[str, Any]:
        """
        templates(), a slice of LISTED_PER_TURN templates per reactor turn:
        with thousands of templates a listing takes tens of milliseconds,
        and the proxy's requests are served between its slices.
        """
        uses = self.book.view() if self.book is not None else {}
        entries = []
        for entry in self._templateEntries(uses):
            entries.append(entry)
            if len(entries) % LISTED_PER_TURN == 0:
                await task.deferLater(self.clock, 0)
        return self._templates(entries, uses)

    def _templateEntries(self, uses: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for prefix, status in sorted(self.watcher.status.items()):
            template = self.watcher.library.templates.get(prefix)
            entry: dict[str, Any] = (
                describe(template) if template else {"prefix": prefix, "path": str(status.path)}
            )
            entry["last_change"] = status.lastChange
            entry["last_change_at"] = isoTime(status.lastChange)
            entry["last_error"] = status.lastError
            if template is not None and self.caching:
                entry.update(self._head(templateHead(template), uses))
                entry["tokens_saved"] = sum(cache.tokensSaved.get(prefix, 0) for _, cache in self.caching)
                if self.book is not None:
                    entry["variants"] = [
                        {"name": h.name, "kind": h.kind.value, **self._head(h, uses)}
                        for h in self.book.variantsOf(prefix)
                    ]
            yield entry

    def _templates(self, entries: list[dict[str, Any]], uses: dict[str, Any]) -> dict[str, Any]:
        learned = []
        if self.book is not None and self.caching:
            learned = [
                {"name": h.name, "kind": h.kind.value, **self._head(h, uses)}
                for h in self.book.learnedHeads()
                if h.kind is Kind.LEARNED  # variants are listed under their templates
            ]
        backends = [{"url": b.name, **cache.backend.view()} for b, cache in self.caching]
        return {
            "templates": entries,
            "learned": learned,
            # Starts seen in requests and not kept warm yet, and why.
            "skipped": self.book.skipped() if self.book is not None else [],
            "conversations": self._conversations(),
            "backends": backends,
            # As before there were several (the status page and scripts of then read it).
            **({"backend": self.caching[0][1].backend.view()} if len(self.caching) == 1 else {}),
        }

    def _conversations(self) -> dict[str, Any] | None:
        """The conversations kept for a llama-server restart (no text: their sizes and state)."""
        if self.book is None or not self.caching:
            return None
        reasons = [cache.backend.noFilesWhy() for _, cache in self.caching]
        kept = []
        for entry in reversed(self.book.conversations()):
            head = entry.shell.head(self.book.library)
            assert head is not None and entry.shell.view is not None
            where = [
                {"url": b.name, "cache_file": cache.filename(head), "warm_state": _phase(b.warmer, head)}
                for b, cache in self.caching
            ]
            kept.append(
                {
                    "name": head.name,
                    "messages": len(entry.shell.view.messages),
                    "tokens": entry.tokens,  # its prompt tokens, as its last answer counted them
                    "turns": entry.uses,
                    "last_turn_at": isoTime(entry.lastUsed),
                    "file_bytes": entry.bytes,
                    **{k: v for k, v in where[self._warmest(head)].items() if k != "url"},
                    "backends": where,
                }
            )
        return {
            "kept": len(kept),
            "saved": sum(1 for c in kept if c["file_bytes"]),
            "file_bytes": sum(c["file_bytes"] for c in kept),
            # Why no backend can serve them from a file, if none can.
            "not_saved_because": "; ".join(sorted({r for r in reasons if r})) if all(reasons) else None,
            "conversations": kept,
        }

    def _warmest(self, head: Head) -> int:
        """The index, among self.caching, of the backend where head is warmest (the first of equals)."""
        warmth = [b.warmer.warmth(head) if b.warmer is not None else 0 for b, _ in self.caching]
        return warmth.index(max(warmth))

    def _head(self, head: Head, uses: dict[str, Any]) -> dict[str, Any]:
        """
        A head's cache facts and warm state where it is warmest, its hits
        and misses over every backend, each backend's own, and its uses
        from the book.
        """
        views = []
        for b, cache in self.caching:
            view = cache.state(head).view(cache.backend)
            view["warm_state"] = _phase(b.warmer, head)
            view["cache_file"] = cache.filename(head)
            views.append({"url": b.name, **view})
        warmest = views[self._warmest(head)]
        entry = {k: v for k, v in warmest.items() if k != "url"}
        entry["warmest_backend"] = warmest["url"]
        entry["hits"], entry["misses"] = sum(v["hits"] for v in views), sum(v["misses"] for v in views)
        checked = entry["hits"] + entry["misses"]
        entry["hit_ratio"] = round(entry["hits"] / checked, 4) if checked else None
        entry["backends"] = views
        if head.kind is not Kind.TEMPLATE:
            entry.update(uses.get(head.name, {}))
            entry["summary"] = head.summary()  # roles and sizes: what the status page names it by
        return entry

    def slots(self) -> dict[str, Any]:
        """bioproxy's view of each backend's slots, which is what placement decides on."""
        backends = [{"url": b.name, **self._slotsOf(scheduler)} for b, scheduler in self.slotted]
        # One backend: also at the top, as before there were several.
        return {"backends": backends, **(self._slotsOf(self.slotted[0][1]) if len(backends) == 1 else {})}

    def _slotsOf(self, scheduler: SlotScheduler) -> dict[str, Any]:
        now = self.clock.seconds()
        slots = []
        for slot in scheduler.slots:
            lease = slot.lease
            slots.append(
                {
                    "id": slot.id,
                    "state": slot.contents.label,
                    "template": slot.contents.key,
                    "busy": lease is not None,
                    "holder": lease.priority if lease is not None else None,
                    "idle_seconds": None
                    if lease is not None or not slot.lastUsed
                    else round(now - slot.lastUsed, 3),
                }
            )
        return {
            "slots": slots,
            "retained": scheduler.retains,
            "waiting": {priority: len(queue) for priority, queue in scheduler.queues.items()},
        }


def _phase(warmer: Warmer | None, head: Head) -> str | None:
    return warmer.phase(head).value if warmer is not None else None
