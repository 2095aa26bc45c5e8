"""
One llama-server and what bioproxy knows of its process: the client for its
API, its fingerprint and slot count, whether its slots keep their contents
between tasks, whether it can save slots to disk, and whether its RAM prompt
cache takes back what a slot gives up.

These are learnt from the running server, never from flags a user must
repeat: llama-server's `/props` says none of them, and a later build may
behave otherwise. So each backend process is probed once, with a few short
completions, before any warmup runs; until then requests are not pinned,
which leaves every choice to llama-server and is never worse than it alone.
"""

from __future__ import annotations

import enum
import secrets
from collections.abc import Callable
from typing import Any, Protocol

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from ..llamacpp import BackendError, LlamaClient, NoPersistence, fingerprint
from ..scheduler import UNKNOWN, WARMUP, Lease, SlotScheduler, yielding

log = Logger()

# A probe's completion reused the slot when cache_n reaches this share.
PROBE_HIT_SHARE = 0.9
_PROBE_FILE = "bioproxy-probe-absent.bin"
PROBE_MARK = "bioproxy probe"  # in both of the probe's prompts, so that tests can tell them apart


class SlotMode(enum.Enum):
    """What a slot's KV cache does while other slots run tasks."""

    UNKNOWN = "unknown"  # not probed yet: pin nothing
    # It keeps what it computed (`-np N`, `--no-cache-idle-slots`, `--cache-ram 0`):
    # a request pinned to it reuses that, so bioproxy places and pins.
    RETAINED = "retained"
    # llama-server's default (auto slots, unified KV, idle slots cached): every
    # new task moves the idle slots into the RAM prompt cache and clears them,
    # and a request pinned to a cleared slot does not look there. Requests go
    # unpinned and llama-server finds their prefix in its RAM cache.
    CLEARED = "cleared"


class Persistence(enum.Enum):
    UNKNOWN = "unknown"
    FILES = "files"  # --slot-save-path: slots can be saved and restored
    NONE = "none"  # slot actions answer 501: warm by prefill only


class BackendListener(Protocol):
    def backendReady(self) -> None: ...

    def backendLost(self) -> None: ...


