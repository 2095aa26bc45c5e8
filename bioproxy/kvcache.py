"""
What bioproxy knows about each template's KV cache: its file on the
backend's disk, how many tokens a warm slot saves, and whether restores of it
can be trusted. Restores are checked twice: `n_restored > 0` at once, and
`timings.cache_n` on the next request, since a restore can report success and
still leave the slot cold.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Literal

from twisted.internet import defer
from twisted.logger import Logger

from .backend import Backend, Persistence, SlotMode
from .expand import promptText
from .llamacpp import BackendError, NoPersistence
from .metrics import Metrics
from .scheduler import Contents, commonLength, holding
from .templates import Template

log = Logger()

# A request reused the cache when cache_n reaches this share of the
# template's reusable tokens; token merges at the message boundary cost a few.
HIT_SHARE = 0.9
# Restore misses in a row after which restores of a template are distrusted.
RESTORE_MISS_LIMIT = 2
# Stands in for the user's message when finding where the template ends.
_SENTINEL = "\u2063bioproxy-message\u2063"

# How a slot was made ready for a templated request: it already held the
# template; llama-server's RAM cache will supply it; its file was restored;
# a restore was tried and failed (the slot is empty); or it runs cold.
Prepared = Literal["warm", "ram", "restored", "failed", "cold"]


def sanitise(prefix: str) -> str:
    """A file-name-safe form of a prefix: only [A-Za-z0-9_-], never empty."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix)[:64] or "_"


def filename(template: Template, fingerprint: str) -> str:
    return f"{sanitise(template.prefix)}-{template.hash[:12]}-{fingerprint}.bin"


def warmBody(template: Template, slot: int | None) -> dict[str, Any]:
    """The warmup request: the template with an empty message, one token, pinned unless slot is None."""
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": template.render("")}],
        "max_tokens": 1,
        "cache_prompt": True,
        "stream": False,
    }
    if slot is not None:
        body["id_slot"] = slot
    return body


@dataclasses.dataclass
class WarmState:
    """One template version's cache facts; replaced when the template changes."""

    key: str
    tokens: int | None = None  # prompt tokens of the warmup request
    reusable: int | None = None  # tokens before the message: what a hit reuses
    prefill: bool = False  # restores failed to give reuse; warm by prefilling
    prefillWhy: str | None = None
    restoreMisses: int = 0
    hits: int = 0
    misses: int = 0
    warm: bool = False
    inRam: bool = False  # llama-server has moved it to its RAM prompt cache
    lastWarmup: float | None = None
    error: str | None = None  # why the backend refused the last warmup
    text: str | None = None  # what the warmup's slot starts with, as placement compares it

    def view(self, backend: Backend) -> dict[str, Any]:
        checked = self.hits + self.misses
        prefill = self.prefill or backend.persistence is Persistence.NONE
        why = self.prefillWhy
        if backend.persistence is Persistence.NONE:
            why = "llama-server runs without --slot-save-path: no cache files"
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
            "warmup_error": self.error,
        }


