# -*- test-case-name: tests.unit.test_cachefacts,tests.unit.test_architectures -*-
"""
What bioproxy knows about each head's KV cache (a template's, or one of
heads.py's learned ones): its boundary tokens (where the user's text
begins), its file on the backend's disk, how many tokens a warm slot saves,
and whether restores of it can be trusted, on this backend's kind of model
(backend/model.py). Restores are checked twice: `n_restored > 0` at once, and
`timings.cache_n` on the next request, since a restore can report success and
still leave the slot cold.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import re
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from twisted.internet import defer
from twisted.logger import Logger

from ..heads import MARK, Head
from ..metrics import Metrics
from . import Backend, Persistence, Reuse, SlotMode
from .llamacpp import BackendError, NoPersistence
from .scheduler import Contents, commonLength, holding

log = Logger()

# A request reused the cache when cache_n reaches this share of the
# head's reusable tokens; token merges at the message boundary cost a few.
HIT_SHARE = 0.9
# Restore misses in a row after which restores of a head are distrusted.
RESTORE_MISS_LIMIT = 2
# Misses in a row of requests that relied on llama-server's RAM cache,
# after which a head is restored from its file instead (CLEARED mode).
RAM_MISS_LIMIT = 2
# A request that reused less than this share of a head's tokens found none
# of it: llama-server lost the head. Between this and HIT_SHARE, reuse
# stopped at a context checkpoint before the head's end, which is how a
# sliding-window or hybrid model reuses a prefix it has moved past: no
# warmup can change that, so it is no reason to warm the head again.
LOST_SHARE = 0.5
# Texts a user's message may begin with. A head is cut back past any token
# that one of them merges with, so that every request's tokens begin with
# the head's: llama-server's tokenizer decides, not a guess about it.
FOLLOWERS = ("a", "A", "1", " ", "\n", ".", "<", "\u00e9", "\u4e2d")

# How a slot was made ready for a templated request: it already held the
# head; llama-server's RAM cache will supply it; its file was restored;
# a restore was tried and failed (the slot is empty); or it runs cold.
Prepared = Literal["warm", "ram", "restored", "failed", "cold"]

# What a request that starts with a warm head reused of it: all of it; most
# (up to a checkpoint: the model's way, see LOST_SHARE); or nothing worth
# counting (llama-server lost it, or a restore gave nothing).
Reused = Literal["hit", "checkpoint", "lost"]


def sanitise(prefix: str) -> str:
    """A file-name-safe form of a prefix: only [A-Za-z0-9_-], never empty."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix)[:64] or "_"


def filename(head: Head, fingerprint: str) -> str:
    return _filename(head.name, head.digest, fingerprint)


@functools.lru_cache(maxsize=4096)
def _filename(name: str, digest: str, fingerprint: str) -> str:
    # Asked several times per request; the same few answers each time.
    return f"{sanitise(name)}-{digest[:12]}-{fingerprint}.bin"


_VERSION = re.compile(r"[0-9a-f]{12}-[0-9a-f]{8}\.bin")


def _isVersion(rest: str) -> bool:
    """rest (a file name after its head's name) is a version and a fingerprint: the file is that head's."""
    return _VERSION.fullmatch(rest) is not None


class _Gate:
    """A count of holders, and whoever waits for it to come back to none."""

    def __init__(self) -> None:
        self.holders = 0
        self._waiting: list[defer.Deferred[None]] = []

    def cleared(self) -> defer.Deferred[None]:
        if not self.holders:
            return defer.succeed(None)
        waiter: defer.Deferred[None] = defer.Deferred()
        self._waiting.append(waiter)
        return waiter

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        self.holders += 1
        try:
            yield
        finally:
            self.holders -= 1
            if not self.holders:
                waiting, self._waiting = self._waiting, []
                for waiter in waiting:
                    waiter.callback(None)


def isoTime(seconds: float | None) -> str | None:
    """A Unix time in ISO 8601 (UTC, milliseconds), for the admin views."""
    if seconds is None:
        return None
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat(timespec="milliseconds")


