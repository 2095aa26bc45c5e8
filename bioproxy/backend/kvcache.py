# -*- test-case-name: tests.unit.test_cachefacts,tests.unit.test_architectures -*-
"""
What bioproxy knows about each head's KV cache (a template's, or one of
heads.py's learned ones): its boundary tokens (where the user's text
begins), its file on the backend's disk, how many tokens a warm slot saves,
and whether restores of it can be trusted, on this backend's kind of model
(backend/model.py). Restores are checked twice: `n_restored > 0` at once, and
`timings.cache_n` on the next request, since a restore can report success and
still leave the slot cold.

These are facts only: KVCache is their one writer and asks llama-server
nothing. What asks it (a boundary's tokens, restores, saves, which slot to
use) is cacheio.py, which reports each outcome here, as the warmer and the
dispatcher do.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterable
from datetime import datetime, timezone
from typing import Any, Literal

from twisted.logger import Logger

from ..heads import Head
from ..metrics import Metrics
from ..why import Reason, Why
from . import Backend, Reuse, SlotMode
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
    # A version of a head seen before (its template was edited), and a head
    # that was warm on a process that has gone (llama-server restarted) and
    # is not warm again yet: why a request found it cold (bioproxy.why).
    edited: bool = False
    restarted: bool = False
    refused: str | None = (
        None  # why llama-server would not load its file, the last time one known there was asked for
    )
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
    def __init__(self, backend: Backend, metrics: Metrics) -> None:
        self.backend = backend
        self.metrics = metrics
        self.states: dict[str, WarmState] = {}
        # Cache files known to be on the backend's disk (those this bioproxy
        # saved, and those the state file says it saved before), and those
        # known not to be.
        self.files: set[str] = set()
        self.missing: set[str] = set()
        self.tokensSaved: dict[str, int] = {}  # by template prefix: prompt tokens its requests reused
        # Told of each file saved, by head name and bytes (the head book's disk budget).
        self.onSaved: list[Callable[[str, int], None]] = []

    def state(self, head: Head) -> WarmState:
        state = self.states.get(head.name)
        if state is None or state.key != head.key:
            # Another version of a head seen before: its template was edited.
            state = self.states[head.name] = WarmState(head.key, edited=state is not None)
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

    def forget(self, name: str) -> list[str]:
        """A learned head or conversation was given up: its facts go. Its files, no longer known, are returned."""
        self.states.pop(name, None)
        stem = sanitise(name) + "-"
        files = [f for f in self.files if f.startswith(stem) and _isVersion(f[len(stem) :])]
        self.files.difference_update(files)
        return files

    def forgetProcess(self) -> None:
        """A new backend process holds nothing in its slots or RAM; the files stay."""
        for state in self.states.values():
            state.restarted = state.restarted or state.warm or state.inRam
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

    def mayRestore(self, head: Head) -> bool:
        name = self.filename(head)
        return (
            self.persists(head)
            and name not in self.missing
            # A learned head has a file only if this process saved one.
            and (not head.learned or name in self.files)
        )

    def inRam(self, head: Head) -> bool:
        """
        True when llama-server will find head in its RAM prompt cache,
        which is quicker than a restore from disk.
        """
        return bool(self.backend.ramCache) and self.state(head).inRam

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
        state.warm, state.restarted = True, False
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

    def noteBoundary(self, head: Head, tokens: list[int] | None) -> None:
        """Where head's user text begins, as llama-server tokenized it (None: it could not say)."""
        self.state(head).boundary = tokens

    def noteRestored(self, name: str) -> None:
        """A restore of file name gave tokens back: the file is there."""
        self.files.add(name)

    def noteRestoreRefused(self, head: Head, why: str) -> None:
        """llama-server would not load head's file, which bioproxy knew to be there (unusable, or gone)."""
        self.state(head).refused = why

    def noteNoFile(self, name: str) -> None:
        """llama-server has no usable file of that name."""
        self.files.discard(name)
        self.missing.add(name)

    def noteSaveFailed(self, head: Head, why: str) -> bool:
        """llama-server could not write head's file; True when that is news (the last try failed otherwise)."""
        state = self.state(head)
        news = state.saveError != why
        state.saveError, state.saveFailures = why, state.saveFailures + 1
        return news

    def noteSaveShort(self, head: Head) -> None:
        """A save went through but held less than head (another task cut the slot): not its file."""
        state = self.state(head)
        state.saveError, state.saveFailures = None, 0

    def noteSaved(self, head: Head, bytes: int) -> None:
        """head's file was written (bytes long)."""
        state = self.state(head)
        state.saveError, state.saveFailures = None, 0
        name = self.filename(head)
        if name is not None:
            self.files.add(name)
            self.missing.discard(name)
        state.fileBytes = bytes
        for listener in self.onSaved:
            listener(head.name, bytes)
        self.metrics.kvSaves.labels(prefix=head.label).inc()

    def noteSavedServed(self, head: Head) -> None:
        """
        A served conversation's slot was saved as head's file: llama-server
        holds head (in the RAM cache once the next task starts, in CLEARED mode).
        """
        state = self.state(head)
        state.warm = True
        if self.backend.mode is SlotMode.CLEARED:
            state.inRam = True

    def lostFromRam(self, head: Head) -> None:
        """A task of ours took head out of llama-server's RAM cache, and cut it: its file serves it next."""
        self.state(head).inRam = False

    def saved(self, head: Head) -> bool:
        return self.filename(head) in self.files

    def holding(self, head: Head, text: str) -> Contents:
        """What a slot holds after computing text, which starts with head: as much as its file backs."""
        backed = commonLength(text, self.warmText(head)) if self.saved(head) else 0
        return holding(head.key, text, backed)

    def sized(self, head: Head) -> bool:
        """How many tokens head is is known (its boundary, or a warmup's count)."""
        state = self.state(head)
        return state.reusable is not None or bool(state.tokens)

    def reused(self, head: Head, timings: dict[str, Any]) -> Reused:
        """What a request that starts with head reused of it, by its timings' cache_n."""
        state = self.state(head)
        expected = state.reusable if state.reusable is not None else state.tokens
        cached = timings.get("cache_n", 0)
        if expected and cached < HIT_SHARE * expected:
            return "checkpoint" if cached >= LOST_SHARE * expected else "lost"
        return "hit"

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
        state.warm, state.restarted, state.refused = True, False, None  # the slot has just computed it
        reused = self.reused(head, timings)
        if self.backend.mode is SlotMode.CLEARED:
            # Hit or miss, the slot has computed head, and the next task
            # moves it into the RAM cache: the next request finds it there,
            # unless the cache keeps losing it. (A restore instead would
            # leave a second, shorter copy, which llama-server prefers to
            # the conversation that continues this request.)
            state.ramMisses = 0 if reused != "lost" else state.ramMisses + int(fromRam)
            state.inRam = state.ramMisses < RAM_MISS_LIMIT
        if reused == "hit":
            if restored:
                state.restoreMisses = 0
            return reused
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
                    backend=self.backend.name,
                )
        return reused

    def noteRequest(self, head: Head, reason: Reason, slot: int | None, cached: int, requestId: str) -> None:
        """
        A user's request that started with head was answered, warm or not,
        and why (the dispatcher's Reason): its hits and misses, the miss
        counter by reason, and a line for each miss. (Warmups and their
        checks are not counted: they are not users' requests.)
        """
        state = self.state(head)
        if reason.why.warm:
            state.hits += 1
            return
        state.misses += 1
        self.metrics.cacheMisses.labels(prefix=head.label, reason=reason.why.label).inc()
        # A warning where bioproxy expected it warm; the rest (a first use, an edit) are how things go.
        (log.warn if reason.why in (Why.EVICTED, Why.RESTORE_REFUSED) else log.info)(
            "{backend}: cache miss for {prefix} on slot {slot}: reused {got} of {want} tokens: {why} "
            "(request {request_id})",
            prefix=head.name,
            slot=slot,
            got=cached,
            want=state.reusable if state.reusable is not None else state.tokens,
            why=str(reason),
            reason=reason.why.label,
            request_id=requestId,
            backend=self.backend.name,
        )

    def count(self, prefix: str, timings: dict[str, Any]) -> None:
        cached = max(0, timings.get("cache_n", 0))
        if prefix:
            self.tokensSaved[prefix] = self.tokensSaved.get(prefix, 0) + cached
        metrics = self.metrics
        metrics.child(metrics.promptTokens, prefix, "cached").inc(cached)
        metrics.child(metrics.promptTokens, prefix, "computed").inc(max(0, timings.get("prompt_n", 0)))
