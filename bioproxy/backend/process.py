# -*- test-case-name: tests.unit.test_process -*-
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

import dataclasses
import enum
import hashlib
import secrets
from collections.abc import Callable
from typing import Any, Protocol

from automat import TypeMachineBuilder
from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from .llamacpp import BackendError, LlamaClient, NoPersistence, fingerprint
from .model import ModelFacts, Reuse
from .scheduler import UNKNOWN, WARMUP, Lease, SlotScheduler, yielding

log = Logger()

# A probe's completion reused the slot when cache_n reaches this share.
PROBE_HIT_SHARE = 0.9
# The longest wait between probes that keep failing (1, 2, 4 ... seconds until then).
PROBE_BACKOFF_MAX = 60.0
_PROBE_FILE = "bioproxy-probe-absent.bin"
# Where the restore probe saves its slot: one small file per backend URL
# (backends may share a directory, and be probed at once), written over by each probe.
_REUSE_FILE = "bioproxy-probe-reuse-{}.bin"
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


class Phase(enum.Enum):
    """Where bioproxy stands with a backend's process (Backend.phase)."""

    UNKNOWN = "unknown"  # never found
    PROBING = "probing"  # found; its probe runs, or waits to run again
    READY = "ready"  # probed: warmups run, requests are placed by what it is
    LOST = "lost"  # it stopped answering
    FOREIGN = "not llama-server"  # it answers, with no /props: requests pass through, nothing is warmed
    ROUTER = "router"  # llama-server's router (several models): each model is a backend of its own
    STOPPED = "stopped"  # bioproxy is stopping


class BackendListener(Protocol):
    def backendReady(self) -> None: ...

    def backendLost(self) -> None: ...


