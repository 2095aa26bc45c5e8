"""
Backend health polling: what /health reports, and (with the scheduler) the
signal that llama-server restarted and lost every slot.
"""

from __future__ import annotations

from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .llamacpp import LlamaClient
from .metrics import Metrics

log = Logger()


class BackendMonitor(Service):
    """Polls the backend's /health every interval seconds."""

    def __init__(self, client: LlamaClient, clock: IReactorTime, metrics: Metrics, interval: float) -> None:
        self.client = client
        self.clock = clock
        self.metrics = metrics
        self.interval = interval
        self.reachable: bool | None = None  # None: not checked yet
        self.lastChecked: float | None = None
        self.lastError: str | None = None
        self._current: defer.Deferred[None] | None = None
        self._loop = LoopingCall(self.check)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True)

    def stopService(self) -> defer.Deferred[Any] | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        if self._current is not None:
            self._current.cancel()
        return None

    def check(self) -> defer.Deferred[None]:
        """One poll. It never fails: a LoopingCall that raises stops for good."""
        self._current = defer.ensureDeferred(self._check())
        self._current.addBoth(self._checked)
        return self._current

    def _checked(self, result: object) -> None:
        self._current = None

    async def _check(self) -> None:
        try:
            await self.client.health()
        except defer.CancelledError:
            return
        except Exception as e:  # noqa: BLE001 - any failure means "not reachable"
            self._record(False, f"{type(e).__name__}: {e}")
        else:
            self._record(True, None)

    def _record(self, reachable: bool, problem: str | None) -> None:
        if reachable != self.reachable:
            if reachable:
                log.info("backend is reachable")
            else:
                log.warn("backend is unreachable: {problem}", problem=problem)
        self.reachable = reachable
        self.lastError = problem
        self.lastChecked = self.clock.seconds()
        self.metrics.backendUp.set(1 if reachable else 0)
