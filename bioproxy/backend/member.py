"""
One backend behind the router, with every piece that serves it alone: its
API client and monitor, the facts of its process (Backend), its slots
(SlotScheduler), its cache's facts (KVCache), its warmups (Warmer), the
forwarder to its URL and the dispatcher that runs requests on its slots.
The template library, the head book, the metrics and the proxy site are
shared by all members; nothing of one member is written by another.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import BackendSpec
from ..dispatch import Dispatcher
from ..forward import Forwarder
from ..heads import Head
from ..kvcache import KVCache
from ..llamacpp import LlamaClient
from ..monitor import BackendMonitor
from ..scheduler import USER, SlotScheduler
from ..warmup import Phase, Warmer
from .process import Backend

# Phases in which a head costs a request little on a member: held in a slot
# or in llama-server's RAM cache (HOT), or in a file it restores (DISK).
HOT = frozenset({Phase.IN_SLOT, Phase.IN_RAM})
DISK = frozenset({Phase.ON_DISK})


@dataclass(eq=False)
class Member:
    spec: BackendSpec
    llama: LlamaClient
    monitor: BackendMonitor
    scheduler: SlotScheduler
    backend: Backend
    cache: KVCache
    warmer: Warmer
    forwarder: Forwarder
    dispatcher: Dispatcher

    @property
    def name(self) -> str:
        return self.spec.url

    @property
    def healthy(self) -> bool:
        """It answers its health checks (or has not been checked yet: nothing says it is down)."""
        return self.monitor.reachable is not False

    def load(self) -> int:
        """User requests on it: those holding a slot and those waiting for one."""
        busy = sum(1 for s in self.scheduler.slots if s.lease is not None and s.lease.priority == USER)
        return busy + len(self.scheduler.queues[USER])

    def warmth(self, head: Head) -> int:
        """2 where head is in a slot or the RAM cache, 1 where its file is on disk, else 0."""
        phase = self.warmer.phase(head)
        return 2 if phase in HOT else 1 if phase in DISK else 0