@dataclasses.dataclass
class WarmState:
    """One head version's cache facts; replaced when the head changes."""

    key: str
    tokens: int | None = None  # prompt tokens of the warmup request
    # The head's tokens, cut where the user's text begins: what its warmup
    # sends and its file holds, and what every request using it begins with.
    boundary: list[int] | None = None
    # A warmup of this process put exactly the boundary in a slot (and so in
    # the RAM cache), not only a request that went on past it.
    atBoundary: bool = False
    prefill: bool = False  # restores failed to give reuse; warm by prefilling
    prefillWhy: str | None = None
    restoreMisses: int = 0
    ramMisses: int = 0
    hits: int = 0
    misses: int = 0
    warm: bool = False
    inRam: bool = False  # llama-server has moved it to its RAM prompt cache
    lastWarmup: float | None = None
    lastHow: str | None = None  # how the last warmup made it warm: prefill, restore, resident
    error: str | None = None  # why the backend refused the last warmup
    text: str | None = None  # what the warmup's slot starts with, as placement compares it
    held: str | None = None  # a conversation's messages, as a slot's text starts with them (holds)
    saveError: str | None = None  # why llama-server could not write its file, the last time it tried
    saveFailures: int = 0  # in a row: the warmer's retries back off
    fileBytes: int = 0  # of its file, as llama-server reported the save
    # A conversation's last answered request: its slot (where pinned), its
    # prompt and generated tokens, to find the slot that holds it (slotHolding).
    served: tuple[int | None, int | None, int | None] | None = None

    @property
    def reusable(self) -> int | None:
        """Tokens before the message: what a hit reuses (None until the boundary is known)."""
        return len(self.boundary) if self.boundary is not None else None

    def view(self, backend: Backend) -> dict[str, Any]:
        checked = self.hits + self.misses
        prefill = self.prefill or not backend.restoresHelp
        why = backend.noFilesWhy() or self.prefillWhy
        return {
            "warm": self.warm,
            "tokens": self.tokens,
            "reusable_tokens": self.reusable,
            "warmup_mode": "prefill" if prefill else "restore",
            "warmup_mode_reason": why,
            "in_ram_cache": self.inRam,
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": round(self.hits / checked, 4) if checked else None,
            "last_warmup": self.lastWarmup,
            "last_warmup_at": isoTime(self.lastWarmup),
            "last_warmup_how": self.lastHow,
            "warmup_error": self.error,
            "save_error": self.saveError,
        }


