# -*- test-case-name: tests.unit.test_cachefacts,tests.unit.test_architectures,tests.unit.test_hardening -*-
"""
What bioproxy asks llama-server about a head's KV cache: where its user text
begins (tokenize, apply-template), restoring its file into a slot, saving a
slot as its file, and which slot such a job can use without cutting what a
user's conversation holds. Each outcome is reported to the cache's facts
(kvcache.KVCache, their one writer); this module keeps only what its own
calls need while they run: the slots they claimed, the saves under way, and
one follower token per process.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from twisted.internet import defer
from twisted.logger import Logger

from ..heads import MARK, Head
from ..metrics import Metrics
from . import Backend, Persistence, Reuse, SlotMode
from .kvcache import HIT_SHARE, KVCache, Prepared
from .llamacpp import BackendError, NoPersistence, NotLoaded
from .scheduler import commonLength

log = Logger()

# Texts a user's message may begin with. A head is cut back past any token
# that one of them merges with, so that every request's tokens begin with
# the head's: llama-server's tokenizer decides, not a guess about it.
FOLLOWERS = ("a", "A", "1", " ", "\n", ".", "<", "\u00e9", "\u4e2d")


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


class CacheIO:
    def __init__(self, cache: KVCache, metrics: Metrics, slotDir: Path | None = None) -> None:
        self.cache = cache
        self.backend: Backend = cache.backend
        self.llama = cache.backend.llama
        self.metrics = metrics
        # llama-server's --slot-save-path, where bioproxy can reach it: files given up are deleted.
        self.slotDir = slotDir
        self.claimed: set[int] = set()  # slots a restore or warmup of ours is using (CLEARED mode)
        self._follower: list[int] | None = None
        self._measuring = defer.DeferredLock()  # boundary: one head at a time
        self._saving = _Gate()  # saves under way that a new task could spoil
        # Users' requests whose head was restored into an empty slot, until
        # they end: a warmup's unpinned task meanwhile could land on that slot.
        self._restored = _Gate()

    def forget(self, name: str) -> None:
        """
        A learned head or conversation was given up: its facts go, and its
        files are deleted where bioproxy can reach them (slotDir).
        """
        for file in self.cache.forget(name):
            if self.slotDir is None:
                continue
            try:
                (self.slotDir / file).unlink(missing_ok=True)
            except OSError as e:
                log.warn(
                    "{backend}: cannot delete the cache file {file}: {why}",
                    file=file,
                    why=str(e),
                    backend=self.llama.name,
                )

    def forgetProcess(self) -> None:
        """A new backend process: its tokenizer may be another."""
        self._follower = None

    async def follower(self) -> list[int]:
        """One ordinary token, to extend a head by (asked of llama-server once per process)."""
        if self._follower is None:
            self._follower = (await self.llama.tokenize(FOLLOWERS[0], special=False))[:1]
        return self._follower

    async def moveToRamBeforeRestore(self, slot: int, held: str | None) -> None:
        """
        A restore overwrites a slot, and what it held is lost; a completion
        moves it into llama-server's RAM cache instead. So when that cache
        works, a one-token completion goes first, and the head is kept.
        """
        state = self.cache._version(held)
        if not self.backend.ramCache or state is None or state.inRam:
            return
        await self.completeOneToken(slot)
        self.cache.noteDisplaced(held)

    async def completeOneToken(self, slot: int) -> None:
        """A one-token completion on slot: llama-server moves what the slot held into its RAM cache."""
        await self.llama.chat(
            {"messages": [{"role": "user", "content": "."}], "max_tokens": 1, "id_slot": slot}, 30
        )

    async def prepare(self, slot: int, head: Head, held: str | None, ram: bool) -> Prepared:
        """
        Ready slot, which holds `held` and not head, for a completion of
        head. ram: llama-server's RAM cache may be relied on.
        """
        how: Prepared
        if ram and self.cache.inRam(head):
            how = "ram"
        elif self.cache.mayRestore(head):
            if await self.restore(slot, head, held):
                return "restored"
            return "cold" if self.backend.persistence is Persistence.NONE else "failed"
        else:
            how = "cold"
        self.cache.noteDisplaced(held)  # the completion to come moves it into the RAM cache
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
        name = self.cache.filename(head)
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
        except NotLoaded:
            return False  # a router's model, unloaded meanwhile: its file is not in question
        except BackendError as e:
            # llama-server says 400 for a file that is missing or unusable.
            status = "missing" if e.status == 400 else "error"
            if name in self.cache.files:
                log.warn(
                    "{backend}: the cache file of {prefix} is unusable ({why}); computing it again",
                    prefix=prefix,
                    why=str(e),
                    backend=self.llama.name,
                )
                self.cache.noteRestoreRefused(head, str(e))
            else:  # a first warmup: normal, not an error
                log.info(
                    "{backend}: no cache file for {prefix} yet; computing it",
                    prefix=prefix,
                    backend=self.llama.name,
                )
            self.metrics.kvRestores.labels(prefix=label, status=status).inc()
            self.cache.noteNoFile(name)
            return False
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed restore only means a cold request
            log.warn(
                "{backend}: restoring {prefix} failed: {why}",
                prefix=prefix,
                why=str(e),
                backend=self.llama.name,
            )
            self.metrics.kvRestores.labels(prefix=label, status="error").inc()
            return False
        restored = result.get("n_restored", 0) if isinstance(result, dict) else 0
        if not restored:
            self.metrics.kvRestores.labels(prefix=label, status="empty").inc()
            return False
        self.metrics.kvRestores.labels(prefix=label, status="ok").inc()
        self.cache.noteRestored(name)
        return True

    async def save(self, slot: int, head: Head, tokens: int | None) -> bool:
        """
        Save once per head version and backend: the file never changes
        after. tokens: what the slot should hold; a save of fewer (another
        task cleared the slot first) is not counted as the head's file.
        """
        name = self.cache.filename(head)
        backend = self.backend
        if name is None or name in self.cache.files or not backend.restoresHelp:
            return name in self.cache.files
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
            if self.cache.noteSaveFailed(head, str(e)):
                log.warn(
                    "{backend}: cannot save {prefix}'s file ({why}); it stays warm in llama-server, saved again later",
                    prefix=head.name,
                    why=str(e),
                    backend=self.llama.name,
                )
            return False
        written = result.get("n_saved") if isinstance(result, dict) else None
        if tokens and isinstance(written, int) and written < HIT_SHARE * tokens:
            log.info(
                "{backend}: slot {slot} held {n} tokens, not {prefix}'s {tokens}, when saved; saving again later",
                slot=slot,
                n=written,
                prefix=head.name,
                tokens=tokens,
                backend=self.llama.name,
            )
            self.cache.noteSaveShort(head)
            return False
        size = result.get("n_written") if isinstance(result, dict) else None
        self.cache.noteSaved(head, size if isinstance(size, int) else 0)
        log.info(
            "{backend}: saved {prefix} from slot {slot} to {name}",
            prefix=head.name,
            slot=slot,
            name=name,
            backend=self.llama.name,
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
        cache = self.cache
        if cache.saved(head) or not cache.persists(head):
            return cache.saved(head)
        if self.backend.reuse is not Reuse.PREFIX:
            # The slot holds the head, a message and an answer: a file of it
            # would serve only that conversation's next turn. Warm the head.
            return False
        state = cache.state(head)
        if prompt is None:
            await self.boundary(head)  # the least the slot must hold, where the answer did not say
        # At once: a task that starts meanwhile clears the slot in CLEARED mode.
        with self._quietWhile():
            least = max(prompt or 0, state.reusable or 0)
            if slot is None and least:
                slot = await self.slotHolding(least, generated if prompt else None)
            if slot is None or not await self.save(slot, head, least):
                return False
        cache.noteSavedServed(head)
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
        state = self.cache.state(head)
        if state.boundary is not None:
            return state.boundary
        # One head at a time: llama-server answers few calls at once, and a
        # restart's warmups would otherwise ask for every head's together,
        # keeping users' requests waiting for a connection.
        async with self._measuring:
            if state.boundary is None:
                self.cache.noteBoundary(head, await self._measure(head))
        return self.cache.state(head).boundary

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
                backend=self.llama.name,
            )
            return None
        return tokens[:keep]
