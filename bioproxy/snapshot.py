"""
What bioproxy is doing, as one JSON-able snapshot. Every admin view is a
part of it (/health, /ready, /templates, /slots) or all of it (/status,
which the status page polls), so that each fact is written once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from twisted.internet import task
from twisted.internet.interfaces import IReactorTime

from . import __version__
from .backend import Persistence, Reuse
from .heads import Head, HeadBook, Kind, templateHead
from .kvcache import KVCache, isoTime
from .monitor import BackendMonitor
from .scheduler import SlotScheduler
from .templates import describe
from .warmup import Warmer
from .watcher import TemplateWatcher

if TYPE_CHECKING:
    from .backend.member import Member

LISTED_PER_TURN = 100  # templates listed between two turns of the reactor


class Snapshot:
    def __init__(
        self,
        monitor: BackendMonitor,
        clock: IReactorTime,
        backendURL: str,
        watcher: TemplateWatcher,
        cache: KVCache | None = None,
        warmer: Warmer | None = None,
        book: HeadBook | None = None,
        scheduler: SlotScheduler | None = None,
        recent: Iterable[dict[str, Any]] = (),
        members: Sequence[Member] = (),
    ) -> None:
        self.monitor = monitor
        self.clock = clock
        self.startedAt = clock.seconds()
        self.backendURL = backendURL
        self.watcher = watcher
        self.cache = cache
        self.warmer = warmer
        self.book = book
        self.scheduler = scheduler
        self.recent = recent  # the proxy site's last requests, newest last
        # Every backend, when there are several; the one-backend fields
        # above are the first's.
        self.members = members

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
            "slots": self.slots() if self.scheduler is not None else None,
            "requests": list(self.recent),
        }

    def health(self) -> dict[str, Any]:
        monitors = [(m.name, m.monitor) for m in self.members] or [(self.backendURL, self.monitor)]
        backends = [self._backendHealth(url, monitor) for url, monitor in monitors]
        return {
            # The proxy itself is up whenever it answers; the backends'
            # state is reported beside it rather than failing the check.
            "status": "ok" if all(b["reachable"] for b in backends) else "degraded",
            "uptime_seconds": round(self.clock.seconds() - self.startedAt, 3),
            "version": __version__,
            "backend": backends[0],
            "backends": backends,
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
        warmers = [m.warmer for m in self.members] or ([self.warmer] if self.warmer is not None else [])
        up = [w for w in warmers if w.ready]
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
            if template is not None and self.cache is not None:
                entry.update(self._head(templateHead(template), uses))
                entry["tokens_saved"] = self.cache.tokensSaved.get(prefix, 0)
                if self.book is not None:
                    entry["variants"] = [
                        {"name": h.name, "kind": h.kind.value, **self._head(h, uses)}
                        for h in self.book.variantsOf(prefix)
                    ]
            yield entry

    def _templates(self, entries: list[dict[str, Any]], uses: dict[str, Any]) -> dict[str, Any]:
        learned = []
        if self.book is not None and self.cache is not None:
            learned = [
                {"name": h.name, "kind": h.kind.value, **self._head(h, uses)}
                for h in self.book.learnedHeads()
                if h.kind is Kind.LEARNED  # variants are listed under their templates
            ]
        backend = self.cache.backend.view() if self.cache is not None else None
        return {
            "templates": entries,
            "learned": learned,
            "conversations": self._conversations(),
            "backend": backend,
        }

    def _conversations(self) -> dict[str, Any] | None:
        """The conversations kept for a llama-server restart (no text: their sizes and state)."""
        if self.book is None or self.cache is None:
            return None
        backend = self.cache.backend
        why = None
        if backend.persistence is Persistence.NONE:
            why = "llama-server runs without --slot-save-path: no cache files"
        elif backend.reuse is Reuse.NOTHING:
            why = backend.reuseWhy()
        kept = []
        for entry in reversed(self.book.conversations()):
            head = entry.shell.head(self.book.library)
            assert head is not None and entry.shell.view is not None
            kept.append(
                {
                    "name": head.name,
                    "messages": len(entry.shell.view.messages),
                    "tokens": entry.tokens,  # its prompt tokens, as its last answer counted them
                    "turns": entry.uses,
                    "last_turn_at": isoTime(entry.lastUsed),
                    "file_bytes": entry.bytes,
                    "cache_file": self.cache.filename(head),
                    "warm_state": self.warmer.phase(head).value if self.warmer is not None else None,
                }
            )
        return {
            "kept": len(kept),
            "saved": sum(1 for c in kept if c["file_bytes"]),
            "file_bytes": sum(c["file_bytes"] for c in kept),
            "not_saved_because": why,
            "conversations": kept,
        }

    def _head(self, head: Head, uses: dict[str, Any]) -> dict[str, Any]:
        """A head's cache facts, its warm state, and its uses from the book."""
        assert self.cache is not None
        entry = self.cache.state(head).view(self.cache.backend)
        if self.warmer is not None:
            entry["warm_state"] = self.warmer.phase(head).value
        if len(self.members) > 1:  # the facts above are the first backend's
            entry["backends"] = [
                {"url": m.name, "warm_state": m.warmer.phase(head).value} for m in self.members
            ]
        entry["cache_file"] = self.cache.filename(head)
        if head.kind is not Kind.TEMPLATE:
            entry.update(uses.get(head.name, {}))
        return entry

    def slots(self) -> dict[str, Any]:
        """bioproxy's view of each backend slot, which is what placement decides on."""
        assert self.scheduler is not None
        view = self._slotsOf(self.scheduler)
        view["backends"] = [{"url": m.name, **self._slotsOf(m.scheduler)} for m in self.members]
        return view

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