class Backend:
    """Owns one backend's per-process facts; the monitor tells it when the process changes."""

    def __init__(
        self,
        llama: LlamaClient,
        scheduler: SlotScheduler,
        configuredSlots: int | None,
        timeout: float,
        readModel: Callable[[str], defer.Deferred[ModelFacts]] | None = None,
    ) -> None:
        """readModel: reads a model file's facts off the reactor thread; None where bioproxy never can."""
        self.llama = llama
        self.readModel = readModel
        self.scheduler = scheduler
        self.configuredSlots = configuredSlots
        self.timeout = timeout
        self.props: dict[str, Any] | None = None
        self.fingerprint: str | None = None  # None until the process is probed
        self.mode = SlotMode.UNKNOWN
        self.persistence = Persistence.UNKNOWN
        # Whether the RAM prompt cache gives back a prompt that a slot gave up;
        # None until probed. Always so in CLEARED mode, which relies on it.
        self.ramCache: bool | None = None
        # What a restored slot file gives on this process: from its model's
        # metadata (when bioproxy can read the file) and the restore probe.
        self.reuse = Reuse.UNKNOWN
        self.model: ModelFacts | None = None
        self.missing: set[str] = set()  # and known not to be
        self.listeners: list[BackendListener] = []
        self.onNewProcess: list[Callable[[], None]] = []  # nothing it held is there any more
        self._probe: defer.Deferred[None] | None = None
        self._probing: list[defer.Deferred[None]] = []  # waiting for the probe to end (probed)
        self._retry: Any = None
        self._phase = Phase.UNKNOWN
        # Probes failed in a row, and the last one's reason: retried with a
        # backoff, and logged when the reason changes, never once a second.
        self._probeFailures = 0
        self._probeError: str | None = None
        self._reuseProbeError: str | None = None
        # A router's model: the facts of each kind of process probed (_probeProcess).
        self._probedBefore: dict[tuple[str, int], _Probed] = {}
        self._machine = _processMachine(self)

    @property
    def name(self) -> str:
        """Its URL, as log lines and views name it."""
        return self.llama.name

    @property
    def phase(self) -> Phase:
        """Where it stands; written by its machine's outputs alone."""
        return self._phase

    @property
    def ready(self) -> bool:
        """Probed: warmups may run, and requests are placed by what it is."""
        return self._phase is Phase.READY

    @property
    def pins(self) -> bool:
        """Whether user requests are pinned to the slot bioproxy chose."""
        return self.mode is SlotMode.RETAINED

    def probed(self, timeout: float) -> defer.Deferred[None]:
        """
        Fires once the process is probed (and its fingerprint known), or after
        timeout seconds, never with an error: a request that comes in a new
        process's first moments waits for it, to restore its head from its
        file instead of computing it.
        """
        waiter: defer.Deferred[None] = defer.Deferred()
        if self._phase is not Phase.PROBING or self._probeFailures:
            waiter.callback(None)  # nothing to wait for, or a probe that keeps failing
            return waiter
        self._probing.append(waiter)
        clock: Any = self.scheduler.clock
        waiter.addTimeout(timeout, clock, onTimeoutCancel=lambda result, timeout: None)
        return waiter

    def _wake(self) -> None:
        waiting, self._probing = self._probing, []
        for waiter in waiting:
            if not waiter.called:
                waiter.callback(None)

    @property
    def slotCount(self) -> int:
        return len(self.scheduler.slots)

    # -- what the monitor says

    def backendReady(self, props: dict[str, Any], restarted: bool) -> None:
        """The monitor found the backend, a new process or the same one back."""
        new = restarted or self.props is None
        self.props = props
        if props.get("role") == "router":
            self._machine.router()
        elif not props:
            (self._machine.newForeign if new else self._machine.foreign)()
        elif new:
            self._machine.newProcess()
        elif self.mode is SlotMode.UNKNOWN:
            self._machine.unprobed()
        else:
            self._machine.sameProcess()

    def backendLost(self) -> None:
        """It stopped answering: drop every call of bioproxy's own at once, so a shutdown never waits on one."""
        self._machine.lost()

    def stop(self) -> None:
        self._machine.stop()

    # -- the machine's outputs (_buildProcessMachine)

    def _resetFacts(self) -> None:
        """A new process: nothing known of it, nothing it held is there."""
        self.mode, self.ramCache = SlotMode.UNKNOWN, None
        self.persistence = Persistence.UNKNOWN  # it may have been started with other flags
        self.reuse, self.model = Reuse.UNKNOWN, None  # or with another model
        self.fingerprint = None  # named once its model file is read (the probe): no file till then
        self.scheduler.reset(int(self.configuredSlots or (self.props or {}).get("total_slots") or 1))
        for forget in self.onNewProcess:
            forget()

    def _probeAfresh(self) -> None:
        self._cancelProbe()
        self._resetFacts()
        self._startProbe()

    def _isForeignAfresh(self) -> None:
        self._cancelProbe()
        self._resetFacts()
        self._isForeign()

    def _isForeign(self) -> None:
        self._cancelProbe()
        log.warn(
            "{backend}: the backend has no /props, so it is not llama-server: no warmups or cache files",
            backend=self.llama.name,
        )
        self.fingerprint = None

    def _isRouter(self) -> None:
        self._cancelProbe()
        self._resetFacts()
        log.info(
            "{backend}: llama-server's router (several models): each of its models is served as a "
            "backend of its own; requests that name no model it lists pass through",
            backend=self.llama.name,
        )
        self._wake()

    def _wentAway(self) -> None:
        self._cancelProbe()
        self._wake()  # nothing to wait for: the request meets the outage
        for listener in self.listeners:
            listener.backendLost()

    # -- what the cache learns

    def noPersistence(self, why: str) -> None:
        if self.persistence is not Persistence.NONE:
            log.warn(
                "{backend}: llama-server cannot save or restore slots ({why}): templates are warmed by prefill "
                "and kept only in its slots and RAM cache; start it with --slot-save-path DIR "
                "to keep them across restarts",
                why=why,
                backend=self.llama.name,
            )
        self.persistence = Persistence.NONE

    @property
    def passesThrough(self) -> bool:
        """
        Nothing of it is modelled (not llama-server, its router, or a
        process whose probe keeps failing): requests are relayed as they are.
        """
        return self._phase in (Phase.FOREIGN, Phase.ROUTER) or (
            self._phase is Phase.PROBING and self._probeFailures > 0
        )

    @property
    def restoresHelp(self) -> bool:
        """A restored file can give a request a cache hit here (or nothing says it cannot yet)."""
        return self.persistence is not Persistence.NONE and self.reuse is not Reuse.NOTHING

    def noFilesWhy(self) -> str | None:
        """Why no cache file can serve a request on this process (None: one can)."""
        if self.persistence is Persistence.NONE:
            return "llama-server runs without --slot-save-path: no cache files"
        if self.reuse is Reuse.NOTHING:
            return self.reuseWhy()
        return None

    def reuseWhy(self) -> str | None:
        """Why restores are limited or useless on this process, and what would change it; None when they are not."""
        model = self.model.describe() if self.model is not None else "this model"
        if self.reuse is Reuse.NOTHING:
            return (
                f"{model}: llama-server reuses nothing of a restored slot file on a sliding-window "
                "model, so templates are kept warm in its slots and RAM cache and computed again "
                "after a llama-server restart (--swa-full would change it, at a cost: see "
                "docs/architectures.md)"
            )
        if self.reuse is Reuse.EXTENSION:
            return (
                f"{model}: a restored slot file serves only requests that extend all of it, "
                "so files end exactly where the user's text begins"
            )
        return None

    def view(self) -> dict[str, Any]:
        return {
            "phase": self.phase.value,
            "router_model": self.llama.model,  # a model of llama-server's router (None: a llama-server of its own)
            "slots": self.slotCount,
            "slot_mode": self.mode.value,
            "pinned": self.pins,
            "persistence": self.persistence.value,
            "ram_cache": self.ramCache,
            "fingerprint": self.fingerprint,
            "model": self.model.view() if self.model is not None else None,
            "restore_reuses": self.reuse.value,
            "restore_reuses_why": self.reuseWhy(),
        }

    # -- the probe

    def _startProbe(self) -> None:
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
            delay = 0.0
            if not result.check(_Preempted):
                self._probeFailures += 1
                delay = min(PROBE_BACKOFF_MAX, 2.0 ** (self._probeFailures - 1))
                why = result.getErrorMessage()
                if why != self._probeError:
                    log.warn(
                        "{backend}: probing the backend failed: {why}; until a probe succeeds, requests "
                        "are passed through and nothing is warmed (tried again with a backoff, up to "
                        "every {most:g} s; logged again only if the reason changes)",
                        why=why,
                        most=PROBE_BACKOFF_MAX,
                        backend=self.llama.name,
                    )
                self._probeError = why
            self._machine.probeFailed(delay)
            return
        self._probeFailures, self._probeError = 0, None
        self._machine.probed()

    def _probeLater(self, delay: float) -> None:
        clock: Any = self.scheduler.clock
        self._retry = clock.callLater(delay, self._startProbe)

    def _becomeReady(self) -> None:
        self._wake()
        log.info(
            "{backend}: backend has {count} slot(s), fingerprint {fp}; slots {mode}, requests {pinned}, "
            "slot persistence {files}, RAM cache {ram}; a restored file reuses {reuse}",
            count=self.slotCount,
            fp=self.fingerprint,
            mode=self.mode.value,
            pinned="pinned" if self.pins else "left to llama-server",
            files=self.persistence.value,
            ram=self.ramCache,
            reuse=self.reuse.value,
            backend=self.llama.name,
        )
        why = self.reuseWhy()
        if why is not None:
            (log.warn if self.reuse is Reuse.NOTHING else log.info)(
                "{backend}: {why}", why=why, backend=self.llama.name
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

        A model of llama-server's router is loaded again and again with the
        same flags: a process of the same model file, context, build and
        slots as one probed before is what that one was, and is not probed
        again (a swap's first request waits for no probe).
        """
        identity = self._identity()
        known = self._probedBefore.get(identity) if identity is not None else None
        if known is not None:
            await task.deferLater(self.scheduler.clock, 0, lambda: None)  # not inside the machine's output
            self.mode, self.ramCache, self.persistence = known.mode, known.ramCache, known.persistence
            self.reuse, self.model, self.fingerprint = known.reuse, known.model, known.fingerprint
            self.scheduler.reset(self.slotCount, retains=self.mode is SlotMode.RETAINED)
            return
        await self._probeAfreshProcess()
        if identity is not None:
            self._probedBefore[identity] = _Probed(
                self.mode, self.ramCache, self.persistence, self.reuse, self.model, self.fingerprint
            )

    def _identity(self) -> tuple[str, int] | None:
        """What a router's model process is like, as its /props says (None: not a router's model)."""
        if self.llama.model is None or not self.props:
            return None
        return fingerprint(self.props), self.slotCount

    async def _probeAfreshProcess(self) -> None:
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

    async def _readModel(self) -> ModelFacts | None:
        path = (self.props or {}).get("model_path")
        if self.readModel is None or not isinstance(path, str) or not path:
            return None
        try:
            return await self.readModel(path)
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - on another machine, say: the probe alone decides
            log.info(
                "{backend}: cannot read the model's metadata from {path} ({why})",
                path=path,
                why=str(e),
                backend=self.llama.name,
            )
            return None

    async def _measure(self, slots: int) -> tuple[SlotMode, bool]:
        await self._probePersistence()
        self.model = await self._readModel()
        self.fingerprint = fingerprint(self.props or {}, self.model.identity if self.model else "")
        if self.persistence is Persistence.FILES:
            try:
                self.reuse = await self._probeReuse()
            except BackendError as e:  # a save it refuses (a directory it cannot write, say)
                if str(e) != self._reuseProbeError:  # once, not at each probe that fails after it
                    log.warn(
                        "{backend}: the restore probe failed ({why}): restores are tried as before",
                        why=str(e),
                        backend=self.llama.name,
                    )
                self._reuseProbeError = str(e)
                self.reuse = self.model.expected() if self.model is not None else Reuse.UNKNOWN
        elif self.model is not None:
            self.reuse = self.model.expected()
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

    async def _probeReuse(self) -> Reuse:
        """
        On slot 0: compute a prompt P and save it; then restore it twice,
        and ask for P extended, then for P's first half with another end.
        What each reused says which requests a restored file serves. A
        sliding-window model run with --swa-full passes both, but reuses a
        file that holds only the window: only extensions are safe there.
        """
        name = _REUSE_FILE.format(hashlib.sha256(self.llama.name.encode()).hexdigest()[:8])
        nonce = secrets.token_hex(4)
        p = await self.llama.tokenize(
            f"{PROBE_MARK} {nonce} restore: " + " ".join(f"r{i}" for i in range(60))
        )
        tail = await self.llama.tokenize(" and then some more words", special=False)
        await self._complete(p, 0)
        await self.llama.save(0, name, self.timeout)
        await self.llama.restore(0, name, self.timeout)
        extended = (await self._complete(p + tail, 0))[0] >= PROBE_HIT_SHARE * len(p)
        if not extended:
            return Reuse.NOTHING
        half = len(p) // 2
        await self.llama.restore(0, name, self.timeout)
        shared = (await self._complete(p[:half] + tail, 0))[0] >= PROBE_HIT_SHARE * half
        if shared and not (self.model is not None and self.model.slidingWindow):
            return Reuse.PREFIX
        return Reuse.EXTENSION

    async def _complete(self, prompt: str | list[int], slot: int) -> tuple[int, int]:
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


@dataclasses.dataclass(frozen=True)
class _Probed:
    """What a probe found of a process (Backend._probedBefore)."""

    mode: SlotMode
    ramCache: bool | None
    persistence: Persistence
    reuse: Reuse
    model: ModelFacts | None
    fingerprint: str | None


class _Preempted(Exception):
    """A user took a slot the probe held; it runs again once the slot is free."""


class _Process(Protocol):
    """What happens to a backend's process: the inputs of its machine."""

    def newProcess(self) -> None:
        "Found, and a process bioproxy has not probed: first seen, or restarted."

    def unprobed(self) -> None:
        "Found again, the same process, not probed yet (it went away during its probe)."

    def sameProcess(self) -> None:
        "Found again after a blip, the same process: what it is like is known."

    def foreign(self) -> None:
        "It answers, with no /props: not llama-server."

    def router(self) -> None:
        "It is llama-server's router: its /props says role router."

    def newForeign(self) -> None:
        "First seen, or restarted, and with no /props."

    def probed(self) -> None:
        "The probe ended: its facts are known."

    def probeFailed(self, delay: float) -> None:
        "The probe failed; it runs again in delay seconds."

    def lost(self) -> None:
        "It stopped answering."

    def stop(self) -> None:
        "bioproxy stops."


_Output = Callable[..., None]


def _entering(phase: Phase, action: Callable[[Backend], None]) -> _Output:
    """An output that records the phase entered (Backend.phase reads it), then acts."""

    def output(machine: _Process, core: Backend, *args: Any) -> None:
        core._phase = phase
        action(core)

    return output


def _buildProcessMachine() -> Callable[[Backend], _Process]:
    """
    unknown -> probing -> ready; lost from any of them, and back by way of
    a probe (a new process) or not (the same one, after a blip); foreign
    while it answers as something other than llama-server. The Backend is
    the machine's core, and its outputs are the Backend's methods; the
    phase they record is for reading only (a machine cannot be asked its
    state while an output runs, and outputs tell listeners, who ask).
    """
    builder = TypeMachineBuilder(_Process, Backend)
    unknown, probing, ready = builder.state("unknown"), builder.state("probing"), builder.state("ready")
    lost, foreign, stopped = builder.state("lost"), builder.state("foreign"), builder.state("stopped")
    router = builder.state("router")
    for state in (unknown, probing, ready, lost, foreign):
        state.upon(_Process.router).to(router)(_entering(Phase.ROUTER, Backend._isRouter))
    router.upon(_Process.router).loop().returns(None)
    for state in (unknown, probing, ready, lost, foreign, router):
        state.upon(_Process.stop).to(stopped)(_entering(Phase.STOPPED, Backend._cancelProbe))
        state.upon(_Process.newProcess).to(probing)(_entering(Phase.PROBING, Backend._probeAfresh))
        state.upon(_Process.foreign).to(foreign)(_entering(Phase.FOREIGN, Backend._isForeign))
        state.upon(_Process.newForeign).to(foreign)(_entering(Phase.FOREIGN, Backend._isForeignAfresh))
    for state in (unknown, probing, ready, foreign, router):
        state.upon(_Process.lost).to(lost)(_entering(Phase.LOST, Backend._wentAway))
    lost.upon(_Process.lost).loop().returns(None)
    for state in (unknown, lost, foreign, router):
        state.upon(_Process.unprobed).to(probing)(_entering(Phase.PROBING, Backend._startProbe))
    for state in (unknown, foreign, router):
        state.upon(_Process.sameProcess).to(probing)(_entering(Phase.PROBING, Backend._startProbe))
    lost.upon(_Process.sameProcess).to(ready)(_entering(Phase.READY, Backend._becomeReady))
    for state in (probing, ready):  # a probe runs or waits to run again; or there is nothing to learn
        state.upon(_Process.unprobed).loop().returns(None)
        state.upon(_Process.sameProcess).loop().returns(None)
    probing.upon(_Process.probed).to(ready)(_entering(Phase.READY, Backend._becomeReady))
    probing.upon(_Process.probeFailed).loop()(lambda machine, core, delay: core._probeLater(delay))
    for ignored in (
        _Process.newProcess,
        _Process.newForeign,
        _Process.unprobed,
        _Process.sameProcess,
        _Process.foreign,
        _Process.router,
        _Process.probed,
        _Process.lost,
        _Process.stop,
    ):
        stopped.upon(ignored).loop().returns(None)
    stopped.upon(_Process.probeFailed).loop()(lambda machine, core, delay: None)
    return builder.build()


_processMachine = _buildProcessMachine()
