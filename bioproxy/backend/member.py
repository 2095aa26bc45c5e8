# -*- test-case-name: tests.unit.test_router -*-
"""
One backend behind the router, with every piece that serves it alone: its
API client and monitor, the facts of its process (Backend), its slots
(SlotScheduler), its cache's facts (KVCache) and what asks llama-server
about them (CacheIO), its warmups (Warmer), the
forwarder to its URL and the dispatcher that runs requests on its slots.
The template library, the head book, the metrics and the proxy site are
shared by all members; nothing of one member is written by another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime

from ..body import Body
from ..config import BackendSpec, Config
from ..forward import Forwarder, Outcome
from ..heads import Head, HeadBook
from ..metrics import Metrics
from ..serve import ProxyRequest
from .cacheio import CacheIO
from .dispatch import Dispatcher
from .kvcache import KVCache
from .llamacpp import LlamaClient
from .model import ModelFacts
from .monitor import BackendMonitor
from .process import Backend, BackendListener
from .scheduler import USER, SlotScheduler
from .warmup import Warmer


@dataclass(eq=False)
class Member:
    spec: BackendSpec
    llama: LlamaClient
    monitor: BackendMonitor
    scheduler: SlotScheduler
    backend: Backend
    cache: KVCache
    cacheIO: CacheIO
    warmer: Warmer
    forwarder: Forwarder
    dispatcher: Dispatcher

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def model(self) -> str | None:
        """The model of llama-server's router it is (None: a llama-server of its own)."""
        return self.spec.model

    def serves(self, model: str) -> bool:
        """
        A request for model is this backend's: a router's model by its name
        or an alias; a llama-server of its own by its model's alias or
        file name, as its /props says.
        """
        if self.spec.model is not None:
            return model == self.spec.model or model in self.spec.aliases
        props = self.backend.props or {}
        path = str(props.get("model_path") or "")
        stem = path.rsplit("/", 1)[-1]
        return bool(model) and model in (props.get("model_alias"), stem, stem.removesuffix(".gguf"))

    @property
    def healthy(self) -> bool:
        """It answers its health checks (or has not been checked yet: nothing says it is down)."""
        return self.monitor.reachable is not False

    def load(self) -> int:
        """User requests on it: those holding a slot and those waiting for one."""
        busy = sum(1 for s in self.scheduler.slots if s.lease is not None and s.lease.priority == USER)
        return busy + len(self.scheduler.queues[USER])

    def warmth(self, head: Head) -> int:
        """2 where head is in a slot or the RAM cache, 1 where its file is on disk, else 0 (Warmer.warmth)."""
        return self.warmer.warmth(head)

    # -- its face to the router, which sets nothing inside it

    @property
    def weight(self) -> float:
        return self.spec.weight

    def join(
        self, assigned: Callable[[Head], bool], several: Callable[[], bool], listener: BackendListener
    ) -> None:
        """
        Placed among others: it warms the heads assigned says are its own;
        while several says there are several backends, a request that could
        not start here is handed back (BackendGone) rather than answered
        502; listener hears when it comes or goes.
        """
        self.warmer.assigned = assigned
        self.dispatcher.replaceable = several
        self.backend.listeners.append(listener)

    @property
    def relays(self) -> bool:
        """It is llama-server's router itself: its models are backends of their own; it warms nothing."""
        return self.backend.passesThrough

    async def send(self, request: ProxyRequest, body: Body, pinnable: bool = True) -> None:
        """A request that runs on a slot (BackendGone: it had not started when the backend went away)."""
        await self.dispatcher.send(request, body, pinnable)

    def forward(
        self, request: ProxyRequest, body: bytes | None = None, replaceable: bool = False
    ) -> defer.Deferred[Outcome]:
        """Any other request, relayed as it is."""
        return self.forwarder.forward(request, body, replaceable=replaceable)

    def refused(self) -> None:
        """A request could not connect: out of placement until its health check finds it."""
        self.monitor.noteUnreachable("a request could not connect")

    def rewarm(self) -> None:
        """Backends came or went: warm what is now its own."""
        self.warmer.warmAll()

    def handBack(self) -> None:
        """It went away: requests waiting for its slots are placed elsewhere."""
        self.scheduler.failWaiting(self.name)


def build(
    spec: BackendSpec,
    config: Config,
    book: HeadBook,
    metrics: Metrics,
    clock: IReactorTime,
    http: Any,
    forwardAgent: Any,
    retryAgent: Any,
    readModel: Callable[[str], defer.Deferred[ModelFacts]] | None = None,
    name: str = "",
) -> Member:
    """
    One backend's pieces, wired to each other and to the shared head book,
    and to nothing of another backend's: what makeService builds per
    llama-server and the in-memory test harness builds alike. http: the
    treq-like client of bioproxy's own calls; forwardAgent and retryAgent:
    the agents that relay requests (wire.LeanAgent). name: a suffix for the
    member's service names (the first backend's are the plain ones).
    """
    forwarder = Forwarder(
        forwardAgent,
        spec.url,
        clock,
        metrics,
        config.backend_timeout,
        config.backend_idle_timeout,
        config.response_buffer_bytes,
        config.write_stall_timeout,
        retryAgent=retryAgent,
    )
    llama = LlamaClient(http, spec.url, clock, apiKey=spec.api_key, model=spec.model)
    monitor = BackendMonitor(llama, clock, metrics, config.health_check_interval)
    monitor.setName("monitor" + name)
    # Until the backend's /props is read, one slot is the only safe guess.
    scheduler = SlotScheduler(
        clock, spec.slots or 1, metrics, config.max_queue, config.max_queue_wait, backend=spec.name
    )
    backend = Backend(llama, scheduler, spec.slots, config.backend_timeout, readModel=readModel)
    cache = KVCache(backend, metrics)
    cacheIO = CacheIO(cache, metrics, Path(spec.slot_save_path) if spec.slot_save_path else None)
    backend.onNewProcess.append(cache.forgetProcess)
    backend.onNewProcess.append(cacheIO.forgetProcess)
    warmer = Warmer(
        book,
        scheduler,
        cache,
        cacheIO,
        backend,
        clock,
        metrics,
        config.backend_timeout,
        conversationIdle=config.conversation_idle,
        unloaded=monitor.noteUnloaded,
    )
    warmer.setName("warmup" + name)
    monitor.listeners.append(backend)
    backend.listeners.append(warmer)
    book.dropped.append(cacheIO.forget)
    book.dropped.append(warmer.forget)
    cache.onSaved.append(book.savedBytes)
    dispatcher = Dispatcher(scheduler, cache, cacheIO, forwarder, warmer, monitor, backend, book)
    return Member(spec, llama, monitor, scheduler, backend, cache, cacheIO, warmer, forwarder, dispatcher)