class KVCache:
    def __init__(self, backend: Backend, metrics: Metrics, slotDir: Path | None = None) -> None:
        self.backend = backend
        # llama-server's --slot-save-path, where bioproxy can reach it: files given up are deleted.
        self.slotDir = slotDir
        self.llama = backend.llama
        self.metrics = metrics
        self.states: dict[str, WarmState] = {}
        # Cache files known to be on the backend's disk (those this bioproxy
        # saved, and those the state file says it saved before).
        self.files: set[str] = set()
        self.tokensSaved: dict[str, int] = {}  # by template prefix: prompt tokens its requests reused
        self.claimed: set[int] = set()  # slots a restore or warmup of ours is using (CLEARED mode)
        self._follower: list[int] | None = None
        # Told of each file saved, by head name and bytes (the head book's disk budget).
        self.onSaved: list[Callable[[str, int], None]] = []
        self._measuring = defer.DeferredLock()  # boundary: one head at a time
        self._saving = _Gate()  # saves under way that a new task could spoil
        # Users' requests whose head was restored into an empty slot, until
        # they end: a warmup's unpinned task meanwhile could land on that slot.
        self._restored = _Gate()

    def state(self, head: Head) -> WarmState:
        state = self.states.get(head.name)
        if state is None or state.key != head.key:
            state = self.states[head.name] = WarmState(head.key)
        return state

    def warmText(self, head: Head) -> str:
        """What a slot that head's warmup computed starts with (worked out once per version)."""
        state = self.state(head)
        if state.text is None:
            state.text = head.warmText()
        return state.text

    def holds(self, contents: Contents, head: Head) -> bool:
        """Whether a slot with contents holds head: by its key, or a conversation by its messages."""
        if contents.key == head.key:
            return True
        state = self.state(head)
        if state.held is None:
            state.held = head.heldText() or ""
        return bool(state.held) and contents.text.startswith(state.held)

    def forgetFile(self, head: Head) -> None:
        """Its file must be written again: forced, or found to give no reuse."""
        self.files.discard(self.filename(head) or "")

    def forget(self, name: str) -> None:
        """
        A learned head or conversation was given up: its facts go, and its
        files are deleted where bioproxy can reach them (slotDir).
        """
        self.states.pop(name, None)
        stem = sanitise(name) + "-"
        files = [f for f in self.files if f.startswith(stem) and _isVersion(f[len(stem) :])]
        for file in files:
            self.files.discard(file)
            if self.slotDir is None:
                continue
            try:
                (self.slotDir / file).unlink(missing_ok=True)
            except OSError as e:
                log.warn(
                    "{backend}: cannot delete the cache file {file}: {why}",
                    file=file,
                    why=str(e),
                    backend=self.backend.llama.base,
                )

    def forgetProcess(self) -> None:
        """A new backend process holds nothing in its slots or RAM; the files stay."""
        self._follower = None
        for state in self.states.values():
            state.warm = state.inRam = state.atBoundary = False
            state.boundary = None  # it may run another model, with another tokenizer

    def filename(self, head: Head) -> str | None:
        fp = self.backend.fingerprint
        return filename(head, fp) if fp else None

    def persists(self, head: Head) -> bool:
        """head is kept in a file on the backend's disk (once saved)."""
        return self.filename(head) is not None and self.backend.restoresHelp and not self.state(head).prefill

    def atBoundary(self, head: Head) -> bool:
        """
        What llama-server holds of head serves every request that uses it:
        on a dense model any copy does; on another, only one that ends at
        the boundary, which a warmup of this process made (a request that
        computed the head and went on left checkpoints 4 + 512 tokens short).
        """
        # (Where nothing says what the model reuses, as before anything did:
        # no restore probe without --slot-save-path, no readable model file.)
        return self.backend.reuse in (Reuse.PREFIX, Reuse.UNKNOWN) or self.state(head).atBoundary

    async def follower(self) -> list[int]:
        """One ordinary token, to extend a head by (asked of llama-server once per process)."""
        if self._follower is None:
            self._follower = (await self.llama.tokenize(FOLLOWERS[0], special=False))[:1]
        return self._follower

    def mayRestore(self, head: Head) -> bool:
        name = self.filename(head)
        return (
            self.persists(head)
            and name not in self.backend.missing
            # A learned head has a file only if this process saved one.
            and (not head.learned or name in self.files)
        )

    def inRam(self, head: Head) -> bool:
        """
        True when llama-server will find head in its RAM prompt cache,
        which is quicker than a restore from disk.
        """
        return bool(self.backend.ramCache) and self.state(head).inRam

    async def moveToRamBeforeRestore(self, slot: int, held: str | None) -> None:
        """
        A restore overwrites a slot, and what it held is lost; a completion
        moves it into llama-server's RAM cache instead. So when that cache
        works, a one-token completion goes first, and the head is kept.
        """
        state = self._version(held)
        if not self.backend.ramCache or state is None or state.inRam:
            return
        await self.completeOneToken(slot)
        state.inRam = True

    async def completeOneToken(self, slot: int) -> None:
        """A one-token completion on slot: llama-server moves what the slot held into its RAM cache."""
        await self.llama.chat(
            {"messages": [{"role": "user", "content": "."}], "max_tokens": 1, "id_slot": slot}, 30
        )

    def noteDisplaced(self, key: str | None) -> None:
        """
        A slot holding key is given a completion for another prompt: that is
        when llama-server moves the slot's prompt into its RAM cache. (A
        restore does not; it overwrites the slot.)
        """
        state = self._version(key)
        if state is not None:
            state.inRam = True

    def _version(self, key: str | None) -> WarmState | None:
        """The state of the head version key names, if it is a current one."""
        return next((s for s in self.states.values() if key is not None and s.key == key), None)

    async def prepare(self, slot: int, head: Head, held: str | None, ram: bool) -> Prepared:
        """
        Ready slot, which holds `held` and not head, for a completion of
        head. ram: llama-server's RAM cache may be relied on.
        """
        how: Prepared
        if ram and self.inRam(head):
            how = "ram"
        elif self.mayRestore(head):
            if await self.restore(slot, head, held):
                return "restored"
            return "cold" if self.backend.persistence is Persistence.NONE else "failed"
        else:
            how = "cold"
        self.noteDisplaced(held)  # the completion to come moves it into the RAM cache
        return how

    async def claimSlot(self, leased: int) -> int:
        """
        Where a file can be restored or a head computed and saved without
        losing anything; give it back with unclaim(). In CLEARED mode the
        lease is only a share of capacity, and the slot that finished last
        still holds its prompt until the next task moves it into the RAM
        cache, so /slots is asked for an idle, empty one that no other job
        of ours is using.
        """
        if self.backend.mode is not SlotMode.CLEARED:
            return leased
        ids: list[int] = []
        try:
            slots = await self.llama.slots()
            idle = [s for s in slots if not s.get("is_processing") and s.get("id") not in self.claimed]
            ids = [int(s["id"]) for s in idle if not s.get("n_prompt_tokens")] or [int(s["id"]) for s in idle]
        except defer.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - without /slots, the leased one is all there is
            pass
        chosen = leased if leased in ids or not ids else ids[0]
        self.claimed.add(chosen)
        return chosen

    def unclaim(self, slot: int) -> None:
        self.claimed.discard(slot)

    def quiet(self) -> defer.Deferred[None]:
        """
        Fires once no save of ours is under way: every task sent to the
        backend waits for it, since in CLEARED mode a task that starts
        clears the idle slot being saved. llama-server runs a save on its
        main loop, so nothing it could compute meanwhile is lost.
        """
        return self._saving.cleared()

    def _quietWhile(self) -> contextlib.AbstractContextManager[None]:
        return self._saving.held()

    def clearForWarmups(self) -> defer.Deferred[None]:
        """
        Fires once no user's request waits on a slot restored for it: in
        CLEARED mode llama-server gives an unpinned task the idle slot that
        shares most with it, and a warmup's task would take (and cut) the
        slot a user's conversation was just restored into.
        """
        return self._restored.cleared()

    def restoredForUser(self) -> contextlib.AbstractContextManager[None]:
        """While a user's request runs on the slot its head was restored into (clearForWarmups)."""
        return self._restored.held()

    async def restoreIntoEmptySlot(self, leased: int, head: Head) -> bool:
        slot = await self.claimSlot(leased)
        try:
            return await self.restore(slot, head)
        finally:
            self.unclaim(slot)

    async def restore(self, slot: int, head: Head, held: str | None = None) -> bool:
        """
        Load the head's file into slot, which holds the head version
        `held`; False (never an error) when that cannot be done.
        """
        name = self.filename(head)
        if name is None:
            return False
        prefix, label = head.name, head.label
        try:
            if self.backend.pins:
                await self.moveToRamBeforeRestore(slot, held)
            result = await self.llama.restore(slot, name, self.backend.timeout)
        except NoPersistence as e:
            self.backend.noPersistence(str(e))
            return False
        except BackendError as e:
            # llama-server says 400 for a file that is missing or unusable.
            status = "missing" if e.status == 400 else "error"
            if name in self.files:
                log.warn(
                    "{backend}: the cache file of {prefix} is unusable ({why}); computing it again",
                    prefix=prefix,
                    why=str(e),
                    backend=self.backend.llama.base,
                )
            else:  # a first warmup: normal, not an error
                log.info(
                    "{backend}: no cache file for {prefix} yet; computing it",
                    prefix=prefix,
                    backend=self.backend.llama.base,
                )
            self.metrics.kvRestores.labels(prefix=label, status=status).inc()
            self.files.discard(name)
            self.backend.missing.add(name)
            return False
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed restore only means a cold request
            log.warn(
                "{backend}: restoring {prefix} failed: {why}",
                prefix=prefix,
                why=str(e),
                backend=self.backend.llama.base,
            )
            self.metrics.kvRestores.labels(prefix=label, status="error").inc()
            return False
        restored = result.get("n_restored", 0) if isinstance(result, dict) else 0
        if not restored:
            self.metrics.kvRestores.labels(prefix=label, status="empty").inc()
            return False
        self.metrics.kvRestores.labels(prefix=label, status="ok").inc()
        self.files.add(name)
        return True

    def noteServed(self, head: Head, slot: int | None, timings: dict[str, Any] | None) -> None:
        """
        A request computed conversation head and was answered: llama-server
        holds it (in slot, where pinned; in its RAM cache once the next task
        starts, in CLEARED mode). What it computed finds the slot later
        (slotHolding), when the conversation's file is saved.
        """
        state = self.state(head)
        state.warm = True
        state.inRam = self.backend.mode is SlotMode.CLEARED
        prompt = timings.get("cache_n", 0) + timings.get("prompt_n", 0) if timings else None
        generated = timings.get("predicted_n") if timings else None
        state.served = (slot, prompt, generated if isinstance(generated, int) else None)

    # -- what the warmer reports (this class is the one writer of WarmState)

    def noteWarmupTokens(self, head: Head, tokens: int) -> None:
        """A warmup's request counted tokens prompt tokens in all (0: it did not say)."""
        state = self.state(head)
        state.tokens = tokens or state.tokens

    def noteWarmed(self, head: Head, how: str, at: float, inRam: bool) -> None:
        """
        A warmup made head warm, by how (prefill, restore, resident, saved);
        inRam: it ran on an unpinned slot, which llama-server moves into its
        RAM cache when the next task starts.
        """
        state = self.state(head)
        state.warm = True
        if how != "resident":
            state.atBoundary = state.boundary is not None
        state.lastWarmup, state.lastHow = at, how
        if inRam:
            state.inRam = True

    def noteRefused(self, head: Head, why: str | None) -> None:
        """llama-server refused head's warmup, and why (None: its last warmup was not refused)."""
        self.state(head).error = why

    def noteFilesSaved(self, files: Iterable[str]) -> None:
        """Files a bioproxy saved on this backend before (the state file): a restore finds out whether they are there."""
        self.files.update(files)

    def lostFromRam(self, head: Head) -> None:
        """A task of ours took head out of llama-server's RAM cache, and cut it: its file serves it next."""
        self.state(head).inRam = False

    def saved(self, head: Head) -> bool:
        return self.filename(head) in self.files

    def holding(self, head: Head, text: str) -> Contents:
        """What a slot holds after computing text, which starts with head: as much as its file backs."""
        backed = commonLength(text, self.warmText(head)) if self.saved(head) else 0
        return holding(head.key, text, backed)

    async def save(self, slot: int, head: Head, tokens: int | None) -> bool:
        """
        Save once per head version and backend: the file never changes
        after. tokens: what the slot should hold; a save of fewer (another
        task cleared the slot first) is not counted as the head's file.
        """
        name = self.filename(head)
        backend = self.backend
        if name is None or name in self.files or not backend.restoresHelp:
            return name in self.files
        state = self.state(head)
        try:
            with self._quietWhile():
                result = await self.llama.save(slot, name, self.backend.timeout)
        except NoPersistence as e:
            backend.noPersistence(str(e))
            return False
        except BackendError as e:
            if e.status < 500:
                raise
            # A directory llama-server cannot write (full, read-only): the
            # head stays warm in llama-server; the warmer saves it again later.
            if state.saveError != str(e):
                log.warn(
                    "{backend}: cannot save {prefix}'s file ({why}); it stays warm in llama-server, saved again later",
                    prefix=head.name,
                    why=str(e),
                    backend=self.backend.llama.base,
                )
            state.saveError, state.saveFailures = str(e), state.saveFailures + 1
            return False
        state.saveError, state.saveFailures = None, 0
        written = result.get("n_saved") if isinstance(result, dict) else None
        if tokens and isinstance(written, int) and written < HIT_SHARE * tokens:
            log.info(
                "{backend}: slot {slot} held {n} tokens, not {prefix}'s {tokens}, when saved; saving again later",
                slot=slot,
                n=written,
                prefix=head.name,
                tokens=tokens,
                backend=self.backend.llama.base,
            )
            return False
        self.files.add(name)
        backend.missing.discard(name)
        size = result.get("n_written") if isinstance(result, dict) else None
        self.state(head).fileBytes = size if isinstance(size, int) else 0
        for listener in self.onSaved:
            listener(head.name, self.state(head).fileBytes)
        self.metrics.kvSaves.labels(prefix=head.label).inc()
        log.info(
            "{backend}: saved {prefix} from slot {slot} to {name}",
            prefix=head.name,
            slot=slot,
            name=name,
            backend=self.backend.llama.base,
        )
        return True

    async def saveServed(
        self, head: Head, slot: int | None, prompt: int | None, generated: int | None
    ) -> bool:
        """
        A request that starts with head, which has no file yet, was just
        answered: its slot holds head and that conversation, so saving the
        slot writes the file at no cost, where a warmup would compute head
        again (and, in CLEARED mode, cut the conversation that llama-server
        would have kept). slot: where it ran, when it was pinned; else the
        one idle slot that holds as many tokens as it had (prompt, when its
        answer said) and generated, and at least head. Tasks wait meanwhile
        (quiet). False when no slot is sure to hold it any more.
        """
        if self.saved(head) or not self.persists(head):
            return self.saved(head)
        if self.backend.reuse is not Reuse.PREFIX:
            # The slot holds the head, a message and an answer: a file of it
            # would serve only that conversation's next turn. Warm the head.
            return False
        state = self.state(head)
        if prompt is None:
            await self.boundary(head)  # the least the slot must hold, where the answer did not say
        # At once: a task that starts meanwhile clears the slot in CLEARED mode.
        with self._quietWhile():
            least = max(prompt or 0, state.reusable or 0)
            if slot is None and least:
                slot = await self.slotHolding(least, generated if prompt else None)
            if slot is None or not await self.save(slot, head, least):
                return False
        state.warm = True
        if self.backend.mode is SlotMode.CLEARED:
            state.inRam = True  # the next task moves the slot into the RAM cache
        return True

    async def slotHolding(self, prompt: int, generated: int | None) -> int | None:
        """
        The idle slot that holds a prompt of prompt tokens and what was
        generated after it (all but the last token, in llama-server), or at
        least prompt tokens when generated is not known, if only one does:
        /slots shows no prompts, only their lengths.
        """
        low, high = (prompt + generated - 1, prompt + generated) if generated else (prompt, None)
        found = [
            int(s["id"])
            for s in await self.llama.slots()
            if not s.get("is_processing")
            and low <= (s.get("n_prompt_tokens") or 0)
            and (high is None or (s.get("n_prompt_tokens") or 0) <= high)
        ]
        return found[0] if len(found) == 1 else None

    async def boundary(self, head: Head) -> list[int] | None:
        """
        The tokens every request that uses head begins with: the prompt as
        llama-server renders it (its chat template applied), cut where the
        user's text begins and cut back past any token that could merge with
        what follows (FOLLOWERS). Its warmup sends exactly these, so that
        what a slot, the RAM cache or a file holds is a prefix that every
        request extends: the only kind a hybrid model's file serves, and it
        leaves llama-server's last checkpoint inside the head. Worked out
        once per head version; None when llama-server cannot say.
        """
        state = self.state(head)
        if state.boundary is not None:
            return state.boundary
        # One head at a time: llama-server answers few calls at once, and a
        # restart's warmups would otherwise ask for every head's together,
        # keeping users' requests waiting for a connection.
        async with self._measuring:
            if state.boundary is None:
                state.boundary = await self._measure(head)
        return state.boundary

    async def _measure(self, head: Head) -> list[int] | None:
        try:
            if head.prompt is not None:
                before = head.prompt.partition(MARK)[0]
            else:
                body = head.measureBody()
                assert body is not None
                before, found, _ = (await self.llama.applyTemplate(body)).partition(MARK)
                if not found:
                    return None
            tokens = await self.llama.tokenize(before)
            keep = len(tokens)
            for follower in FOLLOWERS:  # one at a time: llama-server answers few calls at once
                keep = min(keep, commonLength(tokens, await self.llama.tokenize(before + follower)))
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - without it, the head is warmed as a chat, as before
            log.info(
                "{backend}: cannot find where {prefix}'s message begins: {why}",
                prefix=head.name,
                why=str(e),
                backend=self.backend.llama.base,
            )
            return None
        return tokens[:keep]

    def learn(
        self,
        head: Head,
        slot: int | None,
        timings: dict[str, Any],
        restored: bool,
        fromRam: bool = False,
    ) -> Reused:
        """
        Compare a templated request's reuse with what a warm head gives.
        Only "lost" is a reason to warm it again: reuse that stopped at a
        context checkpoint is the model's way (LOST_SHARE).
        restored: the request ran right after a restore that reported
        success, on that slot, so a miss is evidence against restores;
        any other miss (eviction, another task in between) is not.
        fromRam: the request relied on llama-server's RAM cache.
        """
        state = self.state(head)
        state.warm = True  # the slot has just computed it
        expected = state.reusable if state.reusable is not None else state.tokens
        cached = timings.get("cache_n", 0)
        reused: Reused = "hit"
        if expected and cached < HIT_SHARE * expected:
            reused = "checkpoint" if cached >= LOST_SHARE * expected else "lost"
        if self.backend.mode is SlotMode.CLEARED:
            # Hit or miss, the slot has computed head, and the next task
            # moves it into the RAM cache: the next request finds it there,
            # unless the cache keeps losing it. (A restore instead would
            # leave a second, shorter copy, which llama-server prefers to
            # the conversation that continues this request.)
            state.ramMisses = 0 if reused != "lost" else state.ramMisses + int(fromRam)
            state.inRam = state.ramMisses < RAM_MISS_LIMIT
        if reused == "hit":
            state.hits += 1
            if restored:
                state.restoreMisses = 0
            return reused
        state.misses += 1
        self.metrics.cacheMisses.labels(prefix=head.label).inc()
        log.warn(
            "{backend}: cache miss for {prefix} on slot {slot}: reused {got} of {want} tokens{why}",
            prefix=head.name,
            slot=slot,
            got=cached,
            want=expected,
            why=" (up to a context checkpoint: not warmed again)" if reused == "checkpoint" else "",
            backend=self.backend.llama.base,
        )
        if reused == "checkpoint":
            return reused
        if fromRam and self.backend.mode is not SlotMode.CLEARED:
            state.inRam = False  # evicted from llama-server's RAM: restore from disk next time
        if restored:
            state.restoreMisses += 1
            if state.restoreMisses >= RESTORE_MISS_LIMIT and not state.prefill:
                state.prefill = True
                state.prefillWhy = f"{state.restoreMisses} restores in a row reported success and gave no reuse on their slot"
                log.warn(
                    "{backend}: restores of {prefix} give no reuse; warming it by prefill",
                    prefix=head.name,
                    backend=self.backend.llama.base,
                )
        return reused

    def count(self, prefix: str, timings: dict[str, Any]) -> None:
        cached = max(0, timings.get("cache_n", 0))
        if prefix:
            self.tokensSaved[prefix] = self.tokensSaved.get(prefix, 0) + cached
        metrics = self.metrics
        metrics.child(metrics.promptTokens, prefix, "cached").inc(cached)
        metrics.child(metrics.promptTokens, prefix, "computed").inc(max(0, timings.get("prompt_n", 0)))
