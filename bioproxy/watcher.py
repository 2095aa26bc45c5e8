# -*- test-case-name: tests.unit.test_watcher -*-
"""
Template change polling: a cheap stat of every template and include each
interval; a file is re-read and hashed (off the reactor thread) only when its
stat changed. The last good version of a template stays in use when its file
breaks or disappears.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from . import templates
from .metrics import Metrics
from .templates import Sources, Template, TemplateError, TemplateLibrary

log = Logger()

# Runs a blocking callable somewhere that is not the reactor thread.
RunInThread = Callable[..., "defer.Deferred[Any]"]
Listener = Callable[[Template], None]


@dataclasses.dataclass
class Status:
    path: Path
    lastChange: float | None = None
    lastError: str | None = None


class TemplateWatcher(Service):
    def __init__(
        self,
        library: TemplateLibrary,
        prefixes: Mapping[str, str],
        sources: Sources,
        clock: IReactorTime,
        interval: float,
        metrics: Metrics,
        runInThread: RunInThread,
        maxBytes: int = templates.MiB * 4,
    ) -> None:
        self.library = library
        self.sources = sources
        self.clock = clock
        self.interval = interval
        self.metrics = metrics
        self.runInThread = runInThread
        self.maxBytes = maxBytes
        self.status: dict[str, Status] = {}
        self.listeners: list[Listener] = []
        self._loop = LoopingCall(self.poll)
        self._loop.clock = clock
        self._configure(prefixes)

    def _configure(self, prefixes: Mapping[str, str]) -> None:
        status = {}
        for prefix, raw in prefixes.items():
            path = self.sources.templatePath(raw)
            known = self.status.get(prefix)
            # A prefix pointed at another file is a new status: the next poll
            # loads that file (the old version serves until it has).
            status[prefix] = known if known is not None and known.path == path else Status(path)
        self.status = status
        for old in set(self.library.templates) - set(prefixes):
            self.library.remove(old)
            self.metrics.templateSize.remove(old)

    def loadAll(self) -> None:
        """Load every template now, blocking; at start-up, any failure is fatal."""
        for prefix, status in self.status.items():
            self._accept(templates.load(prefix, status.path, self.sources, self.maxBytes))

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def poll(self) -> defer.Deferred[None]:
        """One check of every template. Never fails: a LoopingCall that raises stops."""
        return self._check(everything=False)

    def _check(self, everything: bool) -> defer.Deferred[None]:
        work = []
        for prefix, status in self.status.items():
            current = self.library.templates.get(prefix)
            if everything or current is None or current.path != status.path or current.changedOnDisk():
                work.append(self._reload(prefix, status))
        return defer.gatherResults(work).addCallback(lambda _: None)

    def reload(self, prefixes: Mapping[str, str], sources: Sources) -> defer.Deferred[None]:
        """
        Take a new prefix map (SIGHUP): drop, add and re-check templates.
        When the roots changed, every template is read again, since an
        include that was allowed may not be any more.
        """
        before = set(self.status)
        rooted = sources.roots != self.sources.roots
        self.sources = sources
        self._configure(prefixes)
        after = set(self.status)
        if before != after:
            log.info(
                "templates now {prefixes} (added {added}, removed {removed})",
                prefixes=sorted(after),
                added=sorted(after - before),
                removed=sorted(before - after),
            )
        return self._check(everything=rooted)

    def _reload(self, prefix: str, status: Status) -> defer.Deferred[None]:
        d = self.runInThread(templates.load, prefix, status.path, self.sources, self.maxBytes)
        d.addCallbacks(self._accept, self._failed, errbackArgs=(prefix, status))
        d.addErrback(lambda f: log.failure("template reload of {prefix} failed", f, prefix=prefix))
        return d

    def _accept(self, template: Template) -> None:
        status = self.status.get(template.prefix)
        if status is None:  # removed while it was loading
            return
        current = self.library.templates.get(template.prefix)
        if status.lastError is not None:
            log.info("template {prefix} is usable again", prefix=template.prefix)
        status.lastError = None
        self.library.put(template)
        self.metrics.templateSize.labels(prefix=template.prefix).set(template.size)
        if current is None or current.hash != template.hash:
            status.lastChange = self.clock.seconds()
            if current is not None:
                log.info(
                    "template {prefix} changed ({size} bytes)", prefix=template.prefix, size=template.size
                )
            for listener in self.listeners:
                listener(template)

    def _failed(self, failure: Any, prefix: str, status: Status) -> None:
        failure.trap(TemplateError)
        error: TemplateError = failure.value
        if str(error) != status.lastError:
            kept = (
                "keeping the last good version" if prefix in self.library.templates else "no good version yet"
            )
            log.warn("template {prefix}: {error}; {kept}", prefix=prefix, error=str(error), kept=kept)
            self.metrics.templateErrors.labels(prefix=prefix, kind=error.kind).inc()
        status.lastError = str(error)
        current = self.library.templates.get(prefix)
        if error.kind == "confined" and current is not None:
            # No last good version across a boundary: what it included is no
            # longer allowed, so it is not served either.
            log.warn("template {prefix} withdrawn: it includes a file outside the roots", prefix=prefix)
            self.library.remove(prefix)