class Backend:
    """Owns one backend's per-process facts; the monitor tells it when the process changes."""

    def __init__(
        self, llama: LlamaClient, scheduler: SlotScheduler, configuredSlots: int | None, timeout: float
    ) -> None:
        self.llama = llama
        self.scheduler = scheduler
        self.configuredSlots = configuredSlots
        self.timeout = timeout
        self.props: dict[str, Any] | None = None
        self.fingerprint: str | None = None  # None until /props is read
        self.mode = SlotMode.UNKNOWN
        self.persistence = Persistence.UNKNOWN
        # Whether the RAM prompt cache gives back a prompt that a slot gave up;
        # None until probed. Always so in CLEARED mode, which relies on it.
        self.ramCache: bool | None = None
        self.ready = False  # probed, and warmups may run
        self.saved: set[str] = set()  # cache files known to be on the backend's disk
        self.missing: set[str] = set()  # and known not to be
        self.listeners: list[BackendListener] = []
        self.onNewProcess: list[Callable[[], None]] = []  # nothing it held is there any more
        self._probe: defer.Deferred[None] | None = None
        self._retry: Any = None
        self._stopped = False

    @property
    def pins(self) -> bool:
        """Whether user requests are pinned to the slot bioproxy chose."""
        return self.mode is SlotMode.RETAINED

    @property
    def slotCount(self) -> int:
        return len(self.scheduler.slots)

    # -- what the monitor says

    def backendReady(self, props: dict[str, Any], restarted: bool) -> None:
        """The backend was found, or came back: a new process, to be probed again."""
        first = self.props is None
        self.props = props
        if restarted or first:
            self._cancelProbe()
            self.ready = False
            self.mode, self.ramCache = SlotMode.UNKNOWN, None
            self.persistence = Persistence.UNKNOWN  # it may have been started with other flags
            self.scheduler.reset(int(self.configuredSlots or props.get("total_slots") or 1))
            for forget in self.onNewProcess:
                forget()
        if not props:
            log.warn("the backend has no /props, so it is not llama-server: no warmups or cache files")
            self.fingerprint, self.ready = None, False
            return
        self.fingerprint = fingerprint(props)
        if self.mode is SlotMode.UNKNOWN:
            if self._probe is None:
                self._startProbe()
        elif not self.ready:
            self._becomeReady()  # the same process, back after a blip: what it is like is known

    def backendLost(self) -> None:
        """It stopped answering: drop every call of bioproxy's own at once, so a shutdown never waits on one."""
        self.ready = False
        self._cancelProbe()
        for listener in self.listeners:
            listener.backendLost()

    def stop(self) -> None:
        self._stopped = True
        self._cancelProbe()

    # -- what the cache learns

    def noPersistence(self, why: str) -> None:
        if self.persistence is not Persistence.NONE:
            log.warn(
                "llama-server cannot save or restore slots ({why}): templates are warmed by prefill "
                "and kept only in its slots and RAM cache; start it with --slot-save-path DIR "
                "to keep them across restarts",
                why=why,
            )
        self.persistence = Persistence.NONE

    def view(self) -> dict[str, Any]:
        return {
            "slots": self.slotCount,
            "slot_mode": self.mode.value,
            "pinned": self.pins,
            "persistence": self.persistence.value,
            "ram_cache": self.ramCache,
            "fingerprint": self.fingerprint,
        }

    # -- the probe

    def _startProbe(self) -> None:
        if self._stopped:
            return
        self._probe = defer.ensureDeferred(self._probeProcess())
        self._probe.addBoth(self._probeEnded)

    def _cancelProbe(self) -> None:
        if self._retry is not None and self._retry.active():
            self._retry.cancel()
        self._retry = None
        if self._probe is not None:
            self._probe.cancel()

    def _probeEnded(self, result: object) -> None:
        self._probe = None
        if isinstance(result, Failure):
            if result.check(defer.CancelledError):
                return  # the process went away; a new one is probed when it is found
            if self._stopped:
                return
            delay = 0.0
            if not result.check(_Preempted):
                delay = 1.0
                log.warn("probing the backend failed: {why}; retrying", why=result.getErrorMessage())
            clock: Any = self.scheduler.clock
            self._retry = clock.callLater(delay, self._startProbe)
            return
        self._becomeReady()

    def _becomeReady(self) -> None:
        self.ready = True
        log.info(
            "backend has {count} slot(s), fingerprint {fp}; slots {mode}, requests {pinned}, "
            "slot persistence {files}, RAM cache {ram}",
            count=self.slotCount,
            fp=self.fingerprint,
            mode=self.mode.value,
            pinned="pinned" if self.pins else "left to llama-server",
            files=self.persistence.value,
            ram=self.ramCache,
        )
        for listener in self.listeners:
            listener.backendReady()

    async def _probeProcess(self) -> None:
        """
        Pinned one-token completions of two unrelated prompts P and Q, P on
        slot 0 and Q on slot 1, then P on slot 0 again: its cache_n says
        whether slot 0 kept P while slot 1 worked. Where it did, Q and then
        P on slot 0 say whether P came back from the RAM cache. A restore of
        a file that is not there says whether slot files work at all.
        """
        leases: list[Lease] = []
        try:
            for slot in range(min(2, self.slotCount)):
                leases.append(await self.scheduler.lease(None, WARMUP, pin=slot))
            mode, ram = await yielding(leases, self._measure(len(leases)))
        except Exception:
            if any(lease.preempted.called for lease in leases):
                raise _Preempted() from None
            raise
        finally:
            for lease in leases:
                lease.release(UNKNOWN)
        self.mode, self.ramCache = mode, ram
        self.scheduler.reset(self.slotCount, retains=mode is SlotMode.RETAINED)

    async def _measure(self, slots: int) -> tuple[SlotMode, bool]:
        await self._probePersistence()
        nonce = secrets.token_hex(4)
        p = f"{PROBE_MARK} {nonce}: " + " ".join(f"p{i}" for i in range(80))
        q = f"{nonce} unrelated: " + " ".join(f"q{i}" for i in range(80)) + f" ({PROBE_MARK})"
        size = sum(await self._complete(p, 0))
        if slots > 1:
            await self._complete(q, 1)
            kept = (await self._complete(p, 0))[0] >= PROBE_HIT_SHARE * (size - 1)
            if not kept:
                return SlotMode.CLEARED, True
        await self._complete(q, 0)
        back = (await self._complete(p, 0))[0] >= PROBE_HIT_SHARE * (size - 1)
        return SlotMode.RETAINED, back

    async def _complete(self, prompt: str, slot: int) -> tuple[int, int]:
        body = {"prompt": prompt, "n_predict": 1, "id_slot": slot, "cache_prompt": True}
        result = await self.llama.complete(body, self.timeout)
        timings = (result or {}).get("timings") or {}
        return int(timings.get("cache_n", 0)), int(timings.get("prompt_n", 0))

    async def _probePersistence(self) -> None:
        try:
            await self.llama.restore(0, _PROBE_FILE)
        except NoPersistence as e:
            self.noPersistence(str(e))
            return
        except BackendError:
            pass  # the file is absent, as it should be: slot files work
        self.persistence = Persistence.FILES


class _Preempted(Exception):
    """A user took a slot the probe held; it runs again once the slot is free."""
