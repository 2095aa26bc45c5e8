# -*- test-case-name: tests.unit.test_admin,tests.unit.test_hardening -*-
"""
Backend health polling: what /health reports, and the signal that
llama-server was found, or restarted and lost every slot.

A restart is seen as unreachable-then-reachable, or as /props naming another
model, context size or build, or carrying another per-process media marker.
The proxy also reports the connection failures it meets.
"""

from __future__ import annotations

from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from ..metrics import Metrics
from .llamacpp import BackendError, LlamaClient, NotLoaded, Unauthorized, fingerprint

log = Logger()

# Why a model of llama-server's router does not answer: it is not loaded.
UNLOADED = "the router has not loaded this model (it is warmed again once it is)"


def identity(props: dict[str, Any]) -> tuple[str, Any]:
    """
    What changes when the backend restarts: its fingerprint, and llama-server's
    media marker, which is random per process, so that a restart quicker than
    one poll is still seen.
    """
    return fingerprint(props), props.get("media_marker")


class BackendListener(Protocol):
    def backendReady(self, props: dict[str, Any], restarted: bool) -> None: ...

    def backendLost(self) -> None: ...


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
        self.props: dict[str, Any] | None = None
        self.listeners: list[BackendListener] = []
        self._current: defer.Deferred[None] | None = None
        self._waiting: list[defer.Deferred[None]] = []  # for the check under way (checkNow)
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
        current = self._current = defer.ensureDeferred(self._check())
        current.addBoth(self._checked)
        return current

    def checkNow(self, timeout: float) -> defer.Deferred[None]:
        """
        A check at once, not at the next poll (or the one under way), for
        one who met the backend away or saw what a new process would do:
        fires when it is done, or after timeout seconds, never with an error.
        """
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(waiter)
        waiter.addTimeout(timeout, self.clock, onTimeoutCancel=lambda result, timeout: None)
        if self._current is None and self.running:
            self.check()
        elif not self.running:
            waiter.callback(None)
        return waiter

    def _checked(self, result: object) -> None:
        self._current = None
        waiting, self._waiting = self._waiting, []
        for waiter in waiting:
            if not waiter.called:
                waiter.callback(None)

    async def _check(self) -> None:
        try:
            await self.client.health()
        except defer.CancelledError:
            return
        except NotLoaded:
            self._record(False, UNLOADED)
            return
        except Exception as e:  # noqa: BLE001 - any failure means "not reachable"
            self._record(False, f"{type(e).__name__}: {e}")
            return
        if self.reachable and self.props == {}:
            self._record(True, None)  # not llama-server: nothing more to learn
            return
        try:
            props = await self.client.props()
        except defer.CancelledError:
            return
        except Unauthorized as e:
            problem = f"llama-server refuses bioproxy's own calls ({e}): {e.fix}"
            if self.lastError != problem:
                log.error("{backend}: {problem}", problem=problem, backend=self.client.name)
            self._record(True, problem)
            return
        except BackendError as e:
            # Not llama-server, or an old one: run without its facts.
            log.warn("{backend}: backend has no usable /props: {why}", why=str(e), backend=self.client.name)
            props = {}
        except Exception as e:  # noqa: BLE001 - it went away again
            self._record(False, f"{type(e).__name__}: {e}")
            return
        props = props if isinstance(props, dict) else {}
        if self.reachable and self.props is not None and identity(props) == identity(self.props):
            self._record(True, None)
            return
        self._found(props)

    def _found(self, props: dict[str, Any]) -> None:
        restarted = self.props is not None and (
            identity(props) != identity(self.props)
            # Without a process marker, an outage is all there is to go on.
            or (props.get("media_marker") is None and self.reachable is False)
        )
        if restarted:
            self.metrics.backendRestarts.labels(backend=self.client.name).inc()
            log.info("{backend}: backend restarted; its slots are unknown now", backend=self.client.name)
        self.props = props
        self._record(True, None)
        for listener in self.listeners:
            listener.backendReady(props, restarted)

    @property
    def swappable(self) -> bool:
        """A model of llama-server's router, which unloads and loads it on its own."""
        return self.client.model is not None

    @property
    def unloaded(self) -> bool:
        """A model of llama-server's router, not loaded now."""
        return self.reachable is False and self.lastError == UNLOADED

    async def loadModel(self, timeout: float) -> None:
        """
        Have the router load this backend's model, as the request waiting
        for it would, and wait until it is loaded (up to timeout): the check
        that then finds it tells the listeners of a new process, whose
        probe and restores run before the request does.
        """
        try:
            await self.client.loadModel(timeout)
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - the request goes on; the router loads the model for it
            log.info(
                "{backend}: the router did not load the model: {why}", why=str(e), backend=self.client.name
            )
            return
        await self.checkNow(timeout)

    def noteUnloaded(self) -> None:
        """A call of bioproxy's own found the router's model unloaded: as a poll that finds it so."""
        if self.reachable:
            self._record(False, UNLOADED)

    def noteUnreachable(self, problem: str) -> None:
        """A request could not connect: treat it like a failed poll."""
        if self.reachable:
            self._record(False, problem)

    def _record(self, reachable: bool, problem: str | None) -> None:
        if reachable != self.reachable:
            if reachable:
                log.info("{backend}: backend is reachable", backend=self.client.name)
            elif problem == UNLOADED:
                log.info("{backend}: {problem}", problem=problem, backend=self.client.name)
            else:
                log.warn(
                    "{backend}: backend is unreachable: {problem}", problem=problem, backend=self.client.name
                )
        lost = self.reachable and not reachable
        self.reachable = reachable
        self.lastError = problem
        self.lastChecked = self.clock.seconds()
        self.metrics.backendUp.labels(backend=self.client.name).set(1 if reachable else 0)
        if lost:  # after the state is set: listeners (the router) read it
            for listener in self.listeners:
                listener.backendLost()
