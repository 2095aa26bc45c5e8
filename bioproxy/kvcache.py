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
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from .llamacpp import BackendError, LlamaClient
from .metrics import Metrics
from .templates import Template

log = Logger()

# A request reused the cache when cache_n reaches this share of the
# template's reusable tokens; token merges at the message boundary cost a few.
HIT_SHARE = 0.9
# Restore misses in a row after which restores of a template are distrusted.
RESTORE_MISS_LIMIT = 2
# Stands in for the user's message when finding where the template ends.
_SENTINEL = "\u2063bioproxy-message\u2063"


def sanitise(prefix: str) -> str:
    """A file-name-safe form of a prefix: only [A-Za-z0-9_-], never empty."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", prefix)[:64] or "_"


def filename(template: Template, fingerprint: str) -> str:
    return f"{sanitise(template.prefix)}-{template.hash[:12]}-{fingerprint}.bin"


def warmBody(template: Template, slot: int) -> dict[str, Any]:
    """The warmup request: the template with an empty message, one token, pinned."""
    return {
        "messages": [{"role": "user", "content": template.render("")}],
        "max_tokens": 1,
        "id_slot": slot,
        "cache_prompt": True,
        "stream": False,
    }


@dataclasses.dataclass
class WarmState:
    """One template version's cache facts; replaced when the template changes."""

    key: str
    tokens: int | None = None  # prompt tokens of the warmup request
    reusable: int | None = None  # tokens before the message: what a hit reuses
    prefill: bool = False  # restores failed to give reuse; warm by prefilling
    restoreMisses: int = 0
    hits: int = 0
    misses: int = 0
    warm: bool = False
    inRam: bool = False  # llama-server has moved it to its RAM prompt cache
    lastWarmup: float | None = None
    error: str | None = None  # why the backend refused the last warmup

    def view(self) -> dict[str, Any]:
        checked = self.hits + self.misses
        return {
            "warm": self.warm,
            "tokens": self.tokens,
            "reusable_tokens": self.reusable,
            "warmup_mode": "prefill" if self.prefill else "restore",
            "hits": self.hits,
            "misses": self.misses,
            "hit_ratio": round(self.hits / checked, 4) if checked else None,
            "last_warmup": self.lastWarmup,
            "warmup_error": self.error,
        }


class KVCache:
    def __init__(self, llama: LlamaClient, metrics: Metrics) -> None:
        self.llama = llama
        self.metrics = metrics
        self.fingerprint: str | None = None  # None until the backend's /props is read
        # Whether llama-server's in-RAM prompt cache gives a template that this
        # process has seen to any slot; None until a probe has told.
        self.ramCache: bool | None = None
        self.states: dict[str, WarmState] = {}
        self.saved: set[str] = set()  # files known to be on the backend's disk
        self.missing: set[str] = set()  # files known not to be

    def state(self, template: Template) -> WarmState:
        state = self.states.get(template.prefix)
        if state is None or state.key != template.key:
            state = self.states[template.prefix] = WarmState(template.key)
        return state

    def filename(self, template: Template) -> str | None:
        return filename(template, self.fingerprint) if self.fingerprint else None

    def mayRestore(self, template: Template) -> bool:
        name = self.filename(template)
        return name is not None and name not in self.missing and not self.state(template).prefill

    def inRam(self, template: Template) -> bool:
        """
        True when llama-server will find template in its RAM prompt cache,
        which is quicker than a restore from disk.
        """
        return bool(self.ramCache) and self.state(template).inRam

    async def preserve(self, slot: int, held: str | None) -> None:
        """
        A restore overwrites a slot, and what it held is lost; a completion
        moves it into llama-server's RAM cache instead. So when that cache
        works, a one-token completion goes first, and the template is kept.
        """
        state = self._version(held)
        if not self.ramCache or state is None or state.inRam:
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

    async def prepare(self, slot: int, template: Template, held: str | None, ram: bool) -> str:
        """
        Ready slot, which holds `held` and not template, for a completion of
        template. Returns how: "ram" (llama-server's RAM cache will supply
        it; only when ram is allowed), "restored" from disk, "failed" (a
        restore was tried and the slot is now empty), or "cold".
        """
        if ram and self.inRam(template):
            how = "ram"
        elif self.mayRestore(template):
            return "restored" if await self.restore(slot, template, held) else "failed"
        else:
            how = "cold"
        self.displaced(held)  # the completion to come moves it into the RAM cache
        return how

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
            await self.preserve(slot, held)
            result = await self.llama.restore(slot, name)
        except BackendError as e:
            # llama-server says 400 for a file that is missing or unusable.
            status = "missing" if e.status == 400 else "error"
            log.info("no usable cache file for {prefix} ({why})", prefix=prefix, why=str(e))
            self.metrics.kvRestores.labels(prefix=prefix, status=status).inc()
            self.saved.discard(name)
            self.missing.add(name)
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
        self.saved.add(name)
        return True

    async def save(self, slot: int, template: Template) -> None:
        """Save once per template version and backend: the file never changes after."""
        name = self.filename(template)
        if name is None or name in self.saved:
            return
        await self.llama.save(slot, name)
        self.saved.add(name)
        self.missing.discard(name)
        self.metrics.kvSaves.labels(prefix=template.prefix).inc()
        log.info("saved {prefix} from slot {slot} to {name}", prefix=template.prefix, slot=slot, name=name)

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
        self, template: Template, slot: int, timings: dict[str, Any], restored: bool, fromRam: bool = False
    ) -> bool:
        """
        Compare a templated request's reuse with what a warm slot gives.
        Returns False on a miss, which the caller answers with a re-warm.
        fromRam: the request relied on llama-server's RAM cache instead of a restore.
        """
        state = self.state(template)
        expected = state.reusable if state.reusable is not None else state.tokens
        if not expected:
            return True
        if timings.get("cache_n", 0) >= HIT_SHARE * expected:
            state.hits += 1
            if restored:
                state.restoreMisses = 0
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
        if fromRam:
            state.inRam = False  # evicted from llama-server's RAM: restore from disk next time
        if restored:
            state.restoreMisses += 1
            if state.restoreMisses >= RESTORE_MISS_LIMIT and not state.prefill:
                state.prefill = True
                log.warn("restores of {prefix} give no reuse; warming it by prefill", prefix=template.prefix)
        return False

    def count(self, prefix: str, timings: dict[str, Any]) -> None:
        self.metrics.promptTokens.labels(prefix=prefix, kind="cached").inc(max(0, timings.get("cache_n", 0)))
        self.metrics.promptTokens.labels(prefix=prefix, kind="computed").inc(
            max(0, timings.get("prompt_n", 0))
        )
