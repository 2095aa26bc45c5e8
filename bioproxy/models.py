# -*- test-case-name: tests.unit.test_models -*-
"""
llama-server's router mode (`--models-dir`, `--models-preset`): one
llama-server that starts a child process per model on demand, routes each
request by its `model`, and unloads the least recently used past
`--models-max`. Each of its models is what one llama-server is to
bioproxy (its own slots, process, cache files and warmups), so each is made
a backend unit of its own (backend.member.build, with the model named in
its spec), reached through the router's URL with the model in every call.
The configured backend itself is only relayed to (backend.process's
ROUTER phase).

ModelWatch reads each router's /v1/models and adds a unit for every model
it has not seen; a model's unit then follows its model alone: its monitor
sees it loaded (a new process, as after a restart: probed, its heads
restored) or not loaded (out of placement; nothing warmed, since bioproxy's
own calls never load a model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from .backend.member import Member
from .config import BackendSpec
from .router import Router

log = Logger()


class ModelWatch(Service):
    def __init__(
        self,
        configured: Sequence[Member],
        build: Callable[[BackendSpec], Member],
        router: Router,
        clock: IReactorTime,
        interval: float,
        joined: Callable[[Member], None] = lambda member: None,
    ) -> None:
        """
        configured: the backends of the configuration, of which any may
        be a router; build: makes a model's unit; joined: told of each
        one made, before the router places anything on it.
        """
        self.setName("models")
        self.configured = list(configured)
        self.build = build
        self.router = router
        self.clock = clock
        self.interval = interval
        self.joined = joined
        self.units: dict[str, Member] = {}  # by name (url#model)
        self._problems: dict[str, str | None] = {}  # the last failure to list each router's models
        self._loop = LoopingCall(self.look)
        self._loop.clock = clock

    def startService(self) -> None:
        super().startService()
        self._loop.start(self.interval, now=True)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()

    def look(self) -> defer.Deferred[None]:
        """Read each router's models once; never fails (a LoopingCall that raises stops)."""
        d = defer.ensureDeferred(self._look())
        d.addErrback(lambda f: log.failure("reading the router's models", f))
        return d

    async def _look(self) -> None:
        for member in self.configured:
            if not member.relays or member.backend.props is None:
                continue
            if member.backend.props.get("role") != "router":
                continue
            try:
                listing = await member.llama.models()
            except defer.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - tried again at the next look
                self._problem(member, str(e))
                continue
            self._problem(member, None)
            for entry in _entries(listing):
                self._found(member.spec, entry)

    def _found(self, router: BackendSpec, entry: dict[str, Any]) -> None:
        model = entry.get("id")
        if not isinstance(model, str) or not model:
            return
        aliases = tuple(a for a in entry.get("aliases") or () if isinstance(a, str))
        spec = dataclasses.replace(router, model=model, aliases=aliases)
        if spec.name in self.units:
            return
        unit = self.units[spec.name] = self.build(spec)
        status = entry.get("status")
        state = status.get("value") if isinstance(status, dict) else None
        log.info(
            "{backend}: a model of llama-server's router, served as a backend of its own ({state})",
            state=state or "status unknown",
            backend=spec.name,
        )
        self.joined(unit)
        self.router.add(unit)

    def _problem(self, member: Member, problem: str | None) -> None:
        """Logged when it changes, never once a poll."""
        if self._problems.get(member.name) == problem:
            return
        self._problems[member.name] = problem
        if problem is not None:
            log.warn(
                "{backend}: cannot list the router's models ({why}); its requests are relayed, "
                "nothing is warmed until it can",
                why=problem,
                backend=member.name,
            )


def _entries(listing: Any) -> list[dict[str, Any]]:
    data = listing.get("data") if isinstance(listing, dict) else None
    return [e for e in data if isinstance(e, dict)] if isinstance(data, list) else []