class KVCache:
    def __init__(self, backend: Backend, metrics: Metrics) -> None:
        self.backend = backend
        self.llama = backend.llama
        self.metrics = metrics
        self.states: dict[str, WarmState] = {}
        self.claimed: set[int] = set()  # slots a restore or warmup of ours is using (CLEARED mode)

    def state(self, template: Template) -> WarmState:
        state = self.states.get(template.prefix)
        if state is None or state.key != template.key:
            state = self.states[template.prefix] = WarmState(template.key)
        return state

    def warmText(self, template: Template) -> str:
        """What a slot that template's warmup computed starts with (worked out once per version)."""
        state = self.state(template)
        if state.text is None:
            state.text = promptText(warmBody(template, None), chat=True)
        return state.text

    def forgetFile(self, template: Template) -> None:
        """Its file must be written again: forced, or found to give no reuse."""
        self.backend.saved.discard(self.filename(template) or "")

    def forgetProcess(self) -> None:
        """A new backend process holds nothing in its slots or RAM; the files stay."""
        for state in self.states.values():
            state.warm = state.inRam = False

    def filename(self, template: Template) -> str | None:
        fp = self.backend.fingerprint
        return filename(template, fp) if fp else None

    def mayRestore(self, template: Template) -> bool:
        name = self.filename(template)
        return (
            name is not None
            and self.backend.persistence is not Persistence.NONE
            and name not in self.backend.missing
            and not self.state(template).prefill
        )

    def inRam(self, template: Template) -> bool:
        """
        True when llama-server will find template in its RAM prompt cache,
        which is quicker than a restore from disk.
        """
        return bool(self.backend.ramCache) and self.state(template).inRam

    async def preserve(self, slot: int, held: str | None) -> None:
        """
        A restore overwrites a slot, and what it held is lost; a completion
        moves it into llama-server's RAM cache instead. So when that cache
        works, a one-token completion goes first, and the template is kept.
        """
        state = self._version(held)
        if not self.backend.ramCache or state is None or state.inRam:
            return
        await self.displace(slot)
        state.inRam = True

    async def displace(self, slot: int) -> None:
        """A one-token completion on slot: llama-server moves what the slot held into its RAM cache."""
        await self.llama.chat(
            {"messages": [{"role": "user", "content": "."}], "max_tokens": 1, "id_slot": slot}, 30
        )

    def displaced(self, key: str | None) -> None:
        """
        A slot holding key is given a completion for another prompt: that is
        when llama-server moves the slot's prompt into its RAM cache. (A
        restore does not; it overwrites the slot.)
        """
        state = self._version(key)
        if state is not None:
            state.inRam = True

    def _version(self, key: str | None) -> WarmState | None:
        """The state of the template version key names, if it is a current one."""
        return next((s for s in self.states.values() if key is not None and s.key == key), None)

    async def prepare(self, slot: int, template: Template, held: str | None, ram: bool) -> Prepared:
        """
        Ready slot, which holds `held` and not template, for a completion of
        template. ram: llama-server's RAM cache may be relied on.
        """
        how: Prepared
        if ram and self.inRam(template):
            how = "ram"
        elif self.mayRestore(template):
            if await self.restore(slot, template, held):
                return "restored"
            return "cold" if self.backend.persistence is Persistence.NONE else "failed"
        else:
            how = "cold"
        self.displaced(held)  # the completion to come moves it into the RAM cache
        return how

    async def claimSlot(self, leased: int) -> int:
        """
        Where a file can be restored or a template computed and saved without
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

    async def restoreIntoEmptySlot(self, leased: int, template: Template) -> bool:
        slot = await self.claimSlot(leased)
        try:
            return await self.restore(slot, template)
        finally:
            self.unclaim(slot)

    async def restore(self, slot: int, template: Template, held: str | None = None) -> bool:
        """
        Load the template's file into slot, which holds the template version
        `held`; False (never an error) when that cannot be done.
        """
        name = self.filename(template)
        if name is None:
            return False
        prefix = template.prefix
        try:
            if self.backend.pins:
                await self.preserve(slot, held)
            result = await self.llama.restore(slot, name)
        except NoPersistence as e:
            self.backend.noPersistence(str(e))
            return False
        except BackendError as e:
            # llama-server says 400 for a file that is missing or unusable.
            status = "missing" if e.status == 400 else "error"
            log.info("no usable cache file for {prefix} yet ({why})", prefix=prefix, why=str(e))
            self.metrics.kvRestores.labels(prefix=prefix, status=status).inc()
            self.backend.saved.discard(name)
            self.backend.missing.add(name)
            return False
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a failed restore only means a cold request
            log.warn("restoring {prefix} failed: {why}", prefix=prefix, why=str(e))
            self.metrics.kvRestores.labels(prefix=prefix, status="error").inc()
            return False
        restored = result.get("n_restored", 0) if isinstance(result, dict) else 0
        if not restored:
            self.metrics.kvRestores.labels(prefix=prefix, status="empty").inc()
            return False
        self.metrics.kvRestores.labels(prefix=prefix, status="ok").inc()
        self.backend.saved.add(name)
        return True

    def saved(self, template: Template) -> bool:
        return self.filename(template) in self.backend.saved

    def holding(self, template: Template, text: str) -> Contents:
        """What a slot holds after computing text, which starts with template: as much as its file backs."""
        backed = commonLength(text, self.warmText(template)) if self.saved(template) else 0
        return holding(template.key, text, backed)

    async def save(self, slot: int, template: Template, tokens: int | None) -> bool:
        """
        Save once per template version and backend: the file never changes
        after. tokens: what the slot should hold; a save of fewer (another
        task cleared the slot first) is not counted as the template's file.
        """
        name = self.filename(template)
        backend = self.backend
        if name is None or name in backend.saved or backend.persistence is Persistence.NONE:
            return name in backend.saved
        try:
            result = await self.llama.save(slot, name)
        except NoPersistence as e:
            backend.noPersistence(str(e))
            return False
        written = result.get("n_saved") if isinstance(result, dict) else None
        if tokens and isinstance(written, int) and written < HIT_SHARE * tokens:
            log.info(
                "slot {slot} held {n} tokens, not {prefix}'s {tokens}, when saved; saving again later",
                slot=slot,
                n=written,
                prefix=template.prefix,
                tokens=tokens,
            )
            return False
        backend.saved.add(name)
        backend.missing.discard(name)
        self.metrics.kvSaves.labels(prefix=template.prefix).inc()
        log.info("saved {prefix} from slot {slot} to {name}", prefix=template.prefix, slot=slot, name=name)
        return True

    async def measure(self, template: Template) -> int | None:
        """
        How many prompt tokens come before the user's message once the chat
        template is applied: what a warm slot lets a request skip.
        """
        try:
            content = template.render(_SENTINEL)
            prompt = await self.llama.applyTemplate([{"role": "user", "content": content}])
            head, found, _ = prompt.partition(_SENTINEL)
            return await self.llama.countTokens(head) if found else None
        except defer.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - without it, the warmup's own count is used
            log.info("cannot measure {prefix}'s reusable tokens: {why}", prefix=template.prefix, why=str(e))
            return None

    def learn(
        self,
        template: Template,
        slot: int | None,
        timings: dict[str, Any],
        restored: bool,
        fromRam: bool = False,
    ) -> bool:
        """
        Compare a templated request's reuse with what a warm slot gives.
        Returns False on a miss, which the caller answers with a re-warm.
        restored: the request ran right after a restore that reported
        success, on that slot, so a miss is evidence against restores;
        any other miss (eviction, another task in between) is not.
        fromRam: the request relied on llama-server's RAM cache.
        """
        state = self.state(template)
        expected = state.reusable if state.reusable is not None else state.tokens
        if not expected:
            return True
        if timings.get("cache_n", 0) >= HIT_SHARE * expected:
            state.hits += 1
            if restored:
                state.restoreMisses = 0
            if self.backend.mode is SlotMode.CLEARED:
                state.inRam = True  # the next task moves it into the RAM cache, where the next finds it
            return True
        state.misses += 1
        self.metrics.cacheMisses.labels(prefix=template.prefix).inc()
        log.warn(
            "cache miss for {prefix} on slot {slot}: reused {got} of {want} tokens",
            prefix=template.prefix,
            slot=slot,
            got=timings.get("cache_n"),
            want=expected,
        )
        if fromRam or self.backend.mode is SlotMode.CLEARED:
            state.inRam = False  # evicted from llama-server's RAM: restore from disk next time
        if restored:
            state.restoreMisses += 1
            if state.restoreMisses >= RESTORE_MISS_LIMIT and not state.prefill:
                state.prefill = True
                state.prefillWhy = f"{state.restoreMisses} restores in a row reported success and gave no reuse on their slot"
                log.warn("restores of {prefix} give no reuse; warming it by prefill", prefix=template.prefix)
        return False

    def count(self, prefix: str, timings: dict[str, Any]) -> None:
        self.metrics.promptTokens.labels(prefix=prefix, kind="cached").inc(max(0, timings.get("cache_n", 0)))
        self.metrics.promptTokens.labels(prefix=prefix, kind="computed").inc(
            max(0, timings.get("prompt_n", 0))
        )
