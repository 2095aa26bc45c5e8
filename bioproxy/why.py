# -*- test-case-name: tests.unit.test_why -*-
"""
Why a request's prompt was, or was not, reused from llama-server's cache:
the question users of a prompt cache ask most ("why did it compute my
prompt again?"), answered from what bioproxy already knows about the head
the request starts with, the backend's process and the head book, never by
tokenizing anything. Each request that runs on a slot gets a Reason (the
dispatcher, backend/dispatch.py); the access line, the status page's
requests, the miss counter's `reason` label and /templates carry it.
"""

from __future__ import annotations

import dataclasses
import enum


class Why(enum.Enum):
    # Warm: where the head the request starts with was.
    IN_SLOT = "warm in a slot"
    IN_RAM = "warm in llama-server's RAM cache"
    RESTORED = "restored from its file"
    FOUND = "llama-server reused what it held"  # no head of bioproxy's: its own prefix match
    # Reused only up to a context checkpoint short of the head's end: how a
    # sliding-window or hybrid model reuses a prefix it has moved past.
    CHECKPOINT = "reused up to a context checkpoint"
    # Not warm, and why.
    FIRST_USE = "first use"
    RESTARTED = "llama-server restarted"
    EDITED = "template edited"
    SHORT = "below the learning threshold"
    NOT_LEARNED = "not learned yet"
    NO_HEAD = "nothing bioproxy knows to reuse"
    EVICTED = "evicted"
    RESTORE_REFUSED = "restore refused"
    NO_FILES = "no cache file serves it here"
    DIVERGED = "diverged from the cached conversation"
    LOAD_GUARD = "placed by the load guard"

    @property
    def warm(self) -> bool:
        """The head was there: a hit."""
        return self in (Why.IN_SLOT, Why.IN_RAM, Why.RESTORED, Why.FOUND)

    @property
    def label(self) -> str:
        """Its metrics label and JSON code: bounded, stable, no spaces."""
        return self.name.lower()


@dataclasses.dataclass(frozen=True)
class Reason:
    why: Why
    detail: str | None = (
        None  # what helps: which message diverged, what llama-server said (never prompt text)
    )

    def __str__(self) -> str:
        return self.why.value + (f" ({self.detail})" if self.detail else "")
